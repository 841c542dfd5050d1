"""Typed configuration: frozen dataclasses validated in `__post_init__`, and named presets.

`ModelConfig` holds everything the model needs (including vocabulary sizes, which come from
the prepared data), `TrainConfig` everything the training loop needs. Presets are small
functions: `tiny` for tests, then a size ladder for scaling work. Every DECIDE point of
docs/paper.md is a field here; `docs/design.md` gives the reasons for the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

STRATEGY_KINDS = ("recent", "pos", "neg", "scenario", "action")
ARCHS = ("climber", "dlrm", "din", "twin", "transformer", "hstu")


def parse_strategy(spec: str) -> tuple[str, str | None, int | None]:
    """Parse an extraction strategy spec into (kind, argument, max length or None).

    'recent' | 'pos:<task>' | 'neg:<task>' | 'scenario:<id>' | 'action:<id>', each optionally
    followed by '@<n>' to cap that sub-sequence below the block length (e.g. 'recent@10').
    """
    body, _, cap = spec.partition("@")
    kind, _, arg = body.partition(":")
    if kind not in STRATEGY_KINDS:
        raise ValueError(f"unknown extraction strategy {spec!r}; kinds are {STRATEGY_KINDS}")
    if (kind == "recent") != (arg == ""):
        raise ValueError(f"strategy {spec!r}: 'recent' takes no argument, the others need one")
    if kind in ("scenario", "action") and not arg.isdigit():
        raise ValueError(f"strategy {spec!r}: {kind} ids are integers >= 0 (a text column is coded 0..K-1 "
                         "in sorted order)")
    if cap and (not cap.isdigit() or int(cap) < 1):
        raise ValueError(f"strategy {spec!r}: length after '@' must be a positive integer")
    return kind, arg or None, int(cap) if cap else None


@dataclass(frozen=True)
class ModelConfig:
    """Climber model shape (docs/paper.md section 2).

    strategies: one multi-scale extraction strategy per block (N_b = len(strategies)), each
    pulling at most `seq_len` history events.  adaptive: dynamic temperature and relative
    bias tables per (block, scenario) (the ATL); False gives the "MSE only" ablation with a
    fixed sqrt(d_head) temperature and one shared bias table.  bgf: bit-wise gating fusion;
    False concatenates the block outputs straight into the head.
    """

    arch: str = "climber"  # or a baseline from climber/baselines (same data, training, evaluation)
    # vocabulary, filled from the prepared data's meta.json
    n_items: int = 100
    n_users: int = 10
    tasks: tuple[str, ...] = ("click",)
    n_actions: int = 1
    n_scenarios: int = 1
    item_feature_cards: tuple[int, ...] = ()  # values per side feature
    user_feature_cards: tuple[int, ...] = ()
    item_feature_widths: tuple[int, ...] = ()  # columns per side feature (> 1: a bag); empty: all 1
    user_feature_widths: tuple[int, ...] = ()
    # architecture
    strategies: tuple[str, ...] = ("recent",)
    seq_len: int = 50
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    ffn_mult: int = 4
    dropout: float = 0.1
    pos_buckets: int = 32
    time_buckets: int = 32
    adaptive: bool = True
    bgf: bool = True
    target_product: bool = False  # head also sees candidate embedding * each block output (model.py, step 6)
    match_readout: bool = True  # head also sees each candidate's mean and log-mean-exp logit per layer, block, head
    pooled_readout: bool = True  # head also sees DLRM's fields: candidate, mean history per block, their dots
    se_reduction: int = 4
    head_hidden: tuple[int, ...] = (256, 64)

    def __post_init__(self) -> None:
        for s in self.strategies:
            parse_strategy(s)
        if not self.strategies:
            raise ValueError("need at least one extraction strategy")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} not divisible by n_heads={self.n_heads}")
        if min(self.seq_len, self.n_layers, self.pos_buckets, self.time_buckets) < 1:
            raise ValueError("seq_len, n_layers and bucket counts must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if not self.tasks:
            raise ValueError("need at least one task")
        for cards, widths in ((self.item_feature_cards, self.item_feature_widths),
                              (self.user_feature_cards, self.user_feature_widths)):
            if widths and (len(widths) != len(cards) or min(widths) < 1):
                raise ValueError(f"feature widths {widths} must be positive, one per feature (cards {cards})")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")

    @property
    def n_blocks(self) -> int:
        return len(self.strategies)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class TrainConfig:
    """Training loop settings; the model knows nothing of these (nor of the device, kernels and
    compilation: `climber.runtime.Runtime`)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    # embedding tables' learning rate / lr: each row is updated only when its id is in the batch
    embedding_lr_mult: float = 1.0
    # batches per window whose requests are sorted by history length before batching (0: off):
    # less padding, so less compute per step (SumiData.bucket_by_length)
    bucket_window: int = 0
    weight_decay: float = 0.01
    embedding_weight_decay: float = 0.0  # decoupled weight decay on the embedding tables
    # implicit data: negatives per positive for each training request, drawn afresh every epoch
    # (seeded by seed, epoch and batch); validation and test keep the prepared, fixed ones
    train_negatives: int = 4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # steps between validations; 0 = twice per epoch
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at each validation
    # also checkpoint when this many minutes passed since the last one (checked every log_every
    # steps; 0 = off), so a kill loses minutes, not an epoch
    checkpoint_minutes: float = 5.0
    patience: int = 3  # validations without AUC gain before early stopping
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)
    log_every: int = 10  # steps between logged losses (each costs a host sync)
    task_weights: tuple[float, ...] = ()  # empty = equal weights
    num_workers: int = 0
    keep_checkpoints: int = 2
    tensorboard: bool = False  # also log to <out>/tensorboard (the [tensorboard] extra)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.lr <= 0 or self.embedding_lr_mult <= 0:
            raise ValueError("lr and embedding_lr_mult must be positive")
        if self.train_negatives < 1 or self.embedding_weight_decay < 0:
            raise ValueError("train_negatives must be at least 1 and embedding_weight_decay >= 0")
        if self.bucket_window < 0:
            raise ValueError("bucket_window must be >= 0")
        if self.patience < 1 or self.keep_checkpoints < 1:
            raise ValueError("patience and keep_checkpoints must be at least 1")
        if self.checkpoint_minutes < 0 or self.log_every < 1:
            raise ValueError("checkpoint_minutes must be >= 0 and log_every at least 1")


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip=(), defaults_none: bool = False) -> None:
    """One command-line flag per field of the config dataclass `cls`, typed from its annotation."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if defaults_none else f.default
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.type.startswith("tuple"):
            elem = float if "float" in f.type else int if "int" in f.type else str
            p.add_argument(flag, nargs="*", type=elem, default=default)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=default)


def pick_fields(ns: argparse.Namespace, cls, skip=()) -> dict:
    """The fields of `cls` that were given (not None) in parsed arguments `ns`."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if f.name not in skip and v is not None:
            out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


