"""Checkpoints you can trust: checksums recorded at save and verified at every load; a corrupt
checkpoint is a one-line error in `climber evaluate` and `climber serve`, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from climber import checkpoint
from climber.checkpoint import CorruptCheckpoint
from climber.cli import main
from tests.serve_helpers import make_checkpoint


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_checkpoint(tmp_path)


def flip_bit(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x10
    path.write_bytes(bytes(b))


def truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def empty(p: Path) -> None:
    p.write_bytes(b"")


def bad_header(p: Path) -> None:  # safetensors opens with the header's length: say 2**63
    p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:])


def flipped_float(p: Path) -> None:  # one bit of the last weight: still a valid safetensors file
    flip_bit(p, p.stat().st_size - 3)


CORRUPTIONS = {"truncated": truncated, "empty": empty, "bad_header": bad_header, "flipped_float": flipped_float}


def test_checksum_manifest_lists_every_file_and_verifies(ckpt):
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["config.json", "model.safetensors"]
    assert manifest["model.safetensors"]["bytes"] == (ckpt / "model.safetensors").stat().st_size
    checkpoint.verify(ckpt)
    model, _ = checkpoint.load_model(ckpt)
    assert not model.training


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_weights_fail_the_checksum(ckpt, kind):
    CORRUPTIONS[kind](ckpt / "model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="model.safetensors"):
        checkpoint.load_model(ckpt)


def test_corrupt_flipped_float_would_load_silently_without_the_checksum(ckpt):
    """The case only a checksum catches: the flipped file is still valid safetensors."""
    before = {k: v.clone() for k, v in checkpoint.load_weights(ckpt).items()}
    flipped_float(ckpt / "model.safetensors")
    after = checkpoint.load_weights(ckpt)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(CorruptCheckpoint, match="SHA-256"):
        checkpoint.verify(ckpt)


def test_corrupt_config_or_manifest_or_missing_file(ckpt, tmp_path):
    flip_bit(ckpt / "config.json", 10)
    with pytest.raises(CorruptCheckpoint, match="config.json"):
        checkpoint.verify(ckpt)
    other = make_checkpoint(tmp_path / "b")
    (other / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match="manifest.json is unreadable"):
        checkpoint.verify(other)
    third = make_checkpoint(tmp_path / "c")
    (third / "model.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="model.safetensors is missing"):
        checkpoint.verify(third)


def test_checkpoint_without_manifest_loads_with_a_warning_and_fails_clearly_when_corrupt(ckpt, capsys):
    """Checkpoints saved before checksums: loaded unverified; a broken file is still a clear error."""
    (ckpt / "manifest.json").unlink()
    checkpoint.load_model(ckpt)
    assert "not verified" in capsys.readouterr().err
    bad_header(ckpt / "model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="unreadable"):
        checkpoint.load_model(ckpt)


@pytest.mark.parametrize("command", ["evaluate", "serve"])
@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_cli_refuses_a_corrupt_checkpoint_in_one_line(ckpt, capsys, command, kind):
    CORRUPTIONS[kind](ckpt / "model.safetensors")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--checkpoint", str(ckpt), "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"climber {command}: error: {ckpt}: model.safetensors "), err


def test_atomic_save_replaces_a_checkpoint_whole(ckpt):
    """Saving over an existing checkpoint leaves no temporary or old directory behind."""
    model, config = checkpoint.load_model(ckpt)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    checkpoint.save(ckpt, model, config)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt", "data"]
    reloaded, _ = checkpoint.load_model(ckpt)
    assert torch.equal(next(reloaded.parameters()), next(model.parameters()))


def test_atomic_save_killed_between_its_renames_keeps_the_old_checkpoint(ckpt):
    ckpt.rename(ckpt.with_name("ckpt.old"))  # where a kill between the two renames leaves it
    checkpoint.load_model(ckpt)  # put back and verified
    assert ckpt.is_dir() and not ckpt.with_name("ckpt.old").exists()


@pytest.mark.parametrize("command", ["evaluate", "serve"])
def test_cli_refuses_a_checkpoint_whose_vocabulary_does_not_match_the_data(ckpt, tmp_path, capsys, command):
    from climber.data.sumi import PrepareConfig, prepare
    from tests.serve_helpers import STRATEGIES, tiny_log

    log = tiny_log()
    log.user = np.where(np.arange(len(log)) % 2, log.user + 1000, log.user)  # each user split in two
    log.user_features = None
    prepare(log, tmp_path / "other", PrepareConfig(request_gap=100, max_candidates=4), STRATEGIES)
    with pytest.raises(SystemExit) as exit_:
        main([command, "--checkpoint", str(ckpt), "--data", str(tmp_path / "other"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "does not match the data" in err and "n_users 7 vs 13; user_feature_cards (3,) vs ()" in err, err


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_no_tmp(ckpt, monkeypatch):
    """A save that runs out of space half-way: a clear error naming the cause, no `.tmp` left
    behind, and the checkpoint already there still verifies and loads."""
    model, cfg = checkpoint.load_model(ckpt)
    before = (ckpt / "model.safetensors").read_bytes()

    def full_disk(state, path):
        Path(path).write_bytes(b"\0" * 100)  # what got written before the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device.*previous checkpoint is intact"):
        checkpoint.save(ckpt, model, json.loads((ckpt / "config.json").read_text()))
    assert not ckpt.with_name(ckpt.name + ".tmp").exists()
    assert (ckpt / "model.safetensors").read_bytes() == before
    checkpoint.verify(ckpt)
