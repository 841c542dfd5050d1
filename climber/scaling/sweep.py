"""Scaling sweeps (docs/paper.md section 4): train a grid of model sizes on one prepared data set and
append one JSON row per finished run to a results file.

A row holds the model, its full config, parameter counts (embedding / dense), forward FLOPs per
request in the paper's form (C ~ length x layers, attention neglected) and exact, training FLOPs
(3 x exact forward x train requests x epochs actually run: the backward pass costs about twice
the forward), wall time, and validation / test AUC, GAUC and LogLoss (mean over tasks; the
validation numbers are the best epoch's, the test numbers come from that best checkpoint).

FLOPs per request are counted at the nominal history length (`seq_len` per block) and the mean
number of candidates per training request: the model's size, not what a short history costs.

Resumable: a run whose key (model, sizes, and a hash of the full model config, training
config and data set) is already in the results file is skipped, and each run trains in its own
directory, so `train()` resumes it from its last checkpoint after an interruption.

Parallel: `shard=(i, n)` runs every n-th grid point from the i-th, so n processes (one per
shard, e.g. on one GPU whose small models one process cannot keep busy) share one grid and one
results file; rows are appended under an exclusive file lock, a whole line at a time.

Models that do not use a dimension are swept only over what applies: whether a model has
layers is probed by building it (on the meta device, no memory) with 1 and 2 layers and
comparing parameter counts, so baselines are handled by name through `make_model`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from climber.config import ModelConfig, TrainConfig, model_config
from climber.data.sumi import SumiData
from climber.model import make_model
from climber.runtime import Runtime, resolve_device


@dataclass(frozen=True)
class Grid:
    """The sizes to sweep; empty `widths` = the preset's d_model."""

    models: tuple[str, ...]
    lengths: tuple[int, ...]
    layers: tuple[int, ...]
    widths: tuple[int, ...] = ()
    preset: str = "small"

    def __post_init__(self) -> None:
        if not (self.models and self.lengths and self.layers):
            raise ValueError("a grid needs at least one model, length and layer count")


def uses_layers(cfg: ModelConfig) -> bool:
    """Does this architecture have a depth? (DLRM and DIN do not; their parameters don't change.)"""
    counts = []
    for n in (1, 2):
        with torch.device("meta"):
            counts.append(make_model(dataclasses.replace(cfg, n_layers=n)).param_counts()["total"])
    return counts[0] != counts[1]


def grid_configs(grid: Grid, vocab: dict, strategies: tuple[str, ...]) -> list[ModelConfig]:
    """One ModelConfig per distinct point of the grid, per model (a depthless model keeps the
    preset's n_layers and is swept over lengths and widths only)."""
    out: list[ModelConfig] = []
    for arch in grid.models:
        base = model_config(grid.preset, vocab, strategies, arch=arch)
        layers = grid.layers if uses_layers(base) else (base.n_layers,)
        for d in grid.widths or (base.d_model,):
            for n in layers:
                for L in grid.lengths:
                    out.append(dataclasses.replace(base, d_model=d, n_layers=n, seq_len=L))
    return out


