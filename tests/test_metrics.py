"""Metric functions against scikit-learn on random data, GAUC's definition by hand, and the
vectorised GAUC against its per-user loop."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from climber.metrics import auc, evaluate_predictions, gauc, gauc_reference, logloss


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_logloss_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 2)  # rounding creates ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    p = np.clip(rng.random(500), 0.01, 0.99)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), abs=1e-12)


def test_gauc_is_impression_weighted_and_skips_one_class_users():
    users = np.array([1, 1, 1, 1, 2, 2, 3, 3, 3])
    y = np.array([1, 0, 1, 0, 1, 0, 1, 1, 1])  # user 3 has one class: skipped
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.7, 0.5, 0.4, 0.1])
    a1 = roc_auc_score(y[:4], s[:4])
    a2 = roc_auc_score(y[4:6], s[4:6])
    assert gauc(users, y, s) == pytest.approx((4 * a1 + 2 * a2) / 6)


def test_single_class_auc_is_nan_not_an_error():
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def test_evaluate_predictions_averages_tasks():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 2))
    p = rng.random((200, 2))
    r = evaluate_predictions(rng.integers(0, 10, 200), y, p, ("a", "b"))
    assert r["mean"]["auc"] == pytest.approx((r["a"]["auc"] + r["b"]["auc"]) / 2)


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_gauc_equals_the_per_user_loop(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.integers(0, 300, n) * 7 - 50  # unsorted, negative and sparse ids; users with one class
    y = (rng.random(n) < rng.choice([0.0, 0.3, 1.0], 300)[(users + 50) // 7]).astype(int)
    s = np.round(rng.random(n), 1 + seed % 2)  # many ties, within and across users
    assert gauc(users, y, s) == pytest.approx(gauc_reference(users, y, s), abs=1e-12)


def test_gauc_with_no_two_class_user_is_nan():
    assert np.isnan(gauc(np.array([1, 1, 2]), np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3])))
    assert np.isnan(gauc(np.array([], int), np.array([], int), np.array([])))


def test_evaluate_reports_each_scenario_as_its_requests_alone(tmp_path):
    """`climber evaluate`'s per-scenario metrics equal the metrics of the model run on only that
    scenario's requests (an independent pass), and the per-scenario candidate counts add up."""
    import torch

    from climber.data.sumi import SumiData
    from climber.evaluate import evaluate
    from climber.metrics import evaluate_predictions
    from climber.train import loader
    from tests.serve_helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path)
    res = evaluate(ckpt, split="train")
    data = SumiData(tmp_path / "data")
    from climber.checkpoint import load_model

    model, _ = load_model(ckpt)
    reqs = data.requests("train")
    assert set(res["model_by_scenario"]) == {str(s) for s in np.unique(data.a["req_scenario"][reqs])} == {"0", "1"}
    for s, got in res["model_by_scenario"].items():
        users, labels, probs = [], [], []
        for b in loader(data, reqs[data.a["req_scenario"][reqs] == int(s)], 4, model.cfg):
            m = b["cand_mask"]
            with torch.no_grad():
                probs.append(torch.sigmoid(model(b))[m].numpy())
            users.append(b["user"][:, None].expand_as(m)[m].numpy())
            labels.append(b["labels"][m].numpy())
        want = evaluate_predictions(np.concatenate(users), np.concatenate(labels), np.concatenate(probs), data.tasks)
        for task in want:
            assert got[task] == pytest.approx(want[task], abs=1e-5)
