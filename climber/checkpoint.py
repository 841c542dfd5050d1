"""Checkpoints: weights in safetensors, config as JSON, training state loadable with
`weights_only=True`; each checkpoint is a directory written under a temporary name and
renamed into place, so a kill at any moment leaves either the old or the new one, whole.
Loading never executes code from the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from climber.config import ModelConfig, from_dict
from climber.model import make_model

STEP_PREFIX = "step-"


def save(ckpt_dir: Path, model: torch.nn.Module, config: dict, train_state: dict | None = None) -> None:
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if ckpt_dir.exists():  # two renames: the old one stays whole until the new one is in place
        if old.exists():
            shutil.rmtree(old)
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    if old.exists():
        shutil.rmtree(old)


def latest_step_dir(ckpt_root: Path) -> Path | None:
    """The newest complete step checkpoint under `ckpt_root` (temporary dirs are ignored)."""
    steps = sorted(p for p in Path(ckpt_root).glob(f"{STEP_PREFIX}*") if p.name[len(STEP_PREFIX):].isdigit())
    return steps[-1] if steps else None


def prune(ckpt_root: Path, keep: int) -> None:
    steps = sorted(p for p in Path(ckpt_root).glob(f"{STEP_PREFIX}*") if p.name[len(STEP_PREFIX):].isdigit())
    for p in steps[:-keep]:
        shutil.rmtree(p)


def read_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no config.json; is this a Climber checkpoint directory?")
    return json.loads(path.read_text())


def load_model(ckpt_dir: Path, map_location: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model (eval mode) and its full config dict from a checkpoint directory."""
    config = read_config(ckpt_dir)
    model = make_model(from_dict(ModelConfig, config["model"]))
    model.load_state_dict(load_file(Path(ckpt_dir) / "model.safetensors", device=map_location))
    return model.eval(), config


def load_train_state(ckpt_dir: Path) -> dict:
    return torch.load(Path(ckpt_dir) / "train_state.pt", map_location="cpu", weights_only=True)
