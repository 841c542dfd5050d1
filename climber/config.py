"""Typed configuration: frozen dataclasses validated in `__post_init__`, named presets, and the
command line and config files built from them.

`PrepareConfig` says how a log becomes SUMI samples, `ModelConfig` holds everything the model
needs (including vocabulary sizes, which come from the prepared data), `TrainConfig` everything
the training loop needs, `Runtime` where and how fast a model runs (`climber/runtime.py`
applies it). Presets are small functions: `tiny` for tests, then a size ladder for scaling
work. Every DECIDE point of docs/paper.md is a field here; `docs/design.md` gives the reasons
for the defaults. A field's comment is its `--help` text, its `choices` metadata the flag's
choices. This module imports no torch, so `climber --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

STRATEGY_KINDS = ("recent", "pos", "neg", "scenario", "action")
ARCHS = ("climber", "dlrm", "din", "twin", "transformer", "hstu")
BACKENDS = ("auto", "reference", "triton")  # attention backends (climber/ops)


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
class PrepareConfig:
    """How events become SUMI samples. `request_gap` is in the log's time unit (seconds)."""

    request_gap: int = 60  # a user's events in one scenario at most this far apart (log time unit: s) form a request
    max_candidates: int = 20  # candidates per request (a longer run of events starts a new request)
    negatives: int = 4  # implicit logs only: sampled negatives per positive
    eval_requests: int = 1  # per user: last k requests test, the k before validation
    seed: int = 0  # seeds the sampled negatives
    drop_duplicates: bool = True  # rows equal to an earlier one in every column: dropped, counted in meta

    def __post_init__(self) -> None:
        if self.request_gap < 0 or self.max_candidates < 1 or self.negatives < 0 or self.eval_requests < 1:
            raise ValueError(f"invalid PrepareConfig {self}")


