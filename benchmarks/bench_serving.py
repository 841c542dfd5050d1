"""In-process serving latency (docs/paper.md section 3.2): one request = one user, M candidates.

Three ways to score a request, on the same random model and history:
  (a) per_cand: no cache, one candidate per sample: M samples each carrying the full history
      (the pointwise layout of a DLRM-style ranker), run in memory-bounded chunks;
  (b) sumi:     SUMI without a cache: history and all M candidates in one pass (prefill + score);
  (c) cached:   SUMI with the user's history prefilled (the serving engine's cache hit): only
      the candidate pass, M candidates against the cached keys/values.
Each is timed end to end, probabilities on the host. Sweeps vary one of candidates (M),
history length (L) and layers around a base point. Per (L, layers) it also times a prefill and
one new event folded into a cached history alone (`Engine.extend`), twice (`history_costs`): into
L - 1 events, where 'recent' and 'pos:like' have room and take it without recomputing anything (a
full short window such as 'recent@16' is rebuilt in the same fold, from its 16 tokens), and into
L events, where the 'recent' window is full, so by construction that block is rebuilt: a prefill
of it at full length; and the first event folded into a candidate pass, as the server folds new
events (`event_in_pass_ms`: what the event adds to that pass). `--cuda-graphs` runs the engine's
model calls as the server does on a GPU (`Engine.use_cuda_graphs`).

    python -m benchmarks.bench_serving --device cpu --quick
    python -m benchmarks.bench_serving --device cuda            # bf16, d=256, 4 heads, base L=800, 12 layers
    python -m benchmarks.bench_serving --device cuda --cuda-graphs

Prints a table, then one JSON line; writes benchmarks/results/serving_<device>[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import environment, percentiles, table, write_results
from climber import ops
from climber.config import ModelConfig
from climber.model import Climber
from climber.serve.engine import Engine, History, SQLiteStore

TASKS = ("click", "like", "share", "comment")  # the paper's four behaviours
N_ITEMS, N_SCENARIOS, N_ACTIONS = 100_000, 3, 4


def build(args: argparse.Namespace, L: int, layers: int) -> Engine:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=N_ITEMS, n_users=1000, tasks=TASKS, n_actions=N_ACTIONS, n_scenarios=N_SCENARIOS,
                      strategies=tuple(args.strategies), seq_len=L, d_model=args.d_model, n_heads=args.heads,
                      n_layers=layers, dropout=0.0)
    model = Climber(cfg).to(device=args.device, dtype=args.torch_dtype)
    model.attention = ops.backend(args.attention, args.device)
    if args.compile != "none":  # an instance attribute: (b) and (c) both go through it
        mode = None if args.compile == "default" else args.compile
        model.score = torch.compile(model.score, dynamic=False, mode=mode)
    empty = np.zeros(0, np.int64)
    engine = Engine(model, SQLiteStore(":memory:", TASKS), empty, empty)
    if args.cuda_graphs:
        engine.use_cuda_graphs(1, max(*args.candidates, args.base[2]))
    return engine


def random_history(n: int, cfg: ModelConfig, seed: int = 0) -> History:
    """n events of dense item ids, oldest first."""
    g = np.random.default_rng(seed)
    return History(g.integers(2, cfg.n_items, n), 1_700_000_000 + np.cumsum(g.integers(1, 3600, n)),
                   g.integers(0, cfg.n_actions, n), g.integers(0, cfg.n_scenarios, n),
                   g.integers(0, 2, (n, len(cfg.tasks))))


def timed(fn: Callable[[], object], args: argparse.Namespace) -> list[float]:
    """Milliseconds per call: warm-up calls, then up to `iters` calls or `max_seconds` (at least 3)."""
    for _ in range(args.warmup):
        fn()
    out: list[float] = []
    stop = time.perf_counter() + args.max_seconds
    while len(out) < args.iters and (len(out) < 3 or time.perf_counter() < stop):
        t0 = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def per_candidate(engine: Engine, hist: dict, cand: torch.Tensor, req_time: torch.Tensor, chunk: int) -> np.ndarray:
    """(a): every candidate its own sample with the whole history; `chunk` samples per pass."""
    M = cand.shape[1]
    out = []
    for s in range(0, M, chunk):
        c = cand[0, s:s + chunk, None]  # (b, 1)
        b = c.shape[0]
        batch = {k: v.expand(b, *v.shape[1:]) for k, v in hist.items()}
        batch.update(cand_item=c, cand_mask=torch.ones_like(c, dtype=torch.bool), req_time=req_time.expand(b))
        out.append(torch.sigmoid(engine.model(batch).float()).cpu())
    return torch.cat(out).numpy()


def run_point(args: argparse.Namespace, engine: Engine, h: History, M: int) -> dict:
    dev = args.device
    L, layers = engine.cfg.seq_len, engine.cfg.n_layers
    hist = engine.history_inputs(h)
    hist["req_scenario"] = torch.tensor([1], device=dev)
    hist["user"] = torch.tensor([3], device=dev)
    g = torch.Generator().manual_seed(M)
    cand = torch.randint(2, N_ITEMS, (1, M), generator=g).to(dev)
    req_time = torch.tensor([int(h.time[-1]) + 60], device=dev)
    sumi = dict(hist, cand_item=cand, cand_mask=torch.ones_like(cand, dtype=torch.bool), req_time=req_time)
    cache = engine.prefill(h, 1, 3)
    row: dict = {"L": L, "layers": layers, "M": M}

    with torch.inference_mode():
        fns = {"cached": lambda: engine.score(cache, cand, req_time).cpu(),
               "sumi": lambda: torch.sigmoid(engine.model(sumi).float()).cpu()}
        # (a) holds a (chunk, K, H, L, L) bias and scores: chunk so they stay within the budget
        per_sample = 4 * engine.cfg.n_blocks * engine.cfg.n_heads * hist["hist_mask"].shape[-1] ** 2 * 4
        chunk = int(max(1, min(M, args.mem_budget_gb * 2**30 // per_sample)))
        flops = M * engine.model.flops(hist["hist_mask"].shape[-1], 1)["exact"]
        if flops <= args.max_per_cand_flops:
            fns["per_cand"] = lambda: per_candidate(engine, hist, cand, req_time, chunk)
        else:  # would take longer than this run can afford: reported as skipped
            row["per_cand_skipped_flops"] = flops
        for name, fn in fns.items():
            p = percentiles(timed(fn, args))
            row.update({f"{name}_{k}": v for k, v in p.items()})
            row[f"{name}_cand_per_s"] = M / p["p50_ms"] * 1e3
    if "per_cand_p50_ms" in row:
        row["speedup_vs_per_cand"] = row["per_cand_p50_ms"] / row["cached_p50_ms"]
    row["speedup_vs_sumi"] = row["sumi_p50_ms"] / row["cached_p50_ms"]
    return row


def history_costs(args: argparse.Namespace, engine: Engine, M: int = 1000) -> dict:
    """A prefill of L = seq_len events, and one new event folded into a cached history of L - 1
    events ('room': 'recent' and 'pos:like' take it, a full short window such as 'recent@16' is
    rebuilt in the same fold) and of L events ('full': the 'recent' window overflows and is
    rebuilt by a prefill at full length), alone (`Engine.extend`), as `*_p50_ms`; and the 'room'
    event folded into a candidate pass of M candidates as the server does it
    (`Engine.score_requests`), against that pass on the same cache without it: `event_in_pass_ms`
    is the difference of their p50s. `*_vs_prefill` are ratios to the prefill's p50."""
    L = engine.cfg.seq_len
    h = random_history(L + 1, engine.cfg)
    out: dict = {"L": L, "layers": engine.cfg.n_layers, "M": M}
    p = percentiles(timed(lambda: engine.prefill(h[:L], 1, 3).kv[-1][1].cpu(), args))
    out.update(prefill_p50_ms=p["p50_ms"], prefill_p99_ms=p["p99_ms"])
    for case, n in (("room", L - 1), ("full", L)):
        cache, hist = engine.prefill(h[:n], 1, 3), h[:n + 1]
        _, redone = engine.extend(cache, hist, 1)
        p = percentiles(timed(lambda c=cache, x=hist: engine.extend(c, x, 1)[0].kv[-1][1].cpu(), args))
        out.update({f"event_{case}_p50_ms": p["p50_ms"], f"event_{case}_p99_ms": p["p99_ms"],
                    f"event_{case}_blocks_recomputed": redone,
                    f"event_{case}_vs_prefill": p["p50_ms"] / out["prefill_p50_ms"]})
    cache, hist = engine.prefill(h[:L - 1], 1, 3), h[:L]
    pending, fold, _ = engine.catch_up(cache, hist, 1)
    cand = torch.randint(2, engine.cfg.n_items, (1, M), generator=torch.Generator().manual_seed(2)).to(engine.device)
    t = torch.tensor([int(hist.time[-1]) + 60], device=engine.device)
    with torch.inference_mode():
        plain = percentiles(timed(lambda: engine.calls.score(cache, cand, t).cpu(), args))
        folded = percentiles(timed(lambda: engine.calls.fold(pending, fold.new, fold.reset, cand, t)[0].cpu(), args))
    out.update(score_p50_ms=plain["p50_ms"], score_with_event_p50_ms=folded["p50_ms"],
               score_with_event_p99_ms=folded["p99_ms"], event_in_pass_ms=folded["p50_ms"] - plain["p50_ms"],
               event_in_pass_vs_prefill=(folded["p50_ms"] - plain["p50_ms"]) / out["prefill_p50_ms"])
    return out


