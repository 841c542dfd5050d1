"""SUMI preparation and multi-scale extraction on a hand-written log, plus leakage properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from climber.data.events import DataError, EventLog
from climber.data.sumi import TEST, TRAIN, VALID, PrepareConfig, SumiData, first_rows, prepare


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


def test_implicit_candidates_are_the_requests_positives_then_their_negatives(tmp_path):
    rng = np.random.default_rng(1)
    n = 600
    log = EventLog("imp", user=rng.integers(0, 15, n), item=rng.integers(0, 200, n),
                   time=np.sort(rng.integers(0, 3000, n)), labels=np.ones((n, 1)), tasks=("click",), implicit=True)
    prepare(log, tmp_path / "d", PrepareConfig(request_gap=50, max_candidates=5, negatives=2), ("recent",))
    a = SumiData(tmp_path / "d").a
    ev_start = np.r_[0, np.cumsum(np.diff(a["req_cand_start"]) // 3)]  # events (positives) before each request
    assert ev_start[-1] == n and np.diff(a["req_cand_start"]).max() == 15  # requests of several positives
    for r in range(len(a["req_user"])):
        cand = a["cand_item"][a["req_cand_start"][r]:a["req_cand_start"][r + 1]]
        labels = a["cand_labels"][a["req_cand_start"][r]:a["req_cand_start"][r + 1], 0]
        p = len(cand) // 3
        assert np.array_equal(cand[:p], a["ev_item"][ev_start[r]:ev_start[r] + p])  # in event order
        assert labels[:p].all() and not labels[p:].any()


def test_prepare_refuses_negatives_for_a_user_who_saw_every_item(tmp_path):
    log = EventLog("full", user=np.array([0] * 5 + [1] * 2), item=np.array([0, 1, 2, 3, 4, 0, 1]), time=np.arange(7),
                   labels=np.ones((7, 1)), tasks=("click",), implicit=True)
    with pytest.raises(DataError, match="user 1 has interacted with every item"):
        prepare(log, tmp_path / "d", PrepareConfig(request_gap=0, max_candidates=1, negatives=1), ("recent",))


def test_unknown_task_in_strategy_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="names task 'share'"):
        prepare(hand_log(), tmp_path / "d", PrepareConfig(), ("pos:share",))


@pytest.mark.parametrize("spec, message", [
    ("scenario:5", r"strategy 'scenario:5': no scenario 5; the data's scenario ids are 0..1"),
    ("action:6", r"strategy 'action:6': no action 6; the data's action ids are 0..5"),
    ("scenario:app", r"strategy 'scenario:app': scenario ids are integers"),
])
def test_strategies_are_checked_against_the_data_at_prepare(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        prepare(hand_log(), tmp_path / "d", PrepareConfig(), ("recent", spec))
    assert not (tmp_path / "d").exists()
    prepare(hand_log(), tmp_path / "d", PrepareConfig(), ("recent", "scenario:1", "action:5"))


def test_exact_duplicate_rows_are_dropped_by_default_and_counted(tmp_path):
    log = hand_log()
    dup = [0, 0, 4]  # row 0 twice more, row 4 once more
    twice = EventLog("hand", user=np.r_[log.user, log.user[dup]], item=np.r_[log.item, log.item[dup]],
                     time=np.r_[log.time, log.time[dup]], labels=np.r_[log.labels, log.labels[dup]], tasks=log.tasks,
                     action=np.r_[log.action, log.action[dup]], scenario=np.r_[log.scenario, log.scenario[dup]])
    near = EventLog("hand", user=twice.user, item=twice.item, time=twice.time, labels=twice.labels, tasks=log.tasks,
                    action=np.r_[log.action, log.action[dup] + [1, 2, 1]], scenario=twice.scenario)
    prepare(log, tmp_path / "once", PrepareConfig(request_gap=10), ("recent",))
    meta = prepare(twice, tmp_path / "d", PrepareConfig(request_gap=10), ("recent",))
    assert meta["counts"]["duplicates_dropped"] == 3 and meta["counts"]["events"] == len(log)
    assert meta["fingerprint"] == SumiData(tmp_path / "once").fingerprint  # the same data as without them
    kept = prepare(twice, tmp_path / "k", PrepareConfig(request_gap=10, drop_duplicates=False), ("recent",))
    assert kept["counts"]["duplicates_dropped"] == 0 and kept["counts"]["events"] == len(log) + 3
    assert prepare(near, tmp_path / "n", PrepareConfig(), ("recent",))["counts"]["duplicates_dropped"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_first_rows_equals_the_whole_row_unique(seed):
    """The packed-key sort keeps exactly the rows `np.unique(axis=0)` keeps, first of each: few
    distinct values (many duplicates, interleaved), 2-D label columns, and int64 extremes that
    cannot be packed."""
    rng = np.random.default_rng(seed)
    n = 3000
    wide = rng.choice(np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max]), n) if seed == 3 \
        else rng.integers(0, 3, n) * 10**11
    cols = (rng.integers(0, 5, n), rng.integers(0, 7, n), wide, rng.integers(0, 2, (n, 3)).astype(np.int8),
            rng.integers(-2, 2, n).astype(np.int16))
    expect = np.sort(np.unique(np.column_stack(cols), axis=0, return_index=True)[1])
    np.testing.assert_array_equal(first_rows(*cols), expect)
    assert len(first_rows(np.zeros(0, np.int64), np.zeros((0, 2), np.int8))) == 0


def test_a_task_with_one_class_is_rejected_at_prepare(tmp_path):
    log = hand_log()
    log.labels[:] = 1
    with pytest.raises(DataError, match="task 'like' is 1 in every row"):
        prepare(log, tmp_path / "d", PrepareConfig(), ("recent",))


def test_not_prepared_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="climber prepare"):
        SumiData(tmp_path)


def test_prepare_replaces_atomically(tmp_path):
    out = tmp_path / "d"
    prepare(hand_log(), out, PrepareConfig(request_gap=10), ("recent",))
    prepare(hand_log(), out, PrepareConfig(request_gap=1000), ("recent",))
    assert not (tmp_path / "d.tmp").exists()
    assert SumiData(out).meta["prepare"]["request_gap"] == 1000


def test_prepare_killed_while_writing_keeps_the_previous_data_atomic(tmp_path, monkeypatch):
    from climber.data import sumi

    out = tmp_path / "d"
    prepare(hand_log(), out, PrepareConfig(request_gap=10), ("recent",))
    before = {k: np.array(v) for k, v in SumiData(out).a.items()}
    calls = []

    def killed_midway(path, arr):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a kill: the rest of prepare never runs
        np.save(path, arr)

    monkeypatch.setattr(sumi.np, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare(hand_log(), out, PrepareConfig(request_gap=1000), ("recent",))
    monkeypatch.undo()
    data = SumiData(out)
    assert data.meta["prepare"]["request_gap"] == 10 and data.a.keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(data.a[k], v)


def test_prepare_killed_between_its_renames_keeps_the_previous_data_atomic(tmp_path, monkeypatch):
    """The swap is two renames (old out of the way, new in); killed between them, the previous
    data set is whole under d.old and the next reader puts it back."""
    from pathlib import Path

    out = tmp_path / "d"
    prepare(hand_log(), out, PrepareConfig(request_gap=10), ("recent",))
    real = Path.rename

    def kill_before_second_rename(self, target):
        if self.name == "d.tmp":
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", kill_before_second_rename)
    with pytest.raises(KeyboardInterrupt):
        prepare(hand_log(), out, PrepareConfig(request_gap=1000), ("recent",))
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / "d.old" / "meta.json").exists()
    assert SumiData(out).meta["prepare"]["request_gap"] == 10
    assert not (tmp_path / "d.old").exists()
    prepare(hand_log(), out, PrepareConfig(request_gap=1000), ("recent",))  # and a new prepare replaces it
    assert SumiData(out).meta["prepare"]["request_gap"] == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_fingerprint_identifies_the_prepared_arrays(tmp_path):
    prepare(hand_log(), tmp_path / "a", PrepareConfig(request_gap=10), ("recent",))
    prepare(hand_log(), tmp_path / "b", PrepareConfig(request_gap=10), ("recent", "pos:like"))
    prepare(hand_log(), tmp_path / "c", PrepareConfig(request_gap=1000), ("recent",))
    a, b, c = (SumiData(tmp_path / x) for x in "abc")
    assert len(a.fingerprint) == 16
    assert a.fingerprint == b.fingerprint  # default strategies are not data
    assert a.fingerprint != c.fingerprint  # other requests, other arrays
    from climber.data.sumi import fingerprint

    arrays = {k: np.array(v) for k, v in a.a.items()}
    assert fingerprint(arrays) == a.fingerprint
    arrays["ev_time"][3] += 1  # one timestamp
    assert fingerprint(arrays) != a.fingerprint


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


# --- training negatives drawn afresh (SumiData.batch(negatives=...), SumiData.sample_negatives) ---

N_ITEMS_IMP = 300


def implicit_log(grouped: bool, n_users: int = 20, per_user: int = 30, seed: int = 0) -> EventLog:
    """An implicit log of 20 users x 30 events over 300 items. `grouped`: each user's events come
    in bursts (1 s apart, 100 s between bursts), so requests hold 1 to 3 positives."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(n_users), per_user)
    shape = (n_users, per_user)
    step = rng.choice([1, 100], size=shape, p=[0.6, 0.4]) if grouped else np.full(shape, 100)
    time = np.cumsum(step, axis=1).reshape(-1)
    n = len(user)
    return EventLog("imp", user=user, item=rng.integers(0, N_ITEMS_IMP, n), time=time,
                    labels=np.ones((n, 2)), tasks=("click", "like"), implicit=True)


