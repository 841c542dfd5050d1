"""The Table 2 comparison (docs/paper.md section 4): Climber, its two ablations and the baselines
trained with one budget on one prepared data set, several seeds each, every run tested at its
best validation checkpoint.

Fairness: every model gets the same data, extraction strategies, preset sizes (d, heads,
layers, seq_len, head), epoch cap, batch, schedule, freshly drawn training negatives and early
stopping; the only per-model choice is one point of a grid shared by all models over the
learning rate, the embedding tables' rate multiplier and their weight decay (`TUNED`), picked
by mean validation AUC over the seeds (the test split is evaluated only for the picked point).
With a one-point grid no tuning happens, and the report says so.

The report (stdout, `<out>/compare.md`, `<out>/compare.json`) gives test AUC, GAUC and LogLoss
as mean ± sample std over seeds (means over tasks), the relative AUC improvement over DLRM,
parameter counts, forward FLOPs per request, a popularity reference, the exact command and
the versions. Runs live in `<out>/runs/<model>/lr<lr>/seed<seed>/`; a finished run is skipped
when the comparison is run again, an interrupted one resumes (`climber.train`), so separate
processes may train disjoint `models` into one `out` and a last call writes the full table.

On multi-scenario data (docs/scenarios.md) the `climber-per-domain` row trains one
Climber per request scenario on that scenario's requests (`TrainConfig.scenarios`; runs in
`.../seed<seed>/scenario<k>/`) and tests each on its scenario's test requests; its overall
metrics are over the union of those predictions, the same candidates as every other row's.
"""

from __future__ import annotations

import itertools
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
from climber.config import COMPARE_MODELS, TUNED, ModelConfig, TrainConfig, model_config, with_added_fields
from climber.data.sumi import SumiData
from climber.evaluate import by_scenario, popularity_scores
from climber.metrics import evaluate_predictions
from climber.model import make_model
from climber.runtime import Runtime, apply, resolve_device
from climber.train import predict, train

METRICS = ("auc", "gauc", "logloss")
_TAG = {"lr": "lr", "embedding_lr_mult": "emb", "embedding_weight_decay": "ewd", "train_negatives": "neg"}


def model_for(shared: ModelConfig, name: str) -> ModelConfig:
    """The shared config with model `name`'s fields; "grow": g multiplies seq_len and n_layers;
    "per_domain" (one model per scenario) is the comparison's business, not the model's."""
    spec = dict(COMPARE_MODELS[name])
    g = spec.pop("grow", 1)
    spec.pop("per_domain", None)
    return replace(shared, **spec, seq_len=shared.seq_len * g, n_layers=shared.n_layers * g)


def grid_points(train_cfg: TrainConfig, grid: dict[str, Sequence[float]] | None) -> list[dict[str, float]]:
    """Every combination of the grid's values; an axis not given keeps train_cfg's value."""
    grid = grid or {}
    unknown = set(grid) - set(TUNED)
    if unknown:
        raise ValueError(f"grid axes must be among {TUNED}, not {sorted(unknown)}")
    axes = [tuple(grid.get(k) or (getattr(train_cfg, k),)) for k in TUNED]
    return [dict(zip(TUNED, values)) for values in itertools.product(*axes)]


def point_tag(point: dict[str, float]) -> str:
    """A grid point's run-directory name, e.g. lr0.003_emb10_ewd0_neg4."""
    return "_".join(f"{_TAG[k]}{point[k]:g}" for k in TUNED)


