"""Checkpoints: weights in safetensors, config as JSON, training state loadable with
`weights_only=True`; each checkpoint is a directory written under a temporary name and
renamed into place, so a kill at any moment leaves either the old or the new one, whole.
Loading never executes code from the checkpoint.

A checkpoint can be trusted: `manifest.json`, written last, records each file's size and
SHA-256, and every load checks them, so a truncated, emptied or bit-flipped file is refused
with a one-line `CorruptCheckpoint` error (resume skips to the newest intact checkpoint).
Checkpoints saved before manifests existed load unverified, with a warning.

Sharded runs (`--parallel fsdp`) save their step checkpoints with torch.distributed.checkpoint
(DCP): every rank writes its own shards of the weights and AdamW's state into the checkpoint
directory (`.metadata` and one `__<rank>_0.distcp` per rank, on a file system all ranks share),
rank 0 the config and train_state.pt (loop state and every rank's RNG) and the manifest last. DCP
reshards on load, so a run saved on N ranks resumes on M, one process included. `best/` is the
whole model in safetensors, or, for a model sharded over ranks, its weights' shards with DCP (no
rank ever holds the whole model); `load_model` (evaluate, compare, export, serve, predict) reads
either, a sharded one gathered whole into the one process.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from climber.config import ModelConfig, from_dict
from climber.files import recover_dir, replace_dir, sha256
from climber.model import make_model

STEP_PREFIX = "step-"
MANIFEST = "manifest.json"


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest, or cannot be read."""


class CheckpointWriteError(ValueError):
    """A checkpoint that could not be written (disk full, permissions); nothing older was touched."""


def save(ckpt_dir: Path, model: torch.nn.Module | dict[str, torch.Tensor], config: dict,
         train_state: dict | None = None) -> None:
    """Write a checkpoint of `model` (or of its state dict) under a temporary sibling and swap it
    in; on a write error (e.g. a full disk) the partial copy is removed and `CheckpointWriteError`
    names the cause, while the checkpoint already at `ckpt_dir`, if any, stays as it was."""
    ckpt_dir = Path(ckpt_dir)
    tmp = _fresh_tmp(ckpt_dir)
    try:
        weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
        _finish(tmp, config, train_state)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        _abandon(tmp, ckpt_dir, e)
    replace_dir(tmp, ckpt_dir)


def _fresh_tmp(ckpt_dir: Path) -> Path:
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, config: dict, train_state: dict | None) -> None:
    """config.json, train_state.pt, then the manifest of every file, written last: it vouches for the rest."""
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")


def _abandon(tmp: Path, ckpt_dir: Path, e: Exception):
    shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointWriteError(f"cannot write checkpoint {ckpt_dir}: {e}; the previous checkpoint is "
                               "intact, free space and resume") from e


@contextmanager
def _quiet_one_process():
    """DCP warns on every save and load without a process group; on one process that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_sharded(ckpt_dir: Path) -> bool:
    """Whether the checkpoint was written by torch.distributed.checkpoint (a sharded run)."""
    return (Path(ckpt_dir) / ".metadata").exists()


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """What DCP saves and loads: the model's and AdamW's (if any) state dicts keyed by parameter
    name, sharded (DTensors) for an FSDP2 model, whole for a plain one."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, config: dict,
                 train_state: dict | None = None) -> None:
    """A collective (every rank calls it): each rank writes its shards of the model and optimizer
    (none: the weights alone, as best/) with DCP into the temporary directory, rank 0 then the
    config, `train_state` and the manifest, and swaps it in. Works on one process too (no process
    group)."""
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        _fresh_tmp(ckpt_dir)
    if dist.is_initialized():
        dist.barrier()
    try:
        with _quiet_one_process():
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        if main:
            _finish(tmp, config, train_state)
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:
        if main:
            _abandon(tmp, ckpt_dir, e)
        raise CheckpointWriteError(f"cannot write checkpoint {ckpt_dir}: {e}") from e
    if main:
        replace_dir(tmp, ckpt_dir)
    if dist.is_initialized():
        dist.barrier()


def load_into(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict) -> None:
    """Load a step checkpoint's weights and optimizer state into `model` and `optimizer`, plain or
    sharded, whichever kind of run saved it (DCP reshards; a whole checkpoint is sliced)."""
    from torch.distributed.checkpoint import state_dict as sd

    ckpt_dir = Path(ckpt_dir)
    if is_sharded(ckpt_dir):
        import torch.distributed.checkpoint as dcp

        state = _dcp_state(model, optimizer)
        try:
            with _quiet_one_process():
                dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=not dist.is_initialized())
        except (OSError, RuntimeError, dcp.api.CheckpointException) as e:
            raise CorruptCheckpoint(f"{ckpt_dir}: sharded checkpoint is unreadable ({e})") from e
        sd.set_model_state_dict(model, state["model"])
        sd.set_optimizer_state_dict(model, optimizer, state["optimizer"])
        return
    # a whole checkpoint (rank 0's safetensors, AdamW's state keyed by parameter index) into a
    # sharded model: by name, each rank keeping its rows
    full = sd.StateDictOptions(full_state_dict=True)
    sd.set_model_state_dict(model, load_weights(ckpt_dir), options=full)
    saved = train_state["optimizer"]
    names = [n for g in optimizer.param_groups for n in _names(model, g["params"])]
    by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    sd.set_optimizer_state_dict(model, optimizer, by_name, options=full)


