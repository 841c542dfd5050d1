"""SUMI preparation and multi-scale extraction on a hand-written log, plus leakage properties."""

from __future__ import annotations

import numpy as np
import pytest

from climber.data.events import DataError, EventLog
from climber.data.sumi import TEST, TRAIN, VALID, PrepareConfig, SumiData, prepare


def hand_log() -> EventLog:
    # user 7: six events; a request is events <= 10 s apart; user 9: three single events
    rows = [  # user, item, time, like, action, scenario
        (7, 100, 0, 1, 5, 0),
        (7, 101, 5, 0, 2, 0),
        (7, 102, 100, 1, 4, 1),
        (7, 103, 200, 0, 1, 0),
        (7, 104, 205, 1, 5, 0),
        (7, 105, 300, 1, 4, 0),
        (9, 100, 50, 0, 1, 0),
        (9, 102, 80, 1, 5, 0),
        (9, 101, 120, 1, 5, 0),
    ]
    u, i, t, like, act, sc = map(np.array, zip(*rows))
    return EventLog("hand", user=u, item=i, time=t, labels=like[:, None], tasks=("like",), action=act,
                    scenario=sc)


@pytest.fixture
def data(tmp_path):
    prepare(hand_log(), tmp_path / "d", PrepareConfig(request_gap=10, max_candidates=20), ("recent",))
    return SumiData(tmp_path / "d")


def raw_items(data: SumiData, dense: np.ndarray) -> list[int]:
    vocab = np.asarray(data.a["item_vocab"])
    return [int(vocab[d - 2]) for d in dense if d >= 2]


def test_requests_groups_and_split(data):
    a = data.a
    # user 7: requests {100,101}, {102} (scenario changes), {103,104}, {105}; user 9: 3 requests
    assert list(np.diff(a["req_cand_start"])) == [2, 1, 2, 1, 1, 1, 1]
    assert list(a["req_split"]) == [TRAIN, TRAIN, VALID, TEST, TRAIN, VALID, TEST]
    assert data.meta["counts"]["requests_test"] == 2


def test_history_is_strictly_before_request_time(data):
    a = data.a
    for r in range(len(a["req_user"])):
        u = a["req_user"][r]
        hist = slice(a["user_offsets"][u], a["req_hist_end"][r])
        assert (a["ev_time"][hist] < a["req_time"][r]).all()
        later = slice(a["req_hist_end"][r], a["user_offsets"][u + 1])
        assert (a["ev_time"][later] >= a["req_time"][r]).all()  # nothing earlier was left out


@pytest.mark.parametrize("spec, expected", [
    ("recent", [100, 101, 102]),
    ("pos:like", [100, 102]),
    ("neg:like", [101]),
    ("action:4", [102]),
    ("scenario:1", [102]),
    ("recent@2", [101, 102]),
])
def test_extraction_strategies_on_hand_log(data, spec, expected):
    # request 2 of user 7 (time 200) has history 100 (like), 101 (no), 102 (like, scenario 1)
    b = data.batch(np.array([2]), (spec,), seq_len=4)
    assert raw_items(data, b["hist_item"][0, 0].numpy()) == expected
    mask = b["hist_mask"][0, 0].numpy()
    assert mask.sum() == len(expected) and mask[-len(expected):].all()  # left-padded
    assert raw_items(data, b["cand_item"][0].numpy()) == [103, 104]
    assert b["labels"][0, :, 0].tolist() == [0.0, 1.0]


def test_batch_pads_candidates_and_trims_history(data):
    b = data.batch(np.array([0, 2, 3]), ("recent", "pos:like"), seq_len=50)
    assert b["hist_item"].shape == (3, 2, 5)  # trimmed to the longest history (5 events before t=300)
    assert b["cand_item"].shape == (3, 2)
    assert b["cand_mask"].tolist() == [[True, True], [True, True], [True, False]]
    assert not b["hist_mask"][0].any()  # first request: empty history


def test_max_candidates_splits_long_requests(tmp_path):
    prepare(hand_log(), tmp_path / "d", PrepareConfig(request_gap=1000, max_candidates=4), ("recent",))
    counts = np.diff(SumiData(tmp_path / "d").a["req_cand_start"])
    assert counts.max() <= 4 and counts.sum() == 9