def compare(data_dir: Path, out_dir: Path, models: Sequence[str], seeds: Sequence[int], preset: str = "small",
            train_cfg: TrainConfig | None = None, grid: dict[str, Sequence[float]] | None = None,
            model_overrides: dict | None = None, command: str = "", runtime: Runtime | None = None,
            train_only: bool = False, domain: int | None = None) -> dict | None:
    """Train (or skip) every (model, grid point, seed) run, test the picked ones, write and return
    the report. `grid`: values per axis of `TUNED`; an axis left out keeps train_cfg's value.
    `train_only`: train the runs and stop (no test, no report), for jobs that train parts of one
    comparison in parallel; a last call without it picks, tests and reports. `domain` (implies
    `train_only`): a per-domain row trains only that request scenario's models, so that parallel
    jobs can train a row's domains side by side."""
    runtime = runtime or Runtime()
    unknown = sorted(set(models) - set(COMPARE_MODELS))
    if unknown or not models or not seeds:
        raise ValueError(f"need models from {list(COMPARE_MODELS)} (unknown: {unknown}) and at least one seed")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    train_cfg = train_cfg or TrainConfig()
    data = SumiData(data_dir)
    if not data.implicit:  # explicit logs have no sampled training negatives: that axis would repeat runs
        grid = {k: v for k, v in (grid or {}).items() if k != "train_negatives"}
    points = grid_points(train_cfg, grid)
    # FLOPs at the typical request: the mean candidate count (implicit data sets add sampled
    # negatives, so prepare's max_candidates is not the number of candidates)
    n_cand = max(1, round(float(np.diff(data.a["req_cand_start"]).mean())))
    device = resolve_device(runtime.device)
    shared = model_config(preset, data.vocab, tuple(data.meta["strategies"]), **(model_overrides or {}))
    domains = [int(k) for k in np.unique(data.a["req_scenario"])]  # the request scenarios the data has
    if any(COMPARE_MODELS[m].get("per_domain") for m in models) and len(domains) < 2:
        raise ValueError(f"climber-per-domain trains one model per request scenario, and {data_dir} has one "
                         f"({domains}); compare it on a multi-scenario data set (e.g. prepare beauty+grocery)")
    if domain is not None:
        if domain not in domains:
            raise ValueError(f"--domain {domain}: {data_dir} has request scenarios {domains}")
        train_only = True
    rows = []
    for name in sorted(models, key=list(COMPARE_MODELS).index):
        mcfg = model_for(shared, name)
        per_domain = COMPARE_MODELS[name].get("per_domain", False)
        split = ([domain] if domain is not None else domains) if per_domain else None
        runs = {point_tag(p): [_seed_run(data_dir, out_dir / "runs" / name / point_tag(p) / f"seed{s}", mcfg,
                                         replace(train_cfg, **p, seed=s), name, runtime, split) for s in seeds]
                for p in points}
        if train_only:
            continue
        # model selection on validation only: the grid point with the best mean validation AUC
        valid_auc = {tag: float(np.mean([r["valid"]["mean"]["auc"] for r in rs])) for tag, rs in runs.items()}
        best = max(points, key=lambda p: valid_auc[point_tag(p)])
        tests, scen_tests = zip(*(_test(data, r, runtime, train_cfg.batch_size * 2) for r in runs[point_tag(best)]))
        model = make_model(mcfg)
        rows.append({
            "model": name, "config": COMPARE_MODELS[name], "lr": best["lr"], "picked": best, "seeds": list(seeds),
            "valid_auc_by_point": valid_auc, "test_per_seed": list(tests),
            "auc_by_scenario": None if scen_tests[0] is None else
            {s: _mean_std([t[s]["mean"]["auc"] for t in scen_tests]) for s in scen_tests[0]},
            **{m: _mean_std([t["mean"][m] for t in tests]) for m in METRICS},
            # per domain: every domain model's parameters (each holds whole tables), one model's FLOPs,
            # since a request is scored by its scenario's model only
            "params": {k: v * (len(domains) if per_domain else 1) for k, v in model.param_counts().items()},
            "flops": model.flops(mcfg.seq_len, n_cand), "domain_models": len(domains) if per_domain else None,
            "train_seconds": float(np.mean([r["train_seconds"] for r in runs[point_tag(best)]])),
            "steps": float(np.mean([r["steps"] for r in runs[point_tag(best)]])),
            "best_steps": float(np.mean([r["best_step"] for r in runs[point_tag(best)]])),
            "trained_on": sorted({r.get("trained_on", "unrecorded") for r in runs[point_tag(best)]}),
        })
    if train_only:
        return None
    _set_vs_dlrm(rows)
    report = {
        "dataset": data.meta["name"], "data": str(data_dir.resolve()), "tasks": list(data.tasks),
        "implicit": data.implicit,
        "test_candidates": data.meta["counts"]["candidates_test"], "strategies": data.meta["strategies"],
        "preset": preset, "model_overrides": model_overrides or {}, "train": asdict(train_cfg),
        "grid": {k: sorted({p[k] for p in points}) for k in TUNED}, "seeds": list(seeds),
        "flops_at": {"L": shared.seq_len, "M": n_cand}, "tuning": _tuning(points, len(seeds)),
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
        was = {**saved["config"], "train": with_added_fields(TrainConfig, saved["config"]["train"])}
        if was != config:
            raise ValueError(f"{run_dir} holds a run with a different config; use another --out or delete it")
        print(f"[compare] {name} lr={tcfg.lr:g} seed={tcfg.seed}: finished earlier, skipped")
        return {**saved, "run_dir": str(run_dir)}  # where it is now: runs trained elsewhere can be copied in
    print(f"[compare] {name} lr={tcfg.lr:g} seed={tcfg.seed}: training into {run_dir}")
    t0 = time.time()
    summary = train(data_dir, run_dir, mcfg, tcfg, runtime, progress=False)
    result = {"config": config, "run_dir": str(run_dir), "valid": summary["best_valid"], "steps": summary["steps"],
              "best_step": summary["best_step"], "early_stopped": summary["early_stopped"],
              "train_seconds": time.time() - t0, "trained_on": _device_name(resolve_device(runtime.device))}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _seed_run(data_dir: Path, run_dir: Path, mcfg: ModelConfig, tcfg: TrainConfig, name: str, runtime: Runtime,
              domains: list[int] | None) -> dict:
    """One seed of a row: one run, or with `domains` one run per request scenario in
    run_dir/scenario<k>, trained and validated on that scenario's requests, seen as one run:
    their validation AUCs averaged (the grid pick's score), their steps and training time summed
    (the row's cost), tested at run_dir (`_test`)."""
    if domains is None:
        return _run(data_dir, run_dir, mcfg, tcfg, name, runtime)
    runs = [_run(data_dir, run_dir / f"scenario{k}", mcfg, replace(tcfg, scenarios=(k,)), f"{name} scenario {k}",
                 runtime) for k in domains]
    return {"run_dir": str(run_dir), "domains": {str(k): r["run_dir"] for k, r in zip(domains, runs, strict=True)},
            "valid": {"mean": {"auc": float(np.mean([r["valid"]["mean"]["auc"] for r in runs]))}},
            **{k: sum(r[k] for r in runs) for k in ("steps", "best_step", "train_seconds")},
            "trained_on": ", ".join(sorted({r.get("trained_on", "unrecorded") for r in runs}))}


def _predict_test(data: SumiData, run: dict, runtime: Runtime, batch_size: int) -> tuple[np.ndarray, ...]:
    """(users, labels, probs) over every test candidate, in `predict`'s order: by the run's best
    checkpoint, or for a per-domain run each scenario's candidates by that scenario's model."""
    if not run.get("domains"):
        return _predict_best(Path(run["run_dir"]), data, runtime, batch_size)
    reqs = data.requests("test")
    scen = np.repeat(data.a["req_scenario"][reqs], np.diff(data.a["req_cand_start"])[reqs])  # (C,)
    out = None
    for k, run_dir in run["domains"].items():
        part = _predict_best(Path(run_dir), SumiData(data.root, (int(k),)), runtime, batch_size)
        at = scen == int(k)
        if at.sum() != len(part[0]):
            raise ValueError(f"{len(part[0])} predictions for the {at.sum()} test candidates of scenario {k}")
        if out is None:
            out = tuple(np.zeros((len(scen), *x.shape[1:]), x.dtype) for x in part)
        for whole, x in zip(out, part, strict=True):
            whole[at] = x
    return out


def _predict_best(run_dir: Path, data: SumiData, runtime: Runtime, batch_size: int) -> tuple[np.ndarray, ...]:
    model, _ = checkpoint.load_model(run_dir / "best")
    return predict(model, data, "test", batch_size, apply(model, runtime))


def _test(data: SumiData, run: dict, runtime: Runtime, batch_size: int) -> tuple[dict, dict | None]:
    """Test metrics of a run's best validation checkpoint (per-domain: of its domain models,
    each on its scenario's requests), computed once and kept in test.json, and on
    multi-scenario data per request scenario (test_by_scenario.json; else None)."""
    path, scen_path = Path(run["run_dir"]) / "test.json", Path(run["run_dir"]) / "test_by_scenario.json"
    multi = data.meta["vocab"]["n_scenarios"] > 1
    if not path.exists() or (multi and not scen_path.exists()):
        users, labels, probs = _predict_test(data, run, runtime, batch_size)
        path.write_text(json.dumps(evaluate_predictions(users, labels, probs, data.tasks), indent=2) + "\n")
        if multi:
            scen_path.write_text(json.dumps(by_scenario(data, "test", users, labels, probs), indent=2) + "\n")
    return json.loads(path.read_text()), json.loads(scen_path.read_text()) if multi else None


# what makes two reports one comparison: same data split, budget, grid, seeds and FLOPs point
PROTOCOL = ("dataset", "tasks", "implicit", "test_candidates", "strategies", "preset", "model_overrides", "train",
            "grid", "seeds", "flops_at", "tuning", "popularity")


def merge(reports: Sequence[dict]) -> dict:
    """Several `compare` reports of one protocol (`PROTOCOL`: the same data split, budget, grid and
    seeds), each with other models (e.g. rows trained in different calls or on different
    machines), as one report: rows in `COMPARE_MODELS` order, AUC vs DLRM recomputed, and each
    source's command and versions kept under `sources`. Reports that differ in the protocol or
    share a model are refused, naming what differs."""
    if len(reports) < 2:
        raise ValueError("merge needs two or more reports")
    first = reports[0]
    for r in reports[1:]:
        differ = [k for k in PROTOCOL if _canonical(r.get(k)) != _canonical(first.get(k))]
        if differ:
            raise ValueError(f"reports of different protocols cannot be merged: {differ} differ")
    models = [row["model"] for r in reports for row in r["rows"]]
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise ValueError(f"models in more than one report: {twice}")
    order = list(COMPARE_MODELS)
    rows = sorted((dict(row) for r in reports for row in r["rows"]), key=lambda row: order.index(row["model"]))
    _set_vs_dlrm(rows)
    sources = [s for r in reports for s in r.get("sources") or [{"models": [row["model"] for row in r["rows"]],
                                                                  "command": r["command"], "versions": r["versions"]}]]
    return {**{k: first[k] for k in first if k not in ("rows", "command", "versions", "sources")},
            "rows": rows, "sources": sources}


def _set_vs_dlrm(rows: list[dict]) -> None:
    """Each row's relative AUC improvement over DLRM's row, AUC / AUC_DLRM - 1 (None without one)."""
    base = next((r["auc"]["mean"] for r in rows if r["model"] == "dlrm"), None)
    for r in rows:
        r["auc_impr_vs_dlrm"] = r["auc"]["mean"] / base - 1 if base else None


def _canonical(value) -> str:
    """JSON text with sorted keys: equal for equal values, a NaN metric (one class only) included."""
    return json.dumps(value, sort_keys=True)


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def _tuning(points: list[dict[str, float]], n_seeds: int) -> str:
    if len(points) == 1:
        return (f"none. Every model trained once per seed with {_point_text(points[0])} and the same preset and "
                f"training settings; nothing was chosen per model.")
    axes = ", ".join(f"{k} {{{', '.join(f'{v:g}' for v in sorted({p[k] for p in points}))}}}" for k in TUNED)
    return (f"one point picked per model from the grid {axes} ({len(points)} points), the same for every model, "
            f"by mean validation AUC over {n_seeds} seed(s) ({len(points) * n_seeds} runs per model); the test split "
            f"was evaluated only for the picked point. Everything else is identical for all models.")


def _point_text(p: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in p.items())


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
        v["gpu"] = _device_name(device)
    return v


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _pm(s: dict[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def to_markdown(r: dict) -> str:
    t = r["train"]
    averaged = f" on an exponential moving average of the weights (decay {t['ema']:g})" if t["ema"] else ""
    overrides = f" with {r['model_overrides']}" if r["model_overrides"] else ""
    every = f"every {t['eval_every']} steps" if t["eval_every"] else "twice per epoch"
    lines = [
        f"## {r['dataset']}: test, {r['test_candidates']} candidates, tasks {', '.join(r['tasks'])} "
        f"(mean over tasks; mean ± std over seeds {r['seeds']})",
        "",
        "| model | AUC | GAUC | LogLoss | AUC vs DLRM | params dense | params total | FLOPs/request | picked "
        "| valid AUC | best step / steps | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        impr = "-" if row["auc_impr_vs_dlrm"] is None else f"{100 * row['auc_impr_vs_dlrm']:+.2f}%"
        va = row["valid_auc_by_point"][point_tag(row["picked"])]
        lines.append(f"| {row['model']} | {_pm(row['auc'])} | {_pm(row['gauc'])} | {_pm(row['logloss'])} | {impr} "
                     f"| {row['params']['dense']:,} | {row['params']['total']:,} | {row['flops']['exact']:.3g} "
                     f"| {point_tag(row['picked'])} | {va:.4f} | {row['best_steps']:.0f} / {row['steps']:.0f} "
                     f"| {row['train_seconds']:.0f} |")
    p = r["popularity"]
    lines.append(f"| popularity (train positive rate) | {p['auc']:.4f} | {p['gauc']:.4f} | {p['logloss']:.4f} "
                 f"| | | | | | | | |")
    scenarios = next((list(row["auc_by_scenario"]) for row in r["rows"] if row.get("auc_by_scenario")), [])
    if scenarios:  # multi-scenario data: each model's test AUC on each scenario's requests
        lines += ["", "Test AUC per request scenario:", "",
                  "| model | " + " | ".join(f"scenario {s}" for s in scenarios) + " |",
                  "|---|" + "---|" * len(scenarios)]
        lines += [f"| {row['model']} | " + " | ".join(_pm(row["auc_by_scenario"][s]) for s in scenarios) + " |"
                  for row in r["rows"]]
    per_domain = [row for row in r["rows"] if row.get("domain_models")]
    if per_domain:
        lines += ["", f"{per_domain[0]['model']}: {per_domain[0]['domain_models']} Climbers, one per request scenario, "
                  "each trained and validated on its scenario's requests only (histories keep all of a user's events) "
                  "and tested on its scenario's test requests; the row's metrics are over the union of their test "
                  "predictions, the same candidates as the other rows'. Its grid point is picked by the domain models' "
                  "mean validation AUC; params are the sum over the domain models (each holds whole embedding "
                  "tables); FLOPs/request are one domain model's, since a request is scored by its scenario's model "
                  "only; best step / steps and train s are summed over the domain models."]
    where = {}
    for row in r["rows"]:
        where.setdefault(", ".join(row.get("trained_on", ["unrecorded"])), []).append(row["model"])
    lines += [
        "",
        f"Budget, identical for every model: preset `{r['preset']}`{overrides}, extraction strategies "
        f"{r['strategies']} (single-sequence baselines read block 0, `recent`), at most {t['epochs']} epoch(s), "
        f"batch {t['batch_size']}, warm-up {t['warmup_steps']} steps then cosine decay over the epoch cap, "
        f"validation {every}{averaged}, early stopping after {t['patience']} validations without gain, "
        f"max_steps {t['max_steps'] or 'none'}; every run is tested at its best validation checkpoint. "
        + ("Training negatives (a grid axis, per positive) drawn afresh every epoch (validation and test keep the "
           "prepared ones)." if r.get("implicit") else ""),
        f"Tuning: {r['tuning']}",
        "AUC vs DLRM = mean AUC / mean DLRM AUC - 1. picked: the grid point (learning rate, embedding rate "
        "multiplier, embedding weight decay, training negatives per positive). FLOPs/request: forward matmul FLOPs (as "
        f"torch.utils.flop_counter counts them) at L={r['flops_at']['L']} history events per block and "
        f"M={r['flops_at']['M']} candidates (the mean per request). best step / steps and train s: per run, mean "
        "over seeds.",
        "Trained on: " + "; ".join(f"{d} ({', '.join(m)})" for d, m in where.items()) + ". "
        + (f"Merged from {len(r['sources'])} comparisons of this protocol (`climber.compare.merge`):"
           if r.get("sources") else _source_text(r)),
    ]
    lines += [f"- {', '.join(src['models'])}: {_source_text(src, 'the call that picked and tested these rows')}"
              for src in r.get("sources") or []]
    return "\n".join(lines)


def _source_text(r: dict, what: str = "the last call, which picks, tests and writes this table") -> str:
    v = r["versions"]
    return (f"Command ({what}): `{r['command']}`\n"
            f"Versions: python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, climber commit "
            f"{v['git_commit']}{' (uncommitted changes)' if v['git_dirty'] else ''}, "
            f"device {v.get('gpu', v['device'])}.")
