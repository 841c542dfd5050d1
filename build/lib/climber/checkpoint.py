"""Checkpoints: weights in safetensors, config as JSON, training state loadable with
`weights_only=True`; each checkpoint is a directory written under a temporary name and
renamed into place, so a kill at any moment leaves either the old or the new one, whole.
Loading never executes code from the checkpoint.

A checkpoint can be trusted: `manifest.json`, written last, records each file's size and
SHA-256, and every load checks them, so a truncated, emptied or bit-flipped file is refused
with a one-line `CorruptCheckpoint` error (resume skips to the newest intact checkpoint).
Checkpoints saved before manifests existed load unverified, with a warning.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import torch
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


def save(ckpt_dir: Path, model: torch.nn.Module, config: dict, train_state: dict | None = None) -> None:
    """Write a checkpoint under a temporary sibling and swap it in; on a write error (e.g. a full
    disk) the partial copy is removed and `CheckpointWriteError` names the cause, while the
    checkpoint already at `ckpt_dir`, if any, stays as it was."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")  # last: it vouches for the rest
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write checkpoint {ckpt_dir}: {e}; the previous checkpoint is "
                                   "intact, free space and resume") from e
    replace_dir(tmp, ckpt_dir)


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
    try:
        return load_file(Path(ckpt_dir) / "model.safetensors", device=device)
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpoint(f"{ckpt_dir}: model.safetensors is unreadable ({e})") from e


def load_model(ckpt_dir: Path, map_location: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model (eval mode) and its full config dict from a verified checkpoint directory."""
    verify(ckpt_dir)
    config = read_config(ckpt_dir)
    model = make_model(from_dict(ModelConfig, config["model"]))
    model.load_state_dict(load_weights(ckpt_dir, map_location))
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