def run_key(cfg: ModelConfig, tcfg: TrainConfig, data_meta: dict, layered: bool) -> str:
    """Readable name + a hash of everything that defines the run (configs and the data set)."""
    blob = json.dumps([dataclasses.asdict(cfg), dataclasses.asdict(tcfg), data_meta], sort_keys=True)
    depth = f"_N{cfg.n_layers}" if layered else ""
    return f"{cfg.arch}_L{cfg.seq_len}{depth}_d{cfg.d_model}_{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def read_rows(path: Path) -> list[dict]:
    """Rows of a results file; a last line cut short by a kill is ignored (the run is redone)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line, first dropping a partial last line left by a kill mid-write; under
    an exclusive lock, so processes sharing the file never interleave or cut each other's rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        size = f.seek(0, 2)
        if size and (f.seek(size - 1), f.read(1))[1] != b"\n":
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)
        f.write((json.dumps(row, sort_keys=True) + "\n").encode())


def _metrics(res: dict) -> dict:
    return {k: float(res["mean"][k]) for k in ("auc", "gauc", "logloss")}


def run_one(cfg: ModelConfig, tcfg: TrainConfig, data: SumiData, run_dir: Path, key: str, layered: bool,
            runtime: Runtime | None = None) -> dict:
    """Train (or resume) one grid point, evaluate its best checkpoint on test, return its row."""
    from climber.evaluate import evaluate
    from climber.train import train

    runtime = runtime or Runtime()
    device = resolve_device(runtime.device)
    resumed = (run_dir / "checkpoints").exists()
    t0 = time.time()
    summary = train(data.root, run_dir, cfg, tcfg, runtime, progress=False)
    wall = time.time() - t0
    test = evaluate(run_dir / "best", data.root, "test", runtime=runtime)

    n_train = len(data.requests("train"))
    cands = np.diff(data.a["req_cand_start"])[data.requests("train")]
    m = float(cands.mean())
    with torch.device("meta"):
        model = make_model(cfg)
    flops = model.flops(cfg.seq_len, m)
    steps_per_epoch = -(-n_train // tcfg.batch_size)
    epochs_run = summary["steps"] / steps_per_epoch
    return {
        "key": key,
        "model": cfg.arch,
        "seq_len": cfg.seq_len,
        "n_layers": cfg.n_layers if layered else None,
        "d_model": cfg.d_model,
        "dataset": data.meta["name"],
        "config": {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg)},
        "params": model.param_counts(),
        "candidates_per_request": m,
        "flops": flops,
        "train_flops": 3 * flops["exact"] * n_train * epochs_run,
        "train_requests": n_train,
        "epochs_run": epochs_run,
        "steps": summary["steps"],
        "early_stopped": summary["early_stopped"],
        "wall_s": wall,
        "resumed": resumed,
        "valid": _metrics(summary["best_valid"]),
        "test": _metrics(test["model"]),
        "test_popularity": _metrics(test["popularity"]),
        "host": {"torch": torch.__version__, "platform": platform.platform(), "device": device.type,
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 "torch_threads": torch.get_num_threads()},
    }


def sweep(data_dir: Path, results: Path, grid: Grid, tcfg: TrainConfig, runs_dir: Path | None = None,
          strategies: tuple[str, ...] | None = None, log: Callable[[str], None] = print,
          runtime: Runtime | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run every grid point of `shard` (index, count) not yet in `results` (appending a row after
    each); returns all rows of the file."""
    i_shard, n_shards = shard
    if not 0 <= i_shard < n_shards:
        raise ValueError(f"shard {i_shard}/{n_shards}: the index must be in [0, {n_shards})")
    data = SumiData(data_dir)
    strategies = strategies or tuple(data.meta["strategies"])
    results = Path(results)
    runs_dir = Path(runs_dir) if runs_dir else results.with_name(results.stem + "_runs")
    done = {r["key"] for r in read_rows(results)}
    meta = {k: data.meta[k] for k in ("name", "counts", "prepare", "strategies", "notes")}
    configs = grid_configs(grid, data.vocab, strategies)
    layered = {arch: uses_layers(model_config(grid.preset, data.vocab, strategies, arch=arch))
               for arch in grid.models}
    for i, cfg in enumerate(configs, 1):
        if (i - 1) % n_shards != i_shard:
            continue
        key = run_key(cfg, tcfg, meta, layered[cfg.arch])
        if key in done:
            log(f"[{i}/{len(configs)}] {key}: in {results}, skipped")
            continue
        log(f"[{i}/{len(configs)}] {key}: training")
        row = run_one(cfg, tcfg, data, runs_dir / key, key, layered[cfg.arch], runtime)
        append_row(results, row)
        done.add(key)
        log(f"[{i}/{len(configs)}] {key}: {row['flops']['exact']:.3g} FLOPs/request, {row['epochs_run']:.2f} epochs "
            f"in {row['wall_s']:.0f}s; valid AUC {row['valid']['auc']:.4f}, test AUC {row['test']['auc']:.4f}")
    return read_rows(results)