RETIRED_FIELDS = {"attention", "device", "compile"}  # runtime settings older run configs saved


def from_dict(cls, d: dict):
    """Build a config dataclass from a dict, turning JSON lists back into tuples; runtime
    settings saved by older versions are dropped."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def save_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---- presets: architecture only; vocabulary comes from data -------------------------------------


@dataclass(frozen=True)
class Preset:
    seq_len: int
    d_model: int
    n_heads: int
    n_layers: int
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(seq_len=8, d_model=16, n_heads=2, n_layers=1, extra={"head_hidden": (16,)}),
    "small": Preset(seq_len=50, d_model=64, n_heads=2, n_layers=2),
    "base": Preset(seq_len=200, d_model=128, n_heads=4, n_layers=2),
    "large": Preset(seq_len=800, d_model=256, n_heads=4, n_layers=12),
    "paper": Preset(seq_len=200, d_model=512, n_heads=8, n_layers=12),
}


def model_config(preset: str, vocab: dict, strategies: tuple[str, ...], **overrides) -> ModelConfig:
    """A ModelConfig from a named preset, the data's vocabulary and per-run overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    kw = dict(seq_len=p.seq_len, d_model=p.d_model, n_heads=p.n_heads, n_layers=p.n_layers, **p.extra)
    kw.update(vocab)
    kw["strategies"] = tuple(strategies)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**kw)
