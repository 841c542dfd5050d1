"""Training loop: golden loss curve, resume after a real kill, DDP on 2 CPU processes, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from climber.config import TrainConfig, model_config
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.train import train
from tests.helpers import synthetic_log

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss.json"
ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("recent", "pos:like", "recent@4")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(synthetic_log(), d, PrepareConfig(request_gap=50, max_candidates=4), STRATEGIES)
    return d


def tiny_run(data_dir: Path, out: Path, **train_kw) -> dict:
    data = SumiData(data_dir)
    mcfg = model_config("tiny", data.vocab, STRATEGIES, dropout=0.1)
    tcfg = TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "log_every": 1, **train_kw})
    return train(data_dir, out, mcfg, tcfg, progress=False)


def losses(run: Path) -> list[float]:
    with (run / "train_log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_tiny_training_matches_golden_loss_curve(data_dir, tmp_path):
    summary = tiny_run(data_dir, tmp_path / "run")
    curve = losses(tmp_path / "run")
    if os.environ.get("CLIMBER_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    assert curve == pytest.approx(json.loads(GOLDEN.read_text()), rel=1e-4, abs=1e-5)
    assert summary["steps"] == len(curve)
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert 0.5 < summary["best_valid_auc"] <= 1.0  # the synthetic taste is learnable


def test_same_seed_same_weights_and_different_seed_differs(data_dir, tmp_path):
    tiny_run(data_dir, tmp_path / "a", epochs=1)
    tiny_run(data_dir, tmp_path / "b", epochs=1)
    tiny_run(data_dir, tmp_path / "c", epochs=1, seed=1)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def _cli_train(data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "climber", "train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny",
            "--epochs", "3", "--batch-size", "8", "--checkpoint-every", "5", "--eval-every", "1000", "--patience",
            "5", "--log-every", "1"]


def _final_weights(run: Path) -> dict:
    steps = sorted((run / "checkpoints").glob("step-*"))
    return load_file(steps[-1] / "model.safetensors")


def test_resume_after_kill_gives_same_final_weights(data_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(_cli_train(data_dir, tmp_path / "whole"), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli_train(data_dir, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-00000010")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # really killed mid-run, not finished
    resumed = subprocess.run(_cli_train(data_dir, killed), check=True, env=env, capture_output=True, text=True)
    assert "resuming from" in resumed.stdout

    a, b = _final_weights(tmp_path / "whole"), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "whole") == losses(killed)


def test_changed_config_refuses_to_resume(data_dir, tmp_path):
    tiny_run(data_dir, tmp_path / "r", epochs=1)
    with pytest.raises(ValueError, match="different config"):
        tiny_run(data_dir, tmp_path / "r", epochs=1, lr=1e-2)


def test_ddp_two_cpu_processes(data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "climber", "train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--epochs", "2",
           "--batch-size", "8", "--device", "cpu"]
    res = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    n_train = len(SumiData(data_dir).requests("train"))
    assert summary["steps"] == 2 * -(-(n_train // 2) // 8)  # each rank sees half the requests per epoch
    assert (out / "best" / "model.safetensors").exists()


def test_param_groups_cover_every_parameter_once_with_embeddings_at_their_own_rate():
    from climber.model import Climber
    from climber.train import param_groups
    from tests.helpers import tiny_config

    model = Climber(tiny_config())
    groups = param_groups(model, 0.1, embedding_lr_mult=5.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    (emb,) = [g for g in groups if "lr_mult" in g]
    assert emb["lr_mult"] == 5.0 and emb["weight_decay"] == 0.0
    assert {id(p) for p in emb["params"]} == {id(model.item_emb.weight), id(model.action_emb.weight),
                                               id(model.flag_emb.weight), id(model.scenario_emb.weight),
                                               *(id(e.weight) for e in model.item_feat_emb),
                                               *(id(e.weight) for e in model.user_feat_emb)}
    with pytest.raises(ValueError, match="embedding_lr_mult"):
        TrainConfig(embedding_lr_mult=0)