def implicit_data(tmp_path, grouped: bool) -> SumiData:
    cfg = PrepareConfig(request_gap=10 if grouped else 0, max_candidates=3 if grouped else 1, negatives=3)
    prepare(implicit_log(grouped), tmp_path / "imp", cfg, ("recent", "recent@4"))
    return SumiData(tmp_path / "imp")


def seen_by(data: SumiData, u: int) -> set[int]:
    """Every item user `u` interacted with, in any split (before and after any request)."""
    a = data.a
    return set(a["ev_item"][a["user_offsets"][u] : a["user_offsets"][u + 1]].tolist())


def check_fresh_candidates(data: SumiData, req: np.ndarray, n: int, b: dict) -> list[int]:
    """Each request of batch `b`: its prepared positives (items and labels, in prepared order)
    first, then exactly n negatives per positive, label 0, none seen by the user; padding
    masked out. Returns each request's negative items."""
    a = data.a
    negatives = []
    for k, r in enumerate(req.tolist()):
        cs, ce = a["req_cand_start"][r], a["req_cand_start"][r + 1]
        prep_labels = np.asarray(a["cand_labels"][cs:ce])
        pos = (prep_labels > 0).any(1)
        exp_items, exp_labels = np.asarray(a["cand_item"][cs:ce])[pos], prep_labels[pos]
        n_pos = len(exp_items)
        assert n_pos >= 1
        mask, items, labels = b["cand_mask"][k].numpy(), b["cand_item"][k].numpy(), b["labels"][k].numpy()
        valid = np.flatnonzero(mask)
        assert len(valid) == n_pos * (1 + n), r
        assert (items[~mask] == 0).all() and (labels[~mask] == 0).all()  # padding
        # positives first, exactly the prepared ones with their labels
        np.testing.assert_array_equal(items[valid[:n_pos]], exp_items)
        np.testing.assert_array_equal(labels[valid[:n_pos]], exp_labels)
        neg = items[valid[n_pos:]]
        assert (labels[valid[n_pos:]] == 0).all()
        assert ((neg >= 2) & (neg < data.vocab["n_items"])).all()  # real items, no padding or unknown
        assert not seen_by(data, int(a["req_user"][r])) & set(neg.tolist()), r
        negatives.append(neg.tolist())
    return negatives


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("n", [1, 5])
def test_fresh_negatives_replace_the_prepared_ones(tmp_path, grouped, n):
    data = implicit_data(tmp_path, grouped)
    assert data.implicit
    req = np.arange(len(data.a["req_user"]))  # every request of every split, in one batch
    n_pos = np.diff(data.a["req_cand_start"]) // 4  # prepared: 3 negatives per positive
    if grouped:  # requests of 1, 2 and 3 positives side by side in the batch
        assert set(n_pos.tolist()) == {1, 2, 3}
    else:
        assert (n_pos == 1).all()
    strategies = ("recent", "recent@4")
    b = data.batch(req, strategies, 16, negatives=(n, np.random.default_rng(0)))
    per_req = check_fresh_candidates(data, req, n, b)
    negs = sum(per_req, [])
    assert len(negs) == n * n_pos.sum()
    # drawn independently: not one item repeated over the batch, nor within a request
    assert len(set(negs)) > 0.5 * (N_ITEMS_IMP - 30)
    several = [x for x in per_req if len(x) > 1]
    if n > 1 or grouped:
        assert len(several) > 50 and np.mean([len(set(x)) == 1 for x in several]) < 0.05
    # the history and the per-request fields are those of the prepared batch
    plain = data.batch(req, strategies, 16)
    for key in plain:
        if not key.startswith(("cand_", "labels")):
            assert torch.equal(b[key], plain[key]), key


