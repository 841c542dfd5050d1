"""Per-rank memory of the embedding tables, on 1 process and row-sharded over 2 (CPU, gloo).

Builds a Climber with a large item table and a large side-feature table, takes one AdamW step on
a random batch, and counts on each rank the bytes of every `Table`'s weight and AdamW moments
that the rank holds (for a `RowShardedTable`, its block of rows), and of the rest of the model.
With `--parallel fsdp` and 2 ranks the tables are split by rows (`climber/distributed.py`); with
1 process nothing is split. Also prints each rank's peak RSS and step time, which on a shared
2-core box are indications only. docs/design.md ("Row-sharded embedding tables") quotes it.

    python benchmarks/bench_shard_memory.py [--items 1000000] [--d 64] [--ranks 1 2]
"""

from __future__ import annotations

import argparse
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
from climber.embeddings import Table  # noqa: E402
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


def worker(rank: int, world: int, init: str, args, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cfg = config(args.items, args.d)
    torch.manual_seed(0)
    model = Climber(cfg)
    if world > 1:
        distributed.shard_tables(model, world, torch.device("cpu"))
        distributed.parallelize(model, "fsdp", world)
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
    row = {"ranks": world, "rank": rank, "tables": 0, "tables_adamw": 0, "dense": 0, "dense_adamw": 0}
    for p in model.parameters():
        kind = "tables" if id(p) in tables else "dense"
        row[kind] += local_bytes(p)
        row[f"{kind}_adamw"] += sum(local_bytes(v) for k, v in opt.state[p].items() if k != "step")
    row["tables_total"] = row["tables"] + row["tables_adamw"]
    row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["step_s"] = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    Path(out, f"{world}_{rank}.json").write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split over the ranks)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            mp.spawn(worker, args=(world, f"file://{tmp}/rdzv{world}", args, tmp), nprocs=world)
            rows += [json.loads(Path(tmp, f"{world}_{r}.json").read_text()) for r in range(world)]
    mib = [(k, h, ".1f") for k, h in (("tables", "tables MiB"), ("tables_adamw", "AdamW MiB"),
                                     ("tables_total", "tables+AdamW MiB"), ("dense", "dense MiB"),
                                     ("dense_adamw", "dense AdamW MiB"), ("peak_rss", "peak RSS MiB"))]
    shown = [{**r, **{k: r[k] / 2**20 for k, _, _ in mib}} for r in rows]
    print(table(shown, [("ranks", "ranks", "d"), ("rank", "rank", "d"), *mib, ("step_s", "step s", ".2f")]))
    cfg = config(args.items, args.d)
    payload = {"environment": environment("cpu"), "items": args.items, "d_model": args.d,
               "item_feature_rows": cfg.item_feature_cards[0], "global_batch": args.batch, "per_rank": rows}
    one = [r["tables_total"] for r in rows if r["ranks"] == 1]
    two = [r["tables_total"] for r in rows if r["ranks"] == 2]
    if one and two:
        payload["tables_total_ratio_2_to_1"] = max(two) / one[0]
    print(json.dumps(payload))
    write_results("distributed/shard_memory", "benchmarks.bench_shard_memory", payload)


if __name__ == "__main__":
    main()