@dataclass(frozen=True)
class ModelConfig:
    """Climber model shape (docs/paper.md section 2).

    strategies: one multi-scale extraction strategy per block (N_b = len(strategies)), each
    pulling at most `seq_len` history events.  adaptive: dynamic temperature and relative
    bias tables per (block, scenario) (the ATL); False gives the "MSE only" ablation with a
    fixed sqrt(d_head) temperature and one shared bias table.  bgf: bit-wise gating fusion;
    False concatenates the block outputs straight into the head.
    """

    # the model: Climber or a baseline from climber/baselines (same data, training, evaluation)
    arch: str = field(default="climber", metadata={"choices": ARCHS})
    # vocabulary, filled from the prepared data's meta.json (not flags)
    n_items: int = 100
    n_users: int = 10
    tasks: tuple[str, ...] = ("click",)
    n_actions: int = 1
    n_scenarios: int = 1
    item_feature_cards: tuple[int, ...] = ()  # values per side feature
    user_feature_cards: tuple[int, ...] = ()
    item_feature_widths: tuple[int, ...] = ()  # columns per side feature (> 1: a bag); empty: all 1
    user_feature_widths: tuple[int, ...] = ()
    # extraction strategies, one block each: recent, pos:<task>, neg:<task>, scenario:<id>, action:<id>,
    # each optionally capped as @n (default: the ones stored with the prepared data)
    strategies: tuple[str, ...] = ("recent",)
    seq_len: int = 50  # history events per block (default: the preset's)
    d_model: int = 64  # embedding and model width (default: the preset's)
    n_heads: int = 2  # attention heads (default: the preset's)
    n_layers: int = 2  # Transformer layers per block (default: the preset's)
    ffn_mult: int = 4  # feed-forward width / d_model
    dropout: float = 0.1  # dropout rate in the layers and the head
    pos_buckets: int = 32  # relative-position buckets of the attention bias f_b
    time_buckets: int = 32  # time-gap buckets (log-spaced) of the attention bias f_b
    adaptive: bool = True  # the ATL's temperature and bias per (block, scenario); off: the "MSE only" ablation
    scenario_adaptive: bool = True  # the scenario axis of those tables (and BGF's temperature); off: shared
    bgf: bool = True  # bit-wise gating fusion of the block outputs; off: concatenated into the head
    target_product: bool = False  # head also sees candidate embedding * each block output (model.py, step 6)
    match_readout: bool = True  # head also sees each candidate's mean and log-mean-exp logit per layer, block, head
    pooled_readout: bool = True  # head also sees DLRM's fields: candidate, mean history per block, their dots
    se_reduction: int = 4  # reduction ratio of the BGF squeeze-excitation gate
    head_hidden: tuple[int, ...] = (256, 64)  # hidden widths of the multi-task head's MLP (default: 256 64; tiny: 16)

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
    def tau_scenarios(self) -> int:
        """Scenarios with their own temperature and bias tables: all, or 1 when shared."""
        return self.n_scenarios if self.scenario_adaptive else 1

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class TrainConfig:
    """Training loop settings; the model knows nothing of these (nor of the device, kernels and
    compilation: `climber.runtime.Runtime`)."""

    epochs: int = 10  # passes over the training requests (early stopping may end sooner)
    batch_size: int = 128  # requests per optimizer step (per process under torchrun)
    lr: float = 3e-3  # peak AdamW learning rate (linear warm-up, then cosine decay to the end)
    # embedding tables' learning rate / lr: each row is updated only when its id is in the batch
    embedding_lr_mult: float = 10.0
    # batches per window whose requests are sorted by history length before batching (0: off):
    # less padding, so less compute per step (SumiData.bucket_by_length)
    bucket_window: int = 0
    weight_decay: float = 0.01  # decoupled AdamW weight decay of the dense weights
    embedding_weight_decay: float = 0.0  # decoupled weight decay on the embedding tables
    # implicit data: negatives per positive for each training request, drawn afresh every epoch
    # (seeded by seed, epoch and batch); validation and test keep the prepared, fixed ones
    train_negatives: int = 16
    warmup_steps: int = 100  # steps of linear learning-rate warm-up
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)
    # decay of an exponential moving average of the weights (0: off): validation, best/ and so
    # every test and served model use the average; training steps on the live weights. 0.99 raised
    # Climber's validation AUC on all five Table 2 sets (benchmarks/results/table2/weight-average)
    ema: float = 0.99
    seed: int = 0  # initialisation, batch order and training negatives
    eval_every: int = 0  # steps between validations; 0 = twice per epoch
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at each validation
    # also checkpoint when this many minutes passed since the last one (checked every log_every
    # steps; 0 = off), so a kill loses minutes, not an epoch
    checkpoint_minutes: float = 5.0
    patience: int = 3  # validations without AUC gain before early stopping
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)
    log_every: int = 10  # steps between logged losses (each costs a host sync)
    task_weights: tuple[float, ...] = ()  # loss weight per task, in the data's task order; empty = equal weights
    num_workers: int = 0  # DataLoader worker processes (0: batches built in the training process)
    keep_checkpoints: int = 2  # newest checkpoints kept in <out>/checkpoints (best/ is kept apart)
    tensorboard: bool = False  # also log to <out>/tensorboard (the [tensorboard] extra)
    # train and validate on the requests of these request scenarios only (empty: all); histories
    # keep every event. `climber compare`'s climber-per-domain row trains one model per scenario
    scenarios: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.lr <= 0 or self.embedding_lr_mult <= 0:
            raise ValueError("lr and embedding_lr_mult must be positive")
        if self.train_negatives < 1 or self.embedding_weight_decay < 0:
            raise ValueError("train_negatives must be at least 1 and embedding_weight_decay >= 0")
        if self.bucket_window < 0:
            raise ValueError("bucket_window must be >= 0")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema is a decay in [0, 1), not {self.ema}")
        if self.patience < 1 or self.keep_checkpoints < 1:
            raise ValueError("patience and keep_checkpoints must be at least 1")
        if self.checkpoint_minutes < 0 or self.log_every < 1:
            raise ValueError("checkpoint_minutes must be >= 0 and log_every at least 1")
        if any(s < 0 for s in self.scenarios) or len(set(self.scenarios)) != len(self.scenarios):
            raise ValueError(f"scenarios must be distinct ids >= 0, not {self.scenarios}")