def _names(model: torch.nn.Module, params: list) -> list[str]:
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for p in params]


def verify(ckpt_dir: Path) -> None:
    """Raise CorruptCheckpoint unless every file listed in the manifest has its size and hash."""
    ckpt_dir = Path(ckpt_dir)
    recover_dir(ckpt_dir)  # a save killed while swapping in a new checkpoint: the old one is whole
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory")
    path = ckpt_dir / MANIFEST
    if not path.exists():
        if not (ckpt_dir / "config.json").exists():
            raise FileNotFoundError(f"{ckpt_dir}: no config.json; is this a Climber checkpoint directory?")
        print(f"warning: {ckpt_dir} has no {MANIFEST} (saved before checksums): not verified", file=sys.stderr)
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{ckpt_dir}: {MANIFEST} is unreadable ({e})") from e
    for name, want in files.items():
        p = ckpt_dir / name
        if not p.exists():
            raise CorruptCheckpoint(f"{ckpt_dir}: {name} is missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CorruptCheckpoint(f"{ckpt_dir}: {name} has {size} bytes, the manifest says {want['bytes']} "
                                    "(truncated or overwritten)")
        if sha256(p) != want["sha256"]:
            raise CorruptCheckpoint(f"{ckpt_dir}: {name} fails its SHA-256 check (the file changed on disk)")


def _steps(ckpt_root: Path) -> list[Path]:
    return sorted(p for p in Path(ckpt_root).glob(f"{STEP_PREFIX}*") if p.name[len(STEP_PREFIX):].isdigit())


def latest_intact(ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """(the newest step checkpoint under `ckpt_root` that verifies, one message per newer one
    that does not). Temporary dirs are ignored; one left by a kill mid-swap is put back first."""
    for p in Path(ckpt_root).glob(f"{STEP_PREFIX}*.old"):
        recover_dir(p.with_suffix(""))
    skipped = []
    for p in reversed(_steps(ckpt_root)):
        try:
            verify(p)
            return p, skipped
        except CorruptCheckpoint as e:
            skipped.append(str(e))
    return None, skipped


def prune(ckpt_root: Path, keep: int) -> None:
    for p in _steps(ckpt_root)[:-keep]:
        shutil.rmtree(p)


def read_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no config.json; is this a Climber checkpoint directory?")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{ckpt_dir}: config.json is unreadable ({e})") from e


def load_weights(ckpt_dir: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The whole model's state dict, from either kind of checkpoint."""
    if is_sharded(ckpt_dir):
        return _gather_sharded(Path(ckpt_dir), device)
    try:
        return load_file(Path(ckpt_dir) / "model.safetensors", device=device)
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpoint(f"{ckpt_dir}: model.safetensors is unreadable ({e})") from e


def _gather_sharded(ckpt_dir: Path, device: str) -> dict[str, torch.Tensor]:
    """The model's tensors of a DCP checkpoint, whole, read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        reader = dcp.FileSystemReader(str(ckpt_dir))
        meta = reader.read_metadata().state_dict_metadata
        weights = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
                   if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        with _quiet_one_process():
            dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    except (OSError, RuntimeError, ValueError, dcp.api.CheckpointException) as e:
        raise CorruptCheckpoint(f"{ckpt_dir}: sharded checkpoint is unreadable ({e})") from e
    return {k: v.to(device) for k, v in weights.items()}


def load_model(ckpt_dir: Path, map_location: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model (eval mode) and its full config dict from a verified checkpoint directory, whole
    in this process (a sharded one gathered). Built on the meta device and given the loaded
    tensors, so the weights are in memory once, and no init is drawn."""
    verify(ckpt_dir)
    config = read_config(ckpt_dir)
    with torch.device("meta"):
        model = make_model(from_dict(ModelConfig, config["model"]))
    model.load_state_dict(load_weights(ckpt_dir, map_location), assign=True)
    return model.eval(), config


def load_train_state(ckpt_dir: Path) -> dict:
    try:
        return torch.load(Path(ckpt_dir) / "train_state.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise CorruptCheckpoint(f"{ckpt_dir}: train_state.pt is unreadable ({e})") from e


def check_vocabulary(config: dict, vocab: dict, ckpt_dir: Path, data_dir: Path) -> None:
    """Raise ValueError naming the fields where a checkpoint's vocabulary differs from the data's
    (`SumiData.vocab`): ids beyond a table would otherwise fail inside the model as an IndexError."""
    model = from_dict(ModelConfig, config["model"])
    diff = [f"{k} {getattr(model, k)} vs {v}" for k, v in vocab.items() if getattr(model, k) != v]
    if diff:
        raise ValueError(f"checkpoint {ckpt_dir} does not match the data in {data_dir} "
                         f"(checkpoint vs data: {'; '.join(diff)}); pass the --data it was trained on")
