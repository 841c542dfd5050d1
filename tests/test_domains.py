"""Several logs as one multi-domain data set (climber/data/domains.py)."""

from __future__ import annotations

import numpy as np
import pytest

from climber.data.domains import DOMAIN_STRIDE, combine
from climber.data.events import DataError, EventLog, SideFeatures
from climber.data.sumi import PrepareConfig, SumiData, prepare


def implicit_log(name: str, task: str, n_users: int, n_items: int, seed: int, feature: str) -> EventLog:
    """Users 1..n_users and items 1..n_items (the same raw ids in every source), 12 events each."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(1, n_users + 1), 12)
    item = rng.integers(1, n_items + 1, len(user))
    time = np.tile(np.arange(12), n_users)
    items = np.arange(1, n_items + 1)
    return EventLog(name, user=user, item=item, time=time, labels=np.ones((len(user), 1)), tasks=(task,),
                    implicit=True, item_features=SideFeatures(items, rng.integers(1, 4, (n_items, 1)), (feature,)))


def test_combined_sources_are_namespaced_scenarios_with_negatives_from_their_own_domain(tmp_path):
    a, b = implicit_log("a", "interact", 8, 40, 0, "attr"), implicit_log("b", "purchase", 6, 25, 1, "category")
    log = combine([a, b], ["a", "b"])
    assert log.tasks == ("interact/purchase",) and log.notes["domains"] == ["a", "b"]
    assert len(np.unique(log.user)) == 14 and np.array_equal(np.unique(log.scenario), [0, 1])
    assert (log.item[log.scenario == 1] >= DOMAIN_STRIDE).all() and (log.item[log.scenario == 0] < DOMAIN_STRIDE).all()
    assert log.item_features.names == ("a.attr", "b.category")
    feats = dict(zip(log.item_features.ids.tolist(), log.item_features.codes.tolist()))
    assert feats[DOMAIN_STRIDE + 4] == [0, int(b.item_features.codes[4, 0])]  # b's 5th item: b's column only

    prepare(log, tmp_path / "ab", PrepareConfig(request_gap=0, max_candidates=1, negatives=4), ("recent",))
    data = SumiData(tmp_path / "ab")
    assert data.meta["vocab"]["n_scenarios"] == 2 and data.meta["vocab"]["item_feature_cards"] == [4, 4]
    dom = np.concatenate([[-1, -1], data.a["item_vocab"] // DOMAIN_STRIDE])  # padding and unknown: no domain
    per_req = np.diff(data.a["req_cand_start"])
    assert np.array_equal(dom[data.a["cand_item"]], np.repeat(data.a["req_scenario"], per_req))  # fixed negatives
    reqs = data.requests("train")
    fresh = data.sample_negatives(data.a["req_user"][reqs], np.random.default_rng(0))
    assert np.array_equal(dom[fresh], data.a["req_scenario"][reqs])  # training's fresh negatives


def test_combine_refuses_mixed_feedback_and_task_counts():
    a = implicit_log("a", "interact", 4, 10, 0, "attr")
    explicit = EventLog("e", user=a.user, item=a.item, time=a.time, labels=a.labels, tasks=a.tasks)
    with pytest.raises(DataError, match="implicit and explicit"):
        combine([a, explicit], ["a", "e"])
    two = EventLog("t", user=a.user, item=a.item, time=a.time, labels=np.ones((len(a.user), 2)), tasks=("x", "y"),
                   implicit=True)
    with pytest.raises(DataError, match="numbers of tasks"):
        combine([a, two], ["a", "t"])
