"""CPU threads for small models, with and without contention. CPU only.

Times optimizer steps of a tiny and a small Climber on synthetic data at several
`torch.set_num_threads` values, first on an idle machine, then while `--load` busy-loop
processes (default: one per core) compete for the cores, as another job on a shared box
does. OpenMP's worker threads spin and wait for each other at every parallel region, so a
thread that loses its core stalls them all; tiny models run many small kernels, each such a
barrier. docs/design.md ("CPU threads") quotes the result.

    python benchmarks/bench_threads.py [--steps 20] [--threads 1 2 4 0] [--load N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from climber.config import TrainConfig, model_config
from climber.data import synthetic
from climber.data.sumi import SumiData, prepare
from climber.train import build_model, loader, masked_bce, param_groups


def spin() -> None:
    while True:
        pass


def step_ms(data: SumiData, preset: str, threads: int, steps: int, batch: int) -> float:
    """Median wall time of one optimizer step (after 3 warm-up steps), in ms."""
    torch.set_num_threads(threads)
    strategies = tuple(data.meta["strategies"])
    cfg = model_config(preset, data.vocab, strategies)
    model = build_model(cfg, data, 0).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    weights = torch.full((len(data.tasks),), 1.0 / len(data.tasks))
    times = []
    batches = iter(loader(data, data.requests("train"), batch, cfg))
    for i in range(steps + 3):
        b = next(batches)
        t0 = time.perf_counter()
        loss = masked_bce(model(b), b, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4, 0], help="0: torch's default (one per core)")
    ap.add_argument("--load", type=int, default=len(os.sched_getaffinity(0)),
                    help="busy processes for the contended runs (default: one per core)")
    args = ap.parse_args()
    default = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        log = synthetic.generate(synthetic.SyntheticConfig(users=300, events_per_user=100))
        prepare(log, Path(tmp) / "d", synthetic.PREPARE, synthetic.STRATEGIES)
        data = SumiData(Path(tmp) / "d")
        rows = []
        for load in (0, args.load):
            spinners = [mp.Process(target=spin, daemon=True) for _ in range(load)]
            for p in spinners:
                p.start()
            try:
                for preset in args.presets:
                    for n in args.threads:
                        ms = step_ms(data, preset, n or default, args.steps, args.batch)
                        rows.append({"preset": preset, "load": load, "threads": n or default, "step_ms": ms})
                        print(f"{preset:<6} load {load:>3}  threads {n or default:>3}  {ms:9.1f} ms/step", flush=True)
            finally:
                for p in spinners:
                    p.kill()
    print(json.dumps({"cores": len(os.sched_getaffinity(0)), "torch_default_threads": default, "batch": args.batch,
                      "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