def test_fresh_negatives_are_seeded_and_differ_from_the_prepared_ones(tmp_path):
    data = implicit_data(tmp_path, grouped=True)
    req = data.requests("train")[:64]
    n = 3  # as many as prepare drew: the same layout, so only the items can tell them apart
    b1 = data.batch(req, ("recent",), 8, negatives=(n, np.random.default_rng(7)))
    b2 = data.batch(req, ("recent",), 8, negatives=(n, np.random.default_rng(7)))
    b3 = data.batch(req, ("recent",), 8, negatives=(n, np.random.default_rng(8)))
    assert b1.keys() == b2.keys()
    for key in b1:
        assert torch.equal(b1[key], b2[key]), key
    n1, n3 = (sum(check_fresh_candidates(data, req, n, x), []) for x in (b1, b3))
    assert len(n1) > 300
    # ~270 unseen items per user: two seeds agree on a negative about 1 time in 270
    assert np.mean(np.array(n1) == np.array(n3)) < 0.05
    prepared = data.batch(req, ("recent",), 8)
    assert prepared["cand_mask"].shape == b1["cand_mask"].shape and torch.equal(prepared["cand_mask"].sum(1),
                                                                                b1["cand_mask"].sum(1))
    assert (prepared["cand_item"] != b1["cand_item"]).float().mean() > 0.5  # fresh, not the prepared ones


