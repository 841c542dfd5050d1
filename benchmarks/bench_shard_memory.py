"""Per-rank memory of the embedding tables, on 1 process and row-sharded over 2 (CPU, gloo).

Builds a Climber with a large item table and a large side-feature table, takes AdamW steps on
random batches, and counts on each rank the bytes of every `Table`'s weight and AdamW moments
that the rank holds (for a `RowShardedTable`, its block of rows), and of the rest of the model,
and the rank's peak RSS above its RSS before the model was built (torch and the process group), after
the build (and split) and after the steps.
With 2 ranks the model is built as `--parallel fsdp` training builds it: the large tables on the
meta device, each rank drawing only its rows (`embeddings.meta_tables`,
`distributed.shard_tables`); `--whole-too` also runs the earlier way, every rank building the
whole model and then splitting it, for contrast. Step times on a shared 2-core box are
indications only. docs/performance.md ("Row-sharded embedding tables") quotes it.

    python benchmarks/bench_shard_memory.py [--items 1000000] [--d 64] [--ranks 1 2] [--whole-too]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, table, write_results  # noqa: E402
from climber import distributed  # noqa: E402
from climber.config import ModelConfig  # noqa: E402
from climber.embeddings import Table, meta_tables  # noqa: E402
from climber.model import Climber  # noqa: E402
from climber.train import masked_bce, param_groups  # noqa: E402


def config(items: int, d: int) -> ModelConfig:
    return ModelConfig(n_items=items, n_users=1000, tasks=("click", "like"), n_actions=4, n_scenarios=3,
                       item_feature_cards=(items // 10,), user_feature_cards=(10,), strategies=("recent",) * 2,
                       seq_len=32, d_model=d, n_heads=2, n_layers=2, head_hidden=(d,))


def batch(cfg: ModelConfig, B: int, L: int, M: int, seed: int) -> dict:
    """A random SUMI batch on the CPU: B requests, K blocks of L events, M candidates."""
    g = torch.Generator().manual_seed(seed)
    K, T = cfg.n_blocks, len(cfg.tasks)

    def ints(high, *shape):
        return torch.randint(0, high, shape, generator=g)

    t = torch.sort(ints(10**8, B, K, L), dim=-1).values
    return {"user": ints(cfg.n_users, B), "req_time": t[:, :, -1].amax(-1) + 1, "req_scenario": ints(3, B),
            "hist_item": ints(cfg.n_items - 2, B, K, L) + 2, "hist_time": t, "hist_action": ints(4, B, K, L),
            "hist_scenario": ints(3, B, K, L), "hist_labels": ints(2, B, K, L, T),
            "hist_mask": torch.ones(B, K, L, dtype=torch.bool), "cand_item": ints(cfg.n_items - 2, B, M) + 2,
            "cand_mask": torch.ones(B, M, dtype=torch.bool), "labels": ints(2, B, M, T).float()}


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def rss() -> int:
    """This process's resident set now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank: int, world: int, init: str, args, build: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    base = rss()  # torch, the process group: what a rank holds before the model
    cfg = config(args.items, args.d)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with meta_tables() if build == "meta" else contextlib.nullcontext():
        model = Climber(cfg)
    if world > 1:
        distributed.shard_tables(model, world, torch.device("cpu"))
        distributed.parallelize(model, "fsdp", world)
    build_s = time.perf_counter() - t0
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the model built and split, no step yet
    opt = torch.optim.AdamW(param_groups(model, 0.01))
    weights = torch.tensor([0.5, 0.5])
    times = []
    for step in range(args.steps):  # each rank its own part of the global batch
        b = batch(cfg, args.batch // world, 32, 8, seed=step * world + rank)
        t0 = time.perf_counter()
        loss = masked_bce(model(b), b, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, Table)}
    row = {"ranks": world, "rank": rank, "build": build, "tables": 0, "tables_adamw": 0, "dense": 0,
           "dense_adamw": 0}
    for p in model.parameters():
        kind = "tables" if id(p) in tables else "dense"
        row[kind] += local_bytes(p)
        row[f"{kind}_adamw"] += sum(local_bytes(v) for k, v in opt.state[p].items() if k != "step")
    row["tables_total"] = row["tables"] + row["tables_adamw"]
    row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["base_rss"] = base
    row["build_peak_above_base"] = build_peak - base
    row["peak_above_base"] = row["peak_rss"] - base
    row["build_s"] = build_s
    row["step_s"] = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    Path(out, f"{world}_{build}_{rank}.json").write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split over the ranks)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--whole-too", action="store_true",
                    help="also run each world of several ranks with the whole model built on every rank first")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs = [(w, b) for w in args.ranks for b in (("whole",) if w == 1 else ("meta", "whole") if args.whole_too
                                                  else ("meta",))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, build in runs:
            mp.spawn(worker, args=(world, f"file://{tmp}/rdzv{world}{build}", args, build, tmp), nprocs=world)
            rows += [json.loads(Path(tmp, f"{world}_{build}_{r}.json").read_text()) for r in range(world)]
    mib = [(k, h, ".1f") for k, h in (("tables", "tables MiB"), ("tables_adamw", "AdamW MiB"),
                                     ("tables_total", "tables+AdamW MiB"), ("dense", "dense MiB"),
                                     ("dense_adamw", "dense AdamW MiB"), ("base_rss", "base RSS MiB"),
                                     ("build_peak_above_base", "build peak-base MiB"),
                                     ("peak_rss", "peak RSS MiB"), ("peak_above_base", "peak-base MiB"))]
    shown = [{**r, **{k: r[k] / 2**20 for k, _, _ in mib}} for r in rows]
    print(table(shown, [("ranks", "ranks", "d"), ("rank", "rank", "d"), ("build", "build", "s"), *mib,
                        ("build_s", "build s", ".1f"), ("step_s", "step s", ".2f")]))
    cfg = config(args.items, args.d)
    whole_tables = 4 * args.d * (cfg.n_items + cfg.item_feature_cards[0] + sum(cfg.user_feature_cards))
    payload = {"environment": environment("cpu"), "items": args.items, "d_model": args.d,
               "item_feature_rows": cfg.item_feature_cards[0], "global_batch": args.batch, "steps": args.steps,
               "whole_table_weights_bytes": whole_tables, "per_rank": rows}
    one = [r for r in rows if r["ranks"] == 1]
    two = [r for r in rows if r["ranks"] == 2 and r["build"] == "meta"]
    if one and two:
        payload["tables_total_ratio_2_to_1"] = max(r["tables_total"] for r in two) / one[0]["tables_total"]
        payload["peak_above_base_ratio_2_to_1"] = max(r["peak_above_base"] for r in two) / one[0]["peak_above_base"]
    print(json.dumps(payload))
    write_results("distributed/shard_memory", "benchmarks.bench_shard_memory", payload)


if __name__ == "__main__":
    main()
