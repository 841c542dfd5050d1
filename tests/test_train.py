"""Training loop: golden loss curve, resume after a real kill, DDP on 2 CPU processes, CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from climber import checkpoint
from climber import train as train_module
from climber.config import TrainConfig, model_config
from climber.data.events import EventLog
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.train import RequestBatches, loader, train
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
    # the training loss falls; validation here is 48 candidates, too few for an AUC claim
    assert sum(curve[-10:]) < sum(curve[:10]) and 0.0 <= summary["best_valid_auc"] <= 1.0


def test_same_seed_same_weights_and_different_seed_differs(data_dir, tmp_path):
    tiny_run(data_dir, tmp_path / "a", epochs=1)
    tiny_run(data_dir, tmp_path / "b", epochs=1)
    tiny_run(data_dir, tmp_path / "c", epochs=1, seed=1)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def _cli_train(data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "climber", "train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny",
            "--epochs", "3", "--batch-size", "8", "--checkpoint-every", "5", "--eval-every", "1000", "--patience",
            "5", "--log-every", "1", "--ema", "0.9"]


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

    for load in (_final_weights, lambda run: load_file(run / "best" / "model.safetensors")):  # best/: the average
        a, b = load(tmp_path / "whole"), load(killed)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "whole") == losses(killed)


def test_weight_average_is_what_validation_scores_and_best_keeps(data_dir, tmp_path):
    """With `ema`, training is unchanged (the same losses, the same live weights), and best/ is
    the bias-corrected exponential average of the live weights of every step so far, as computed
    here from a checkpoint per step."""
    decay, steps = 0.8, 12
    kw = {"epochs": 1, "max_steps": steps, "checkpoint_every": 1, "keep_checkpoints": steps, "eval_every": 1,
          "patience": 100}
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    tiny_run(data_dir, plain, **kw)
    summary = tiny_run(data_dir, averaged, ema=decay, **kw)
    assert losses(plain) == losses(averaged)
    assert _final_weights(plain).keys() == _final_weights(averaged).keys()
    for k, v in _final_weights(plain).items():
        assert torch.equal(v, _final_weights(averaged)[k]), k
    best = summary["best_step"]
    assert 1 <= best <= steps
    live = [load_file(averaged / "checkpoints" / f"{checkpoint.STEP_PREFIX}{i:08d}" / "model.safetensors")
            for i in range(1, best + 1)]
    saved = load_file(averaged / "best" / "model.safetensors")
    trained = [k for k in saved if not torch.equal(live[0][k], live[-1][k])]
    assert trained  # the check below compares weights that moved
    for k in trained:
        want = sum((1 - decay) * decay ** (best - i) * w[k].double() for i, w in enumerate(live, 1))
        torch.testing.assert_close(saved[k].double(), want / (1 - decay**best), rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="ema is a decay"):
        TrainConfig(ema=1.0)


def test_changed_config_refuses_to_resume_and_names_the_fields(data_dir, tmp_path):
    tiny_run(data_dir, tmp_path / "r", epochs=2)
    with pytest.raises(ValueError, match=r"different config \(train.lr 0.003 -> 0.01\)"):
        tiny_run(data_dir, tmp_path / "r", epochs=2, lr=1e-2)
    with pytest.raises(ValueError, match=r"different config \(train.epochs 2 -> 1, train.seed 0 -> 1\)"):
        tiny_run(data_dir, tmp_path / "r", epochs=1, seed=1)


def test_resume_accepts_changes_that_leave_the_math_alone(data_dir, tmp_path, capsys):
    """Cadence and worker settings may change on resume, and the epoch count may grow: the run
    goes on from its checkpoint (a finished run trains its new epochs)."""
    run = tmp_path / "r"
    first = tiny_run(data_dir, run, epochs=1, patience=100)
    capsys.readouterr()
    more = tiny_run(data_dir, run, epochs=2, patience=100, num_workers=1, log_every=3, eval_every=7, checkpoint_every=5,
                    checkpoint_minutes=1.0, keep_checkpoints=3)
    assert f"(step {first['steps']}," in capsys.readouterr().out
    assert more["steps"] == 2 * first["steps"]
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_resume_with_other_data_is_refused_by_fingerprint(data_dir, tmp_path):
    other = tmp_path / "other"
    prepare(synthetic_log(seed=1), other, PrepareConfig(request_gap=50, max_candidates=4), STRATEGIES)
    assert SumiData(other).vocab == SumiData(data_dir).vocab  # same shapes: only the fingerprint tells
    tiny_run(data_dir, tmp_path / "r", max_steps=3)
    with pytest.raises(ValueError, match="trained on other data"):
        tiny_run(other, tmp_path / "r", max_steps=3)
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    tiny_run(moved, tmp_path / "r", max_steps=3)  # the same data elsewhere: resumed
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["data_fingerprint"] == SumiData(data_dir).fingerprint and cfg["data"] == str(moved.resolve())


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


# --- implicit data: training negatives drawn afresh every epoch ---

IMP_STRATEGIES = ("recent", "recent@4")


@pytest.fixture(scope="module")
def implicit_dir(tmp_path_factory) -> Path:
    """30 users x 40 events over 200 items, ~3 events per request, prepared with 3 negatives each."""
    rng = np.random.default_rng(0)
    n_users, per_user = 30, 40
    user = np.repeat(np.arange(n_users), per_user)
    time = np.tile(np.arange(per_user) // 3 * 100, n_users) + rng.integers(0, 5, len(user))
    log = EventLog("imp", user=user, item=rng.integers(0, 200, len(user)), time=time,
                   labels=np.ones((len(user), 1)), tasks=("click",), implicit=True)
    d = tmp_path_factory.mktemp("data") / "implicit"
    prepare(log, d, PrepareConfig(request_gap=50, max_candidates=4, negatives=3), IMP_STRATEGIES)
    return d


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_negatives_must_be_positive():
    with pytest.raises(ValueError, match="train_negatives"):
        TrainConfig(train_negatives=0)
    with pytest.raises(ValueError, match="train_negatives"):
        TrainConfig(train_negatives=-1)
    assert TrainConfig(train_negatives=1).train_negatives == 1


def test_request_batches_from_a_resume_point_equal_the_uninterrupted_ones(implicit_dir):
    """RequestBatches(order[k*bs:], first=k)[i] == RequestBatches(order, first=0)[k+i], built in
    any order, by any worker: what makes a resumed epoch draw the same negatives."""
    data = SumiData(implicit_dir)
    order = np.random.default_rng(0).permutation(data.requests("train"))
    bs, k, neg = 16, 5, (2, (0, 1, 0, 2))
    full = RequestBatches(implicit_dir, order, bs, IMP_STRATEGIES, 16, neg)
    resumed = RequestBatches(implicit_dir, order[k * bs :], bs, IMP_STRATEGIES, 16, neg, first=k)
    assert len(full) > k + 3 and len(order) % bs  # a partial last batch too
    assert len(resumed) == len(full) - k
    for i in reversed(range(len(resumed))):  # out of order: no generator state carried between batches
        assert_same_batch(resumed[i], full[k + i])
    # ... and through DataLoader worker processes
    mcfg = model_config("tiny", data.vocab, IMP_STRATEGIES, seq_len=16)
    for i, b in enumerate(loader(data, order[k * bs :], bs, mcfg, workers=2, negatives=neg, first=k)):
        assert_same_batch(b, full[k + i])

    # the batches hold fresh negatives (2 per positive; prepare drew 3) ...
    b = full[k]
    a = data.a
    req = order[k * bs : (k + 1) * bs]
    n_pos = ((np.diff(a["req_cand_start"]) // 4)[req]).sum()
    assert int(b["cand_mask"].sum()) == 3 * n_pos and int(b["labels"].sum()) == n_pos
    # ... which depend on the batch's place and on the seed words, so the equalities above are not vacuous
    forgot_first = RequestBatches(implicit_dir, order[k * bs :], bs, IMP_STRATEGIES, 16, neg)[0]
    other_seed = RequestBatches(implicit_dir, order, bs, IMP_STRATEGIES, 16, (2, (0, 2, 0, 2)))[k]
    for other in (forgot_first, other_seed):
        assert torch.equal(other["cand_mask"], b["cand_mask"])
        assert (other["cand_item"] != b["cand_item"]).float().mean() > 0.3


def imp_run(data_dir: Path, out: Path, **train_kw) -> dict:
    data = SumiData(data_dir)
    mcfg = model_config("tiny", data.vocab, IMP_STRATEGIES, dropout=0.1)
    tcfg = TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "log_every": 1,
                          "train_negatives": 2, "patience": 100, **train_kw})
    return train(data_dir, out, mcfg, tcfg, progress=False)


def test_train_negatives_matter_on_implicit_data_only(implicit_dir, data_dir, tmp_path):
    imp_run(implicit_dir, tmp_path / "i1", max_steps=3, train_negatives=1)
    imp_run(implicit_dir, tmp_path / "i4", max_steps=3, train_negatives=4)
    assert losses(tmp_path / "i1") != losses(tmp_path / "i4")
    tiny_run(data_dir, tmp_path / "e1", max_steps=3, train_negatives=1)
    tiny_run(data_dir, tmp_path / "e4", max_steps=3, train_negatives=4)
    assert losses(tmp_path / "e1") == losses(tmp_path / "e4")  # explicit data: the logged impressions


def test_implicit_resume_mid_epoch_draws_the_same_negatives(implicit_dir, tmp_path, monkeypatch):
    """A run resumed from a checkpoint in the middle of its second epoch ends with the weights of
    the uninterrupted run: the loop rebuilds the epoch's remaining batches, negatives included."""
    calls = []

    def spy(*args, **kw):
        if "negatives" in kw:  # the training loader (predict's passes none)
            calls.append((kw["negatives"], kw["first"]))
        return loader(*args, **kw)

    monkeypatch.setattr(train_module, "loader", spy)
    kw = {"checkpoint_every": 4, "keep_checkpoints": 100}
    whole = tmp_path / "whole"
    imp_run(implicit_dir, whole, **kw)
    spe = math.ceil(len(SumiData(implicit_dir).requests("train")) / 16)
    # one training loader per epoch, from its start; fresh negatives (2 per positive) drawn anew each epoch
    assert [first for _, first in calls] == [0, 0]
    (n0, words0), (n1, words1) = calls[0][0], calls[1][0]
    assert n0 == n1 == 2 and words0 != words1

    step = next(s for s in range(spe + 1, 2 * spe) if s % 4 == 0)  # a checkpoint inside the second epoch
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    for p in (killed / "checkpoints").glob("step-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    calls.clear()
    imp_run(implicit_dir, killed, **kw)
    assert calls == [((2, words1), step - spe)]  # the second epoch's negatives, from the resume point on
    a, b = _final_weights(whole), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(whole) == losses(killed)


# --- trustworthy checkpoints: fallback, non-finite loss, wall-clock cadence, logs without repeats ---


def steps_logged(run: Path, name: str = "train_log.csv") -> list[int]:
    with (run / name).open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_resume_falls_back_to_the_newest_intact_checkpoint(data_dir, tmp_path, capsys):
    kw = {"checkpoint_every": 4, "keep_checkpoints": 100, "eval_every": 4}
    whole = tmp_path / "whole"
    tiny_run(data_dir, whole, **kw)
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    steps = sorted((killed / "checkpoints").glob("step-*"))
    for p in steps[-2:]:  # "killed" after the third-to-last checkpoint ...
        shutil.rmtree(p)
    newest, intact = steps[-3], steps[-4]
    flip = newest / "model.safetensors"  # ... whose weights then rotted on disk
    b = bytearray(flip.read_bytes())
    b[-3] ^= 0x10
    flip.write_bytes(bytes(b))
    capsys.readouterr()
    tiny_run(data_dir, killed, **kw)
    out = capsys.readouterr()
    warnings = [ln for ln in out.err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and newest.name in warnings[0] and "SHA-256" in warnings[0], out.err
    assert f"resuming from {intact}" in out.out
    a, b = _final_weights(whole), _final_weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(whole) == losses(killed)  # train_log.csv: every step once, in order
    for name in ("train_log.csv", "valid_log.csv"):
        assert steps_logged(killed, name) == steps_logged(whole, name)


def test_log_rows_of_a_run_killed_before_its_first_checkpoint_are_not_repeated(data_dir, tmp_path):
    run = tmp_path / "r"
    tiny_run(data_dir, run, max_steps=6)
    shutil.rmtree(run / "checkpoints")  # killed before any checkpoint: the run starts over ...
    with (run / "train_log.csv").open("a") as f:
        f.write("7,0,tra")  # ... and the kill cut a row short
    tiny_run(data_dir, run, max_steps=6)
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    calls, real = [], train_module.masked_bce

    def nan_from_step_7(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) >= 7 else 1.0)

    monkeypatch.setattr(train_module, "masked_bce", nan_from_step_7)
    run = tmp_path / "r"
    with pytest.raises(FloatingPointError, match="not finite .* by step 8"):
        tiny_run(data_dir, run, checkpoint_every=4, eval_every=4, log_every=4, keep_checkpoints=100)
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert steps == ["step-00000004"]  # step 8's weights (NaN) were never saved
    for d in (run / "checkpoints" / steps[0], run / "best"):
        checkpoint.verify(d)
        assert all(torch.isfinite(v).all() for v in load_file(d / "model.safetensors").values())


def test_nonfinite_loss_is_a_one_line_cli_error(data_dir, tmp_path, capsys):
    from climber.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--preset", "tiny", "--lr", "1e30",
              "--warmup-steps", "1", "--grad-clip", "0", "--max-steps", "40", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("climber train: error: training loss is not finite"), err


@pytest.mark.parametrize("minutes, expected", [(0, []), (1e-9, [3, 6, 9, 12])])
def test_wall_clock_checkpoints(data_dir, tmp_path, minutes, expected):
    """checkpoint_minutes: a checkpoint at the first check (every log_every steps) after the
    interval, whatever checkpoint_every says."""
    run = tmp_path / "r"
    summary = tiny_run(data_dir, run, epochs=1, max_steps=14, log_every=3, checkpoint_every=1000, eval_every=1000,
                       keep_checkpoints=100, checkpoint_minutes=minutes)
    steps = [int(p.name.split("-")[1]) for p in sorted((run / "checkpoints").glob("step-*"))]
    assert summary["steps"] == 14 and steps == expected + [14]


# --- input policy at training time: empty validation split, one-class validation labels ---


def explicit_log(n_users: int, requests: int, valid_label: int | None = None) -> EventLog:
    """`requests` one-event requests per user, random 0/1 clicks; `valid_label` fixes the label of
    each user's last-but-one request (its validation request)."""
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(n_users), requests)
    click = rng.integers(0, 2, len(user))
    if valid_label is not None:
        click[requests - 2 :: requests] = valid_label
    return EventLog("one", user=user, item=rng.integers(0, 30, len(user)), time=np.tile(np.arange(requests) * 1000,
                    n_users), labels=click[:, None], tasks=("click",))