def test_sample_negatives_is_uniform_over_the_unseen_items(tmp_path):
    data = implicit_data(tmp_path, grouped=False)
    u = 3
    unseen = sorted(set(range(2, data.vocab["n_items"])) - seen_by(data, u))
    draws = data.sample_negatives(np.full(30_000, u), np.random.default_rng(0))
    items, counts = np.unique(draws, return_counts=True)
    assert items.tolist() == unseen  # every unseen item, and nothing else
    expected = len(draws) / len(unseen)  # ~110 each
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # no item favoured or neglected
    chi2, dof = ((counts - expected) ** 2 / expected).sum(), len(unseen) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof)
    # several users in one call: each draw avoids its own user's items
    users = np.repeat(np.arange(1, 21), 200)
    out = data.sample_negatives(users, np.random.default_rng(1))
    for v in range(1, 21):
        assert not seen_by(data, v) & set(out[users == v].tolist())


def test_user_who_saw_all_but_one_item_always_gets_it(tmp_path):
    """Rejection sampling would nearly always fail for such a user; the exact fallback draws
    from the unseen items directly."""
    user = np.array([0] * 9 + [1] * 3)
    item = np.array(list(range(9)) + [0, 1, 9])  # raw user 0 saw items 0..8 of 0..9
    log = EventLog("heavy", user=user, item=item, time=np.arange(12), labels=np.ones((12, 1)), tasks=("click",),
                   implicit=True)
    prepare(log, tmp_path / "d", PrepareConfig(request_gap=0, max_candidates=1, negatives=0), ("recent",))
    data = SumiData(tmp_path / "d")
    out = data.sample_negatives(np.array([1] * 200 + [2] * 200), np.random.default_rng(0))
    assert set(out[:200].tolist()) == {11}  # dense id of raw item 9
    assert set(out[200:].tolist()) == set(range(4, 11))  # raw user 1 saw raw items 0, 1, 9


def test_user_who_saw_every_item_cannot_get_negatives(tmp_path):
    # raw user 0 interacted with all 10 items, raw user 1 with 3 of them
    user = np.array([0] * 10 + [1] * 3)
    item = np.array(list(range(10)) + [0, 1, 2])
    log = EventLog("full", user=user, item=item, time=np.arange(13), labels=np.ones((13, 1)), tasks=("click",),
                   implicit=True)
    prepare(log, tmp_path / "d", PrepareConfig(request_gap=0, max_candidates=1, negatives=0), ("recent",))
    data = SumiData(tmp_path / "d")
    ok = data.sample_negatives(np.array([2] * 50), np.random.default_rng(0))  # dense id of raw user 1
    assert set(ok.tolist()) == set(range(5, 12))  # dense ids of raw items 3..9
    with pytest.raises(DataError, match="user 1 has interacted with every item"):
        data.sample_negatives(np.array([2, 1, 2]), np.random.default_rng(0))
    req = np.flatnonzero(np.asarray(data.a["req_user"]) == 1)[:2]
    with pytest.raises(DataError, match="cannot sample negatives"):
        data.batch(req, ("recent",), 4, negatives=(1, np.random.default_rng(0)))