def bf16_error(args: argparse.Namespace, L: int, layers: int, M: int) -> float:
    """Largest |p_bf16 - p_fp32| over the base request's candidates (same weights)."""
    eager = {**vars(args), "compile": "none", "cuda_graphs": False}  # more graphs here would only cost time
    engine = build(argparse.Namespace(**eager), L, layers)
    ref = build(argparse.Namespace(**{**eager, "torch_dtype": torch.float32}), L, layers)
    h = random_history(L, engine.cfg)
    cand = torch.randint(2, N_ITEMS, (1, M), generator=torch.Generator().manual_seed(1)).to(args.device)
    t = torch.tensor([int(h.time[-1]) + 60], device=args.device)
    got = engine.score(engine.prefill(h, 1, 3), cand, t)
    want = ref.score(ref.prefill(h, 1, 3), cand, t)
    return float((got - want).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--quick", action="store_true", help="small model and grid, about a minute on 2 CPU cores")
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--strategies", nargs="+", default=["recent", "pos:like", "recent@16"])
    ap.add_argument("--attention", default="auto", choices=ops.BACKENDS,
                    help="attention backend of every model call: prefill, candidate pass, extend")
    ap.add_argument("--base", type=int, nargs=3, metavar=("L", "LAYERS", "M"), help="the point the sweeps vary")
    ap.add_argument("--candidates", type=int, nargs="+")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--layers", type=int, nargs="+")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, help="time per measured point and mode (at least 3 calls)")
    ap.add_argument("--max-per-cand-flops", type=float, help="skip (a) above this many FLOPs per request")
    ap.add_argument("--mem-budget-gb", type=float, help="activation budget of one (a) chunk")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    ap.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"),
                    help="torch.compile the candidate pass (compiles once per shape, in the warm-up)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="the engine's model calls replayed from CUDA graphs, as the server runs them on a GPU")
    ap.add_argument("--name", help="results file name (default serving_<device>[_quick])")
    args = ap.parse_args()
    q = args.quick
    d = {"d_model": (64, 256), "heads": (2, 4), "base": ([100, 2, 100], [800, 12, 1000]),
         "candidates": ([10, 100, 1000], [10, 100, 300, 1000]),
         "lengths": ([100, 400, 1600], [100, 200, 400, 800, 1600]),
         "layers": ([1, 4], [1, 2, 4, 8, 12]), "iters": (20, 100), "max_seconds": (0.6, 3.0),
         "max_per_cand_flops": (3e10, 1e15 if args.device == "cuda" else 1e12),
         "mem_budget_gb": (1.0, 8.0 if args.device == "cuda" else 1.0)}
    for k, (quick, full) in d.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    L0, N0, M0 = args.base
    points = ([("candidates", L0, N0, m) for m in args.candidates] + [("length", n, N0, M0) for n in args.lengths]
              + [("layers", L0, n, M0) for n in args.layers])
    rows, costs, measured, engines = [], {}, {}, {}
    for sweep, L, layers, M in points:
        if (L, layers, M) not in measured:  # the base point is in every sweep: measured once
            engines = {(L, layers): engines.get((L, layers)) or build(args, L, layers)}  # one model in memory
            engine = engines[(L, layers)]
            measured[(L, layers, M)] = run_point(args, engine, random_history(L, engine.cfg), M)
            if (L, layers) not in costs:
                costs[(L, layers)] = history_costs(args, engine, M0)
        rows.append({"sweep": sweep, **measured[(L, layers, M)]})
        print(f"  {sweep}: L={L} layers={layers} M={M}: cached p50 {rows[-1]['cached_p50_ms']:.2f} ms", flush=True)

    print(table(rows, [("sweep", "sweep", "s"), ("L", "L", "d"), ("layers", "layers", "d"), ("M", "M", "d"),
                       ("per_cand_p50_ms", "(a) p50", ".2f"), ("per_cand_p99_ms", "(a) p99", ".2f"),
                       ("sumi_p50_ms", "(b) p50", ".2f"), ("sumi_p99_ms", "(b) p99", ".2f"),
                       ("cached_p50_ms", "(c) p50", ".2f"), ("cached_p99_ms", "(c) p99", ".2f"),
                       ("cached_cand_per_s", "(c) cand/s", ".0f"), ("speedup_vs_per_cand", "c vs a", ".1f"),
                       ("speedup_vs_sumi", "c vs b", ".1f")]))
    print("latencies in ms; (a) per-candidate, no cache; (b) SUMI, no cache; (c) SUMI, cached history")
    print(table(list(costs.values()), [
        ("L", "L", "d"), ("layers", "layers", "d"), ("prefill_p50_ms", "prefill p50", ".2f"),
        ("prefill_p99_ms", "prefill p99", ".2f"), ("event_room_p50_ms", "+1 room p50", ".2f"),
        ("event_room_p99_ms", "+1 room p99", ".2f"), ("event_room_blocks_recomputed", "redone", "d"),
        ("event_full_p50_ms", "+1 full p50", ".2f"), ("event_full_p99_ms", "+1 full p99", ".2f"),
        ("event_full_blocks_recomputed", "redone", "d"), ("score_p50_ms", "pass p50", ".2f"),
        ("score_with_event_p50_ms", "pass+1 p50", ".2f"), ("event_in_pass_vs_prefill", "+1 in pass / prefill", ".3f")]))
    print("+1 room: one event into L - 1 cached events, alone; +1 full: into L, the 'recent' window full (rebuilt); "
          "pass+1: the room event folded into a candidate pass of M")
    model_cfg = {"d_model": args.d_model, "heads": args.heads, "strategies": args.strategies,
                 "attention": args.attention, "dtype": args.dtype, "tasks": len(TASKS), "compile": args.compile,
                 "cuda_graphs": args.cuda_graphs}
    summary = {"benchmark": "serving", "env": environment(args.device), "model": model_cfg, "base": args.base,
               "rows": rows, "history_costs": list(costs.values())}
    if args.dtype == "bf16":
        summary["bf16_max_abs_prob_error"] = bf16_error(args, L0, N0, M0)
    name = args.name or f"serving_{args.device}{'_quick' if q else ''}"
    path = write_results(name, "benchmarks.bench_serving", summary)
    print(json.dumps(summary))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