def test_implicit_negatives_are_unseen_and_seeded(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    log = EventLog("imp", user=rng.integers(0, 20, n), item=rng.integers(0, 300, n), time=np.arange(n),
                   labels=np.ones((n, 1)), tasks=("click",), implicit=True)
    cfg = PrepareConfig(request_gap=0, max_candidates=1, negatives=3)
    prepare(log, tmp_path / "a", cfg, ("recent",))
    prepare(log, tmp_path / "b", cfg, ("recent",))
    a, b = SumiData(tmp_path / "a").a, SumiData(tmp_path / "b").a
    assert np.array_equal(a["cand_item"], b["cand_item"])
    labels = a["cand_labels"][:, 0]
    assert labels.mean() == pytest.approx(0.25)
    per_req = np.diff(a["req_cand_start"])
    cand_user = np.repeat(a["req_user"], per_req)
    for u in np.unique(cand_user):
        seen = set(a["ev_item"][a["user_offsets"][u] : a["user_offsets"][u + 1]].tolist())
        negs = a["cand_item"][(cand_user == u) & (labels == 0)]
        assert not seen & set(negs.tolist())


def test_unknown_task_in_strategy_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="names task 'share'"):
        prepare(hand_log(), tmp_path / "d", PrepareConfig(), ("pos:share",))


def test_not_prepared_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="climber prepare"):
        SumiData(tmp_path)


def test_prepare_replaces_atomically(tmp_path):
    out = tmp_path / "d"
    prepare(hand_log(), out, PrepareConfig(request_gap=10), ("recent",))
    prepare(hand_log(), out, PrepareConfig(request_gap=1000), ("recent",))
    assert not (tmp_path / "d.tmp").exists()
    assert SumiData(out).meta["prepare"]["request_gap"] == 1000


def test_generic_table_prepares_end_to_end(tmp_path):
    """A user's own Parquet log with string ids goes through read_table and prepare (meta is JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from climber.data.readers import ColumnMapping, read_table

    rng = np.random.default_rng(0)
    n = 300
    pq.write_table(pa.table({"uid": [f"u{x}" for x in rng.integers(0, 10, n)], "iid": rng.integers(0, 40, n),
                             "ts": np.sort(rng.integers(0, 10**6, n)), "click": rng.integers(0, 2, n),
                             "page": rng.choice(["home", "search"], n)}), tmp_path / "log.parquet")
    log = read_table(tmp_path / "log.parquet", ColumnMapping(user="uid", item="iid", time="ts", labels=("click",),
                                                              scenario="page"))
    meta = prepare(log, tmp_path / "d", PrepareConfig(), ("recent", "pos:click"))
    assert meta["notes"]["mapping"]["user"] == "uid"
    assert meta["vocab"]["n_scenarios"] == 2 and meta["counts"]["events"] == n


def test_bucket_by_length_is_a_seeded_permutation_that_pads_less(tmp_path):
    """Length bucketing (TrainConfig.bucket_window) only reorders requests, deterministically
    in its generator, and batches built from its order hold fewer padded history slots."""
    from tests.helpers import synthetic_log

    strategies = ("recent", "recent@4")
    prepare(synthetic_log(n_users=40, per_user=60), tmp_path / "d", PrepareConfig(request_gap=50, max_candidates=4),
            strategies)
    data = SumiData(tmp_path / "d")
    order = np.random.default_rng(0).permutation(data.requests("train"))
    bucketed = data.bucket_by_length(order, 8, 4, 60, np.random.default_rng(1))
    assert len(order) % 8 and sorted(bucketed) == sorted(order)  # a partial last batch too
    np.testing.assert_array_equal(bucketed, data.bucket_by_length(order, 8, 4, 60, np.random.default_rng(1)))

    def slots(o):
        return sum(data.batch(o[i : i + 8], strategies, 60)["hist_mask"].numel() for i in range(0, len(o), 8))

    assert slots(bucketed) < 0.8 * slots(order)