def explicit_run(tmp_path: Path, log: EventLog) -> dict:
    prepare(log, tmp_path / "d", PrepareConfig(request_gap=10), ("recent",))
    mcfg = model_config("tiny", SumiData(tmp_path / "d").vocab, ("recent",))
    return train(tmp_path / "d", tmp_path / "r", mcfg, TrainConfig(epochs=2, batch_size=8), progress=False)


def test_empty_validation_split_is_a_clear_error(tmp_path):
    from climber.data.events import DataError

    with pytest.raises(DataError, match="no validation requests .* needs 3 requests"):
        explicit_run(tmp_path, explicit_log(20, requests=2))


def test_one_class_validation_labels_pick_the_best_checkpoint_by_logloss(tmp_path, capsys):
    summary = explicit_run(tmp_path, explicit_log(20, requests=8, valid_label=1))
    assert "validation labels of task(s) ['click'] are all one class" in capsys.readouterr().err
    assert math.isnan(summary["best_valid_auc"]) and summary["best_step"] > 0
    with (tmp_path / "r" / "valid_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    best = min(rows, key=lambda r: float(r["mean_logloss"]))
    assert summary["best_step"] == int(best["step"])
    checkpoint.verify(tmp_path / "r" / "best")


def test_cpu_threads_default_is_a_few_and_overridable(monkeypatch):
    from climber import runtime
    from climber.model import Climber
    from tests.helpers import tiny_config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, expected in ((64, runtime.MAX_AUTO_THREADS), (6, 3), (2, 1), (1, 1)):
        monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert runtime.cpu_threads() == expected
    assert runtime.cpu_threads(7) == 7
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun and our tests set it: obeyed
    assert runtime.cpu_threads() == torch.get_num_threads()
    before = torch.get_num_threads()
    try:
        runtime.apply(Climber(tiny_config()), runtime.Runtime(device="cpu", threads=3))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        runtime.Runtime(threads=-1)
