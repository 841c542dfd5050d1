"""Kernel-launching operations of the serving engine's calls, counted on CPU.

On a GPU a serving call at batch 1 is bound by kernel launches, not arithmetic
(benchmarks/results/serving/README.md): with CUDA graphs (`Engine.use_cuda_graphs`) the model's
own calls replay as one graph each, and what the engine does around them (copying a cache into a
graph's static buffers and out again, padding, merging recomputed blocks, moving the request's
numbers to the device) still launches one kernel per operation. This script counts both, as aten
operations that are not views, for a prefill, a cache hit (`score`), one new event folded into
a cache alone (`Engine.extend`, where `recent` has room and where it is full) and one folded
into a candidate pass (as `Engine.score_requests` does it), on the padded
eager path that the graphs capture (the same operations). The counts do not depend on the
device, on L or on d, only on the layer count and the call's structure, so they are a
device-free measure of the launch overhead a change removes. The attention backend is the
reference (plain PyTorch) unless `--backend triton`: then each Triton kernel is one operation
(its `climber::` operator), the launches a GPU makes; without a GPU that needs Triton's CPU
interpreter (TRITON_INTERPRET=1, set before Python starts; slow, a minute or two).

    python -m benchmarks.count_serving_ops            # writes benchmarks/results/serving/serving_ops.json
    TRITON_INTERPRET=1 python -m benchmarks.count_serving_ops --backend triton --name serving_ops_triton
"""

from __future__ import annotations

import argparse
from collections import Counter
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_serving import random_history
from benchmarks.common import RESULTS, environment, table, write_results
from climber import ops
from climber.config import ModelConfig
from climber.model import Climber
from climber.serve.engine import Engine, SQLiteStore

# operations that make a view (no kernel); everything else launches at least one kernel on a GPU
VIEWS = {"view", "_unsafe_view", "slice", "select", "expand", "permute", "unsqueeze", "squeeze", "as_strided", "t",
         "transpose", "alias", "detach", "unflatten", "reshape", "unbind", "split", "narrow", "lift_fresh",
         "resolve_conj", "resolve_neg"}
MODEL_CALLS = ("prefill", "score", "fold")


class Counting(TorchDispatchMode):
    """Counts non-view aten operations, apart for those inside the model's own calls (a graph
    replay each on a GPU) and those around them (eager)."""

    def __init__(self):
        super().__init__()
        self.depth, self.model, self.eager, self.replays = 0, 0, Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            if self.depth:
                self.model += 1
            else:
                self.eager[name] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def model_call(self):
        self.replays += self.depth == 0
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


def engine(layers: int, L: int, M: int, backend: str) -> Engine:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=1000, n_users=10, tasks=("click", "like"), n_actions=2, n_scenarios=2,
                      strategies=("recent", "pos:like", "recent@16"), seq_len=L, d_model=32, n_heads=2,
                      n_layers=layers, dropout=0.0)
    model = Climber(cfg).eval()
    model.attention = ops.backend(backend, "cpu")
    empty = np.zeros(0, np.int64)
    e = Engine(model, SQLiteStore(":memory:", cfg.tasks), empty, empty)
    e.use_cuda_graphs(1, M, cuda_graphs=False)  # the padded calls the graphs capture, run eagerly
    return e


def count(e: Engine, fn) -> dict:
    mode = Counting()
    for name in MODEL_CALLS:  # the model's calls, as the graphs' captured functions reach them
        real = getattr(Climber, name)

        def wrapped(*a, _real=real, **kw):
            with mode.model_call():
                return _real(e.model, *a, **kw)

        setattr(e.model, name, wrapped)
    try:
        with torch.inference_mode(), mode:
            fn()
    finally:
        for name in MODEL_CALLS:
            delattr(e.model, name)
    return {"eager_ops": sum(mode.eager.values()), "graph_replays": mode.replays, "ops_in_graphs": mode.model,
            "eager_by_op": dict(mode.eager.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=64, help="L (the counts do not depend on it)")
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--backend", choices=("reference", "triton"), default="reference")
    ap.add_argument("--name", default="serving_ops")
    args = ap.parse_args()
    e = engine(args.layers, args.seq_len, args.candidates, args.backend)
    L, h = args.seq_len, random_history(args.seq_len + 1, e.cfg)
    cand = torch.randint(2, e.cfg.n_items, (1, args.candidates))
    t = torch.tensor([int(h.time[-1]) + 60])
    room = e.prefill(h[:L - 1], 1, 3)

    def in_pass():  # the engine's request path with one new event: catch up, then the fold in the pass
        c, f, _ = e.catch_up(room, h[:L], 1)
        return e.calls.fold(c, f.new, f.reset, cand, t)

    for warm in (h[:L], h[:L - 1]):  # the first call of a bucket allocates its buffers: not counted
        c = e.prefill(warm, 1, 3)
        e.extend(c, h[:len(warm) + 1], 1)
        e.score(c, cand, t)
    in_pass()
    cache = e.prefill(h[:L], 1, 3)
    rows = [{"call": "prefill", **count(e, lambda: e.prefill(h[:L], 1, 3))},
            {"call": "score (cache hit)", **count(e, lambda: e.score(cache, cand, t))}]
    for case, n in (("room", L - 1), ("full", L)):
        c = e.prefill(h[:n], 1, 3)
        rows.append({"call": f"one event alone ({case})", **count(e, lambda c=c, n=n: e.extend(c, h[:n + 1], 1))})
    rows.append({"call": "score with one event (room)", **count(e, in_pass)})
    print(table(rows, [("call", "call", "s"), ("eager_ops", "eager ops", "d"), ("graph_replays", "replays", "d"),
                       ("ops_in_graphs", "ops in graphs", "d")]))
    payload = {"benchmark": "serving_ops", "env": environment("cpu"), "backend": args.backend, "layers": args.layers,
               "strategies": list(e.cfg.strategies), "rows": rows}
    path = write_results(args.name, "benchmarks.count_serving_ops", payload, RESULTS / "serving")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
