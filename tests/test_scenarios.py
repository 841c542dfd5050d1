"""Scenario tooling: the learned-temperature readout of a checkpoint (benchmarks/plot_temperatures.py)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from benchmarks import plot_temperatures, scenario_truth
from climber import checkpoint
from climber.model import make_model
from tests.helpers import tiny_config


@pytest.mark.parametrize("scenario_adaptive", [True, False])
def test_temperatures_json_is_exp_of_the_checkpoints_log_tau(tmp_path, scenario_adaptive):
    cfg = tiny_config(scenario_adaptive=scenario_adaptive)
    model = make_model(cfg)
    with torch.no_grad():  # hand-set: a distinct value for every (layer, block, scenario, head)
        model.log_tau.copy_(torch.arange(model.log_tau.numel(), dtype=torch.float32).view_as(model.log_tau) / 10)
        model.bgf.log_tau.copy_(-torch.arange(model.bgf.log_tau.numel(), dtype=torch.float32).view_as(
            model.bgf.log_tau) / 10)
    checkpoint.save(tmp_path / "ckpt", model, {"model": asdict(cfg), "dataset": "hand-set"})
    plot_temperatures.main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    t = json.loads((tmp_path / "out" / "temperatures.json").read_text())
    N_L, K, S, H = model.log_tau.shape
    assert (N_L, K, H) == (cfg.n_layers, cfg.n_blocks, cfg.n_heads) and S == (3 if scenario_adaptive else 1)
    assert t["blocks"] == list(cfg.strategies) and t["scenarios"] == (["0", "1", "2"] if scenario_adaptive else ["all"])
    n = 0  # the hand-set value's flat index: log_tau = n / 10
    for i in range(N_L):
        for k in range(K):
            for s in range(S):
                assert t["atl"][i][k][s] == pytest.approx([math.exp((n + h) / 10) for h in range(H)])
                assert t["atl_mean"][i][k][s] == pytest.approx(sum(math.exp((n + h) / 10) for h in range(H)) / H)
                n += H
    assert [v for row in t["bgf"] for v in row] == pytest.approx([math.exp(-m / 10) for m in range(S * H)])
    assert (tmp_path / "out" / "temperatures.png").stat().st_size > 0


def test_memory_known_at_request_time_misses_only_the_requests_own_likes():
    """scenario_truth's memories as a ranker knows them: the generator's own value at a request's
    first event, never more than it later in the request (only the request's own likes are
    missing, and they only add), and less somewhere (requests hold likes)."""
    from climber.data.sumi import _group_requests
    from climber.data.synthetic import PREPARE, SyntheticConfig, label_truth

    cfg = SyntheticConfig(users=40, events_per_user=80, items=400, topics=6, seed=2, scenario_recency=3.0,
                          scenario_contrast=3.0)
    t = label_truth(cfg)
    start = _group_requests(t["user"], t["time"], t["scenario"], PREPARE)
    for name, half_life in (("recent", cfg.short_half_life), ("memory", cfg.memory_half_life)):
        known = scenario_truth.memory_at_request(t, start, half_life)
        np.testing.assert_allclose(known[start], t[name][start], atol=1e-9)
        assert (known <= t[name] + 1e-9).all() and (known < t[name] - 1e-6).any()
