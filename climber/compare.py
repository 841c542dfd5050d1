"""The Table 2 comparison (docs/paper.md section 4): Climber, its two ablations and the baselines
trained with one budget on one prepared data set, several seeds each, every run tested at its
best validation checkpoint.

Fairness: every model gets the same data, extraction strategies, preset sizes (d, heads,
layers, seq_len, head), epochs, batch, schedule and early stopping; the only per-model choice
is the learning rate from one grid shared by all models, picked by mean validation AUC over
the seeds (the test split is evaluated only for the picked rate). With a one-value grid no
tuning happens, and the report says so.

The report (stdout, `<out>/compare.md`, `<out>/compare.json`) gives test AUC, GAUC and LogLoss
as mean ± sample std over seeds (means over tasks), the relative AUC improvement over DLRM,
parameter counts, forward FLOPs per request, a popularity reference, the exact command and
the versions. Runs live in `<out>/runs/<model>/lr<lr>/seed<seed>/`; a finished run is skipped
when the comparison is run again, an interrupted one resumes (`climber.train`), so separate
processes may train disjoint `models` into one `out` and a last call writes the full table.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from climber import checkpoint
from climber.config import ModelConfig, TrainConfig, model_config
from climber.data.sumi import SumiData
from climber.evaluate import popularity_scores
from climber.metrics import evaluate_predictions
from climber.model import make_model
from climber.runtime import Runtime, apply, resolve_device
from climber.train import predict, train

# model name -> ModelConfig fields; table rows follow the paper's Table 2 order
MODELS: dict[str, dict] = {
    "dlrm": {"arch": "dlrm"},
    "din": {"arch": "din"},
    "twin": {"arch": "twin"},
    "transformer": {"arch": "transformer"},
    "hstu": {"arch": "hstu"},
    "climber-mse": {"arch": "climber", "adaptive": False, "bgf": False},  # "without ATL and BGF (MSE only)"
    "climber-nobgf": {"arch": "climber", "bgf": False},  # "without BGF"
    "climber": {"arch": "climber"},
    "climber-tp": {"arch": "climber", "target_product": True},  # + the target-product readout (model.py, step 6)
}
METRICS = ("auc", "gauc", "logloss")


def compare(data_dir: Path, out_dir: Path, models: Sequence[str], seeds: Sequence[int], preset: str = "small",
            train_cfg: TrainConfig | None = None, lrs: Sequence[float] = (), model_overrides: dict | None = None,
            command: str = "", runtime: Runtime | None = None) -> dict:
    """Train (or skip) every (model, lr, seed) run, test the picked ones, write and return the report."""
    runtime = runtime or Runtime()
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models or not seeds:
        raise ValueError(f"need models from {list(MODELS)} (unknown: {unknown}) and at least one seed")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    train_cfg = train_cfg or TrainConfig()
    data = SumiData(data_dir)
    grid = tuple(lrs) or (train_cfg.lr,)
    # FLOPs at the typical request: the mean candidate count (implicit data sets add sampled
    # negatives, so prepare's max_candidates is not the number of candidates)
    n_cand = max(1, round(float(np.diff(data.a["req_cand_start"]).mean())))
    device = resolve_device(runtime.device)
    shared = model_config(preset, data.vocab, tuple(data.meta["strategies"]), **(model_overrides or {}))
    rows = []
    for name in sorted(models, key=list(MODELS).index):
        mcfg = replace(shared, **MODELS[name])
        runs = {lr: [_run(data_dir, out_dir / "runs" / name / f"lr{lr:g}" / f"seed{s}", mcfg,
                          replace(train_cfg, lr=lr, seed=s), name, runtime) for s in seeds] for lr in grid}
        # model selection on validation only: the grid value with the best mean validation AUC
        valid_auc = {lr: float(np.mean([r["valid"]["mean"]["auc"] for r in rs])) for lr, rs in runs.items()}
        lr = max(grid, key=lambda x: valid_auc[x])
        tests = [_test(data, r, runtime, train_cfg.batch_size * 2) for r in runs[lr]]
        model = make_model(mcfg)
        rows.append({
            "model": name, "config": MODELS[name], "lr": lr, "seeds": list(seeds),
            "valid_auc_by_lr": {f"{k:g}": v for k, v in valid_auc.items()}, "test_per_seed": tests,
            **{m: _mean_std([t["mean"][m] for t in tests]) for m in METRICS},
            "params": model.param_counts(), "flops": model.flops(mcfg.seq_len, n_cand),
            "train_seconds": float(np.mean([r["train_seconds"] for r in runs[lr]])),
            "steps": float(np.mean([r["steps"] for r in runs[lr]])),
        })
    base = next((r["auc"]["mean"] for r in rows if r["model"] == "dlrm"), None)
    for r in rows:  # relative AUC improvement over DLRM: AUC / AUC_DLRM - 1
        r["auc_impr_vs_dlrm"] = r["auc"]["mean"] / base - 1 if base else None
    report = {
        "dataset": data.meta["name"], "data": str(data_dir.resolve()), "tasks": list(data.tasks),
        "test_candidates": data.meta["counts"]["candidates_test"], "strategies": data.meta["strategies"],
        "preset": preset, "model_overrides": model_overrides or {}, "train": asdict(train_cfg), "lr_grid": list(grid),
        "seeds": list(seeds), "flops_at": {"L": shared.seq_len, "M": n_cand}, "tuning": _tuning(grid, len(seeds)),
        "command": command, "versions": _versions(device), "rows": rows,
        "popularity": evaluate_predictions(*popularity_scores(data, "test"), data.tasks)["mean"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    md = to_markdown(report)
    (out_dir / "compare.md").write_text(md + "\n")
    print(md)
    return report


def _run(data_dir: Path, run_dir: Path, mcfg: ModelConfig, tcfg: TrainConfig, name: str, runtime: Runtime) -> dict:
    """Train one run unless `run_dir/run.json` says it finished under this exact config."""
    done = run_dir / "run.json"
    config = json.loads(json.dumps({"model": asdict(mcfg), "train": asdict(tcfg)}))  # tuples -> lists, as saved
    if done.exists():
        saved = json.loads(done.read_text())
        if saved["config"] != config:
            raise ValueError(f"{run_dir} holds a run with a different config; use another --out or delete it")
        print(f"[compare] {name} lr={tcfg.lr:g} seed={tcfg.seed}: finished earlier, skipped")
        return saved
    print(f"[compare] {name} lr={tcfg.lr:g} seed={tcfg.seed}: training into {run_dir}")
    t0 = time.time()
    summary = train(data_dir, run_dir, mcfg, tcfg, runtime, progress=False)
    result = {"config": config, "run_dir": str(run_dir), "valid": summary["best_valid"], "steps": summary["steps"],
              "best_step": summary["best_step"], "early_stopped": summary["early_stopped"],
              "train_seconds": time.time() - t0}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _test(data: SumiData, run: dict, runtime: Runtime, batch_size: int) -> dict:
    """Test metrics of a run's best validation checkpoint, computed once and kept in test.json."""
    path = Path(run["run_dir"]) / "test.json"
    if not path.exists():
        model, _ = checkpoint.load_model(Path(run["run_dir"]) / "best")
        device = apply(model, runtime)
        res = evaluate_predictions(*predict(model, data, "test", batch_size, device), data.tasks)
        path.write_text(json.dumps(res, indent=2) + "\n")
    return json.loads(path.read_text())


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def _tuning(grid: tuple[float, ...], n_seeds: int) -> str:
    if len(grid) == 1:
        return (f"none. Every model trained once per seed with lr={grid[0]:g} and the same preset and training "
                f"settings; nothing was chosen per model.")
    return (f"learning rate picked per model from the grid {{{', '.join(f'{x:g}' for x in grid)}}}, the same for "
            f"every model, by mean validation AUC over {n_seeds} seed(s) ({len(grid) * n_seeds} runs per model); "
            f"the test split was evaluated only for the picked rate. Everything else is identical for all models.")


