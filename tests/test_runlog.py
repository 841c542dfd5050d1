"""A run's records beyond the CSV logs: TensorBoard scalars (`--tensorboard`), curves.png, and a
clear message where the optional package for either, or for `climber scale fit`, is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from climber.cli import main
from climber.config import TrainConfig, model_config
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.extras import MissingDependency
from climber.train import train
from tests.helpers import synthetic_log

STRATEGIES = ("recent", "pos:like")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(synthetic_log(n_users=12, per_user=12), d, PrepareConfig(request_gap=50, max_candidates=4), STRATEGIES)
    return d


def short_run(data_dir: Path, out: Path, **kw) -> dict:
    mcfg = model_config("tiny", SumiData(data_dir).vocab, STRATEGIES)
    return train(data_dir, out, mcfg, TrainConfig(epochs=2, batch_size=4, log_every=1, warmup_steps=2, **kw),
                 progress=False)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_scalars_match_the_csv_logs(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = short_run(data_dir, tmp_path / "run", tensorboard=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, summary["steps"] + 1))
    auc = events.Scalars("valid/mean_auc")
    assert auc[-1].step == summary["steps"] and max(e.value for e in auc) == pytest.approx(summary["best_valid_auc"])
    assert "valid/like_gauc" in events.Tags()["scalars"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_run_directory_gets_a_training_curve_png(data_dir, tmp_path):
    short_run(data_dir, tmp_path / "run")
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_without_matplotlib_training_still_works_and_writes_no_png(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    short_run(data_dir, tmp_path / "run")
    assert (tmp_path / "run" / "train_log.csv").exists() and not (tmp_path / "run" / "curves.png").exists()


def test_tensorboard_missing_is_a_clear_error(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingDependency, match=r"--tensorboard needs the tensorboard package.*-rec\[tensorboard\]"):
        short_run(data_dir, tmp_path / "run", tensorboard=True)
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(data_dir), "--out", str(tmp_path / "cli"), "--preset", "tiny", "--tensorboard"])
    assert e.value.code == 2 and "pip install 'climber-rec[tensorboard]'" in capsys.readouterr().err


def test_scale_fit_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    results = tmp_path / "scale.jsonl"
    results.write_text('{"dataset": "x", "key": "a", "flops": {"exact": 1.0}}\n')
    with pytest.raises(SystemExit) as e:
        main(["scale", "fit", "--results", str(results), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "climber scale fit's figures needs the matplotlib package" in err
    assert "pip install 'climber-rec[plot]'" in err