@dataclass(frozen=True)
class Runtime:
    """Where and how fast a model runs (`climber/runtime.py` applies it); none of it changes what
    the model computes, and none of it is part of a checkpoint."""

    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    # attention kernels: auto (triton on a CUDA GPU, else reference) | reference (plain PyTorch) | triton
    attention: str = field(default="auto", metadata={"choices": BACKENDS})
    compile: bool = False  # regional torch.compile (climber/runtime.py)
    threads: int = 0  # CPU threads of torch ops on a CPU device; 0: OMP_NUM_THREADS if set, else half the cores, <= 4
    # under torchrun: ddp (replicas) | fsdp (FSDP2, sharded parameters and DCP checkpoints; climber/distributed.py)
    parallel: str = field(default="ddp", metadata={"choices": ("ddp", "fsdp")})

    def __post_init__(self) -> None:
        if self.attention not in BACKENDS:
            raise ValueError(f"attention must be one of {BACKENDS}, not {self.attention!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', not {self.parallel!r}")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: automatic)")


@functools.cache
def field_help(cls) -> dict[str, str]:
    """Each field of dataclass `cls` -> its comment in the class source: the comment on the
    field's line, else the comment lines right above it. These comments are the `--help` text."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments, names, code_lines = {}, {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
            if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in names.values():
                names.setdefault(tok.string, tok.start[0])  # a class-body statement's first name
    out = {}
    for f in dataclasses.fields(cls):
        line = names.get(f.name)
        if line is None:
            continue
        if line in comments:
            out[f.name] = comments[line]
            continue
        above = []
        while line - 1 in comments and line - 1 not in code_lines:
            line -= 1
            above.insert(0, comments[line])
        if above:
            out[f.name] = " ".join(above)
    return out


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip=(), defaults_none: bool = False) -> None:
    """One command-line flag per field of the config dataclass `cls`, typed from its annotation,
    with the field's comment and default as help and its `choices` metadata as choices.
    `defaults_none`: unset flags parse to None (the caller's preset or data fills them in)."""
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if defaults_none else f.default
        text = helps.get(f.name, "")
        if "(default:" not in text:  # a comment may say where the default comes from (a preset, the data)
            text = f"{text} (default: {_shown(f.default)})".lstrip()
        text = text.replace("%", "%%")
        if f.type in ("bool", bool):
            # BooleanOptionalAction appends the default itself before Python 3.13, when it is not None
            a = p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=text if default is None else text.rsplit(" (default:", 1)[0])
            if "(default:" not in a.help:
                a.help = text
        elif f.type.startswith("tuple"):
            elem = float if "float" in f.type else int if "int" in f.type else str
            p.add_argument(flag, nargs="*", type=elem, default=default, help=text)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=default, help=text,
                           choices=f.metadata.get("choices"))


def pick_fields(ns: argparse.Namespace, cls, skip=()) -> dict:
    """The fields of `cls` that were given (not None) in parsed arguments `ns`."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if f.name not in skip and v is not None:
            out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


# ---- config files: settings for a command, read from YAML, TOML or JSON ---------------------------

# ModelConfig's vocabulary: from the prepared data, never a flag
VOCAB_FIELDS = frozenset({"n_items", "n_users", "tasks", "n_actions", "n_scenarios", "item_feature_cards",
                          "user_feature_cards", "item_feature_widths", "user_feature_widths"})
# what a run's config.json records besides its settings (checked on resume, not set by a file)
RECORD_KEYS = frozenset({"dataset", "tasks", "data_fingerprint", "world"})  # a run config.json's records
SECTIONS = {"prepare": PrepareConfig, "model": ModelConfig, "train": TrainConfig, "runtime": Runtime}


def read_config_file(path: Path) -> dict:
    """A settings mapping from a .yaml/.yml, .toml or .json file."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix == ".json":
            d = json.loads(text)
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            d = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            raise ValueError(f"{path}: a config file is .yaml, .yml, .toml or .json")
    except (json.JSONDecodeError, ValueError) as e:  # tomllib's and yaml's errors are ValueErrors
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: the file must hold a mapping of settings, not {type(d).__name__}")
    return d