def _versions(device: torch.device) -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. a copied tree)
        commit, dirty = None, None
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "git_commit": commit, "git_dirty": dirty, "device": str(device), "platform": platform.platform()}
    if device.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(device)
    return v


def _pm(s: dict[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def to_markdown(r: dict) -> str:
    t = r["train"]
    overrides = f" with {r['model_overrides']}" if r["model_overrides"] else ""
    every = f"every {t['eval_every']} steps" if t["eval_every"] else "once per epoch"
    lines = [
        f"## {r['dataset']}: test, {r['test_candidates']} candidates, tasks {', '.join(r['tasks'])} "
        f"(mean over tasks; mean ± std over seeds {r['seeds']})",
        "",
        "| model | AUC | GAUC | LogLoss | AUC vs DLRM | params dense | params total | FLOPs/request | lr | valid AUC "
        "| steps | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        impr = "-" if row["auc_impr_vs_dlrm"] is None else f"{100 * row['auc_impr_vs_dlrm']:+.2f}%"
        va = row["valid_auc_by_lr"][f"{row['lr']:g}"]
        lines.append(f"| {row['model']} | {_pm(row['auc'])} | {_pm(row['gauc'])} | {_pm(row['logloss'])} | {impr} "
                     f"| {row['params']['dense']:,} | {row['params']['total']:,} | {row['flops']['exact']:.3g} "
                     f"| {row['lr']:g} | {va:.4f} | {row['steps']:.0f} | {row['train_seconds']:.0f} |")
    p = r["popularity"]
    lines.append(f"| popularity (train positive rate) | {p['auc']:.4f} | {p['gauc']:.4f} | {p['logloss']:.4f} "
                 f"| | | | | | | | |")
    v = r["versions"]
    lines += [
        "",
        f"Budget, identical for every model: preset `{r['preset']}`{overrides}, extraction strategies "
        f"{r['strategies']} (single-sequence baselines read block 0, `recent`), {t['epochs']} epoch(s), batch "
        f"{t['batch_size']}, embedding tables at {t.get('embedding_lr_mult', 1):g}x the learning rate, warm-up "
        f"{t['warmup_steps']} steps then cosine decay, validation {every}, early "
        f"stopping after {t['patience']} validations without gain, max_steps {t['max_steps'] or 'none'}; every "
        "run is tested at its best validation checkpoint.",
        f"Tuning: {r['tuning']}",
        "AUC vs DLRM = mean AUC / mean DLRM AUC - 1. FLOPs/request: forward matmul FLOPs (as "
        f"torch.utils.flop_counter counts them) at L={r['flops_at']['L']} history events per block and "
        f"M={r['flops_at']['M']} candidates (the mean per request). steps and train s: per run, mean over seeds.",
        f"Command: `{r['command']}`",
        f"Versions: python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, climber commit "
        f"{v['git_commit']}{' (uncommitted changes)' if v['git_dirty'] else ''}, device {v.get('gpu', v['device'])}.",
    ]
    return "\n".join(lines)