def config_args(settings: dict, parser: argparse.ArgumentParser, source: str) -> tuple[list[str], list[str]]:
    """Command-line tokens for `parser` that set what `settings` (from `read_config_file`) holds,
    and the names of the settings `parser` does not take (fields of SECTIONS, which another command
    takes). Keys are flag names with '_' or '-'; a section (model, train, runtime, prepare) is a
    nested mapping of that dataclass's fields, as in a run's config.json, whose record keys and
    vocabulary are skipped. Anything else is an error naming `source`. The tokens go before the
    command line's own, so flags given there win; argparse checks their types and choices."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    entries = []  # (name shown, dest, value, section class or None)
    for key, value in settings.items():
        if key in SECTIONS and isinstance(value, dict):
            entries += [(f"{key}.{k}", k.replace("-", "_"), v, SECTIONS[key]) for k, v in value.items()]
        elif key not in RECORD_KEYS:
            entries.append((key, key.replace("-", "_"), value, None))
    tokens, ignored, unknown = [], [], []
    for name, dest, value, cls in entries:
        a = actions.get(dest)
        if a is None or dest in ("config", "print_config", "help"):
            known = cls is not None and dest in {f.name for f in dataclasses.fields(cls)}
            if not (cls is ModelConfig and dest in VOCAB_FIELDS):
                (ignored if known else unknown).append(name)
            continue
        if value is None:
            continue
        flag = a.option_strings[0]
        if isinstance(a, argparse.BooleanOptionalAction) or a.nargs == 0:
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {name} must be true or false, not {value!r}")
            if value or isinstance(a, argparse.BooleanOptionalAction):  # a store_true flag has no --no- form
                tokens.append(flag if value else "--no-" + flag[2:])
        elif a.nargs in ("*", "+"):
            tokens += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
        elif isinstance(value, (list, dict)):
            raise ValueError(f"{source}: {name} takes one value, not {value!r}")
        else:
            tokens.append(f"{flag}={value}")
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)} (`{parser.prog} --help` lists them)")
    return tokens, ignored


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


RETIRED_FIELDS = {"attention", "device", "compile"}  # runtime settings older run configs saved


# fields whose default came after runs were saved without them, with the value those runs had:
# such a run resumes or is rewritten by `climber compare` only under that value
ADDED_FIELDS = {"TrainConfig": {"ema": 0.0}}


def with_added_fields(cls, d: dict) -> dict:
    """A saved `cls` config dict with the fields added since (`ADDED_FIELDS`) at the value such a
    run had, not today's default."""
    return {**ADDED_FIELDS.get(cls.__name__, {}), **d}


def from_dict(cls, d: dict):
    """Build a config dataclass from a dict, turning JSON lists back into tuples; runtime
    settings saved by older versions are dropped, and added fields filled (`with_added_fields`)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    d = with_added_fields(cls, {k: v for k, v in d.items() if k not in RETIRED_FIELDS})
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


# `climber compare`'s models: name -> ModelConfig fields; table rows follow the paper's Table 2 order
COMPARE_MODELS: dict[str, dict] = {
    "dlrm": {"arch": "dlrm"},
    "din": {"arch": "din"},
    "twin": {"arch": "twin"},
    "transformer": {"arch": "transformer"},
    "hstu": {"arch": "hstu"},
    "climber-mse": {"arch": "climber", "adaptive": False, "bgf": False},  # "without ATL and BGF (MSE only)"
    "climber-nobgf": {"arch": "climber", "bgf": False},  # "without BGF"
    "climber-shared-tau": {"arch": "climber", "scenario_adaptive": False},  # one temperature and bias for all scenarios
    # one Climber per request scenario, each trained, validated and tested on its scenario's requests
    "climber-per-domain": {"arch": "climber", "per_domain": True},
    "climber": {"arch": "climber"},
    "climber-large": {"arch": "climber", "grow": 2},  # twice the history length and twice the layers
    "climber-nomatch": {"arch": "climber", "match_readout": False},  # without the match readout (model.py, step 6)
    "climber-nopooled": {"arch": "climber", "pooled_readout": False},  # without the pooled readout (model.py, step 6)
    "climber-tp": {"arch": "climber", "target_product": True},  # + the target-product readout (model.py, step 6)
}
# the shared grid's axes of `climber compare` (TrainConfig fields)
TUNED = ("lr", "embedding_lr_mult", "embedding_weight_decay", "train_negatives")


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
