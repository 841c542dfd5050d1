"""Serving engine properties on CPU with a tiny checkpoint (docs/paper.md section 3.2): cached ==
uncached full-model scores, incremental extension == prefill from scratch (with room and with a
full window), scores independent of other candidates and users, and the LRU byte bound."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from climber.data.sumi import FIRST_ITEM, SumiData
from climber.serve.engine import Engine, History, ScoreRequest, SQLiteStore
from tests.serve_helpers import USERS, make_checkpoint

ATOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def ckpt_sparse(tmp_path_factory):
    """Strategies under which some events go to one block only, or to none."""
    return make_checkpoint(tmp_path_factory.mktemp("serve_sparse"), strategies=("pos:like", "scenario:1", "action:2"))


@pytest.fixture(scope="module")
def ckpt_pooled(tmp_path_factory):
    """With the pooled readout, whose per-block history sums the cache carries."""
    return make_checkpoint(tmp_path_factory.mktemp("serve_pooled"), pooled_readout=True)


def data_history(data: SumiData, rows: slice) -> History:
    a = data.a
    return History(*(np.asarray(a[k][rows], np.int64)
                     for k in ("ev_item", "ev_time", "ev_action", "ev_scenario", "ev_labels")))


def random_events(n: int, engine: Engine, seed: int, t0: int = 2_000_000) -> History:
    g = np.random.default_rng(seed)
    cfg = engine.cfg
    return History(g.integers(2, cfg.n_items, n), t0 + np.cumsum(g.integers(0, 500, n)),
                   g.integers(0, cfg.n_actions, n), g.integers(0, cfg.n_scenarios, n),
                   g.integers(0, 2, (n, len(cfg.tasks))))


def as_raw(engine: Engine, h: History) -> History:
    """`h` with raw item ids, as /events posts them (the engine stores raw ids)."""
    return dataclasses.replace(h, item=engine.item_vocab[h.item - FIRST_ITEM])


def test_history_inputs_match_sumi_batch(ckpt):
    engine = Engine.from_checkpoint(ckpt)
    data = SumiData(engine.base.data.root)
    a = data.a
    for r in range(len(a["req_user"])):
        b = data.batch(np.array([r]), engine.cfg.strategies, engine.cfg.seq_len)
        u = a["req_user"][r]
        got = engine.history_inputs(data_history(data, slice(a["user_offsets"][u], a["req_hist_end"][r])))
        valid = b["hist_mask"]
        assert torch.equal(got["hist_mask"], valid)
        for k in ("hist_item", "hist_action", "hist_scenario", "hist_labels"):
            assert torch.equal(got[k], b[k]), k
        assert torch.equal(got["hist_time"][valid], b["hist_time"][valid])


def test_cached_scores_equal_uncached_full_model(ckpt):
    engine = Engine.from_checkpoint(ckpt)
    data = SumiData(engine.base.data.root)
    a = data.a
    reqs = np.arange(len(a["req_user"]))
    b = data.batch(reqs, engine.cfg.strategies, engine.cfg.seq_len)
    with torch.no_grad():
        full = torch.sigmoid(engine.model(b))  # (B, M, T) uncached forward
    for r in reqs:
        u, m = a["req_user"][r], int(b["cand_mask"][r].sum())
        h = data_history(data, slice(a["user_offsets"][u], a["req_hist_end"][r]))
        cache = engine.prefill(h, int(a["req_scenario"][r]), int(u))
        got = engine.score(cache, b["cand_item"][r:r + 1, :m], b["req_time"][r:r + 1])
        torch.testing.assert_close(got[0], full[r, :m], atol=ATOL, rtol=0)
        # the same through the request path, with raw item ids mapped back to dense ones
        raw = engine.item_vocab[b["cand_item"][r, :m].numpy() - 2]
        dense, unknown = engine.item_ids(raw)
        assert not unknown.any()
        res = engine.score_requests([ScoreRequest(dense, int(a["req_scenario"][r]), int(a["req_time"][r]),
                                                  user=int(data.a["user_vocab"][u - 1]), history=h)])[0]
        assert res.cache == "bypass"
        np.testing.assert_allclose(res.probs, full[r, :m].numpy(), atol=ATOL, rtol=0)


def test_store_history_is_cached_and_reused(ckpt):
    engine = Engine.from_checkpoint(ckpt)
    data = SumiData(engine.base.data.root)
    u_dense = 4
    u_raw = int(data.a["user_vocab"][u_dense - 1])
    off = data.a["user_offsets"]
    full = data_history(data, slice(off[u_dense], off[u_dense + 1]))
    cand = np.array([2, 5, 9, 1])
    explicit = engine.score_requests([ScoreRequest(cand, 1, 2_000_000, user=u_raw, history=full)])[0]
    first, second = (engine.score_requests([ScoreRequest(cand, 1, 2_000_000, user=u_raw)])[0] for _ in range(2))
    assert (first.cache, second.cache) == ("miss", "hit")
    assert first.history_length == len(full) == second.history_length
    np.testing.assert_allclose(first.probs, explicit.probs, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(second.probs, first.probs)
    # the scenario selects temperature and bias tables: another scenario is another cache entry
    assert engine.score_requests([ScoreRequest(cand, 0, 2_000_000, user=u_raw)])[0].cache == "miss"
    assert dict(engine.stats) == {"bypass": 1, "miss": 2, "hit": 1, "evict": 0}


def test_shared_tau_model_keeps_one_cache_per_user_across_scenarios(tmp_path):
    """Without per-scenario temperature and bias the prefill does not depend on the request
    scenario: one cache per user serves every scenario (a hit), with each scenario's scores
    equal to an uncached pass under that scenario."""
    engine = Engine.from_checkpoint(make_checkpoint(tmp_path, scenario_adaptive=False))
    data = SumiData(engine.base.data.root)
    u_raw = int(data.a["user_vocab"][3])
    cand = np.array([2, 5, 9, 1])
    got = [engine.score_requests([ScoreRequest(cand, s, 2_000_000, user=u_raw)])[0] for s in (1, 0, 1)]
    assert [g.cache for g in got] == ["miss", "hit", "hit"] and len(engine.cache) == 1
    h, _, _ = engine.history(u_raw)
    for s, g in zip((1, 0), got):
        want = engine.score_requests([ScoreRequest(cand, s, 2_000_000, user=u_raw, history=h)])[0]
        np.testing.assert_allclose(g.probs, want.probs, atol=ATOL, rtol=0)
    assert not np.allclose(got[0].probs, got[1].probs)  # the scenario still reaches the candidates


def assert_cache_equals_scratch(engine: Engine, key: tuple[int, int], history: History) -> None:
    cached = engine.cache.get(key).cache
    scratch = engine.prefill(history, key[1], 0)
    assert torch.equal(cached.hist_mask, scratch.hist_mask)
    m = scratch.hist_mask
    assert torch.equal(cached.hist_time[m], scratch.hist_time[m])
    for (k1, v1), (k2, v2) in zip(cached.kv, scratch.kv, strict=True):
        torch.testing.assert_close(k1.permute(0, 1, 3, 2, 4)[m], k2.permute(0, 1, 3, 2, 4)[m], atol=ATOL, rtol=0)
        torch.testing.assert_close(v1.permute(0, 1, 3, 2, 4)[m], v2.permute(0, 1, 3, 2, 4)[m], atol=ATOL, rtol=0)
    torch.testing.assert_close(cached.pooled, scratch.pooled, atol=ATOL, rtol=0)


@pytest.mark.parametrize("which, n_old, n_new, expect, redone", [
    ("ckpt", 0, 3, "extend", 0),  # from an empty history
    ("ckpt", 1, 2, "extend", 0),
    ("ckpt", 2, 2, "extend", 0),  # 'recent@4' exactly full: nothing drops out yet
    ("ckpt", 3, 2, "recompute", 1),  # 'recent@4' drops its oldest event: only it is recomputed
    ("ckpt", 3, 6, "recompute", 2),  # 'recent' (seq_len 8) overflows too; the cache grows to 8 columns
    ("ckpt", 7, 3, "recompute", 2),
    ("ckpt_sparse", 3, 5, "extend", 0),  # events selected by some blocks, or by none
    ("ckpt_sparse", 10, 9, "recompute", None),
    ("ckpt_pooled", 1, 2, "extend", 0),
    ("ckpt_pooled", 3, 6, "recompute", 2),
])
def test_incremental_extension_equals_prefill_from_scratch(request, which, n_old, n_new, expect, redone):
    engine = Engine.from_checkpoint(request.getfixturevalue(which))
    events = random_events(n_old + n_new, engine, seed=n_old * 7 + n_new)
    user, scen, cand = 999, 1, np.array([3, 4, 2, 7])  # a user unknown to the data: store starts empty
    engine.append_events(user, as_raw(engine, events[:n_old]))
    assert engine.score_requests([ScoreRequest(cand, scen, 3_000_000, user=user)])[0].cache == "miss"
    engine.append_events(user, as_raw(engine, events[n_old:]))
    got = engine.score_requests([ScoreRequest(cand, scen, 3_000_000, user=user)])[0]
    assert got.cache == expect and got.history_length == n_old + n_new
    if redone is not None:
        assert engine.stats["recompute_blocks"] == redone
    ref = engine.score_requests([ScoreRequest(cand, scen, 3_000_000, user=user, history=events)])[0]
    np.testing.assert_allclose(got.probs, ref.probs, atol=ATOL, rtol=0)
    assert_cache_equals_scratch(engine, (user, scen), events)


def test_events_arriving_one_at_a_time_extend_each_time(ckpt_sparse):
    engine = Engine.from_checkpoint(ckpt_sparse)
    events = random_events(8, engine, seed=3)
    cand = np.array([5, 6])
    engine.score_requests([ScoreRequest(cand, 0, 3_000_000, user=7)])
    for i in range(len(events)):
        engine.append_events(7, as_raw(engine, events[i:i + 1]))
        assert engine.score_requests([ScoreRequest(cand, 0, 3_000_000, user=7)])[0].cache == "extend"
    assert_cache_equals_scratch(engine, (7, 0), events)
    assert engine.stats["extend"] == 8 and engine.stats["recompute"] == 0


def test_scores_independent_of_other_candidates_and_users(ckpt):
    engine = Engine.from_checkpoint(ckpt)
    g = np.random.default_rng(0)
    reqs = [ScoreRequest(g.integers(1, engine.cfg.n_items, m), int(g.integers(0, 2)), 1_010_000 + m, user=u)
            for u, m in zip(USERS, (5, 1, 7, 3, 6, 2), strict=True)]
    together = engine.score_requests(reqs)
    for r, t in zip(reqs, together, strict=True):
        alone = engine.score_requests([r])[0]
        np.testing.assert_allclose(alone.probs, t.probs, atol=ATOL, rtol=0)
        perm = g.permutation(len(r.candidates))
        permuted = engine.score_requests([ScoreRequest(r.candidates[perm], r.scenario, r.req_time, user=r.user)])[0]
        np.testing.assert_allclose(permuted.probs, t.probs[perm], atol=ATOL, rtol=0)
        for j in range(len(r.candidates)):
            one = engine.score_requests([ScoreRequest(r.candidates[j:j + 1], r.scenario, r.req_time, user=r.user)])
            np.testing.assert_allclose(one[0].probs[0], t.probs[j], atol=ATOL, rtol=0)


def test_lru_byte_bound_evicts_least_recently_used(ckpt):
    engine = Engine.from_checkpoint(ckpt)
    cand = np.array([2, 3])
    sizes = []
    for u in USERS[:4]:
        engine.score_requests([ScoreRequest(cand, 0, 2_000_000, user=u)])
        sizes.append(engine.cache.get((u, 0)).nbytes)
    bounded = Engine.from_checkpoint(ckpt, cache_bytes=sizes[2] + sizes[3])
    for u in USERS[:4]:
        bounded.score_requests([ScoreRequest(cand, 0, 2_000_000, user=u)])
        assert bounded.cache.bytes <= bounded.cache.max_bytes
    assert bounded.stats["evict"] == 2 and len(bounded.cache) == 2
    statuses = [bounded.score_requests([ScoreRequest(cand, 0, 2_000_000, user=u)])[0].cache for u in USERS[3:1:-1]]
    assert statuses == ["hit", "hit"]
    assert bounded.score_requests([ScoreRequest(cand, 0, 2_000_000, user=USERS[0])])[0].cache == "miss"
    tiny = Engine.from_checkpoint(ckpt, cache_bytes=min(sizes) - 1)  # no entry fits: served, never kept
    for _ in range(2):
        assert tiny.score_requests([ScoreRequest(cand, 0, 2_000_000, user=USERS[0])])[0].cache == "miss"
    assert len(tiny.cache) == 0 and tiny.cache.bytes == 0


def test_ids_and_history_order(ckpt):
    engine = Engine.from_checkpoint(ckpt)
    vocab = engine.item_vocab
    dense, unknown = engine.item_ids(np.array([vocab[0], vocab[0] + 1, vocab[-1], 5]))
    assert dense.tolist() == [2, 1, len(vocab) + 1, 1] and unknown.tolist() == [False, True, False, True]
    assert engine.user_id(101) == 1 and engine.user_id(7) == 0 and engine.user_id(None) == 0
    counts = {u: engine.base.count(u) for u in (*USERS, 7)}  # without reading the events, as many as are read
    assert counts == {u: len(engine.base(u)) for u in (*USERS, 7)} and counts[7] == 0
    assert sum(counts.values()) > 0
    events = random_events(3, engine, seed=0)
    engine.append_events(101, events)
    with pytest.raises(ValueError, match="before"):
        engine.append_events(101, events[:1])
    with pytest.raises(ValueError, match="time order"):
        engine.append_events(101, events[::-1])


def test_store_keeps_only_windowed_events_and_no_score_changes(ckpt_sparse, tmp_path):
    """Per-user bound: a user keeps at most sum(caps) posted events, yet every score equals the one
    from the whole history, cached (extended / recomputed) or read back by a fresh engine."""
    engine = Engine.from_checkpoint(ckpt_sparse, store=tmp_path / "events.sqlite")
    store = engine.store
    events = random_events(200, engine, seed=5)
    cand, user = np.array([3, 4, 2, 7]), 4242
    for i in range(0, 200, 20):
        engine.append_events(user, as_raw(engine, events[i:i + 20]))
        got = engine.score_requests([ScoreRequest(cand, 1, 3_000_000, user=user)])[0]
        ref = engine.score_requests([ScoreRequest(cand, 1, 3_000_000, user=user, history=events[:i + 20])])[0]
        np.testing.assert_allclose(got.probs, ref.probs, atol=ATOL, rtol=0)
        assert got.history_length == i + 20
        kept = store.load(user)
        assert len(kept.events) <= engine.caps.sum() and kept.count == i + 20
    assert len(store.load(user).events) < 200 // 2  # the bound did forget events
    fresh = Engine.from_checkpoint(ckpt_sparse, store=tmp_path / "events.sqlite")
    again = fresh.score_requests([ScoreRequest(cand, 1, 3_000_000, user=user)])[0]
    assert again.cache == "miss" and again.history_length == 200
    np.testing.assert_allclose(again.probs, ref.probs, atol=ATOL, rtol=0)


def test_store_evicts_least_recently_written_users_beyond_max_users(ckpt, tmp_path):
    engine = Engine.from_checkpoint(ckpt, store=tmp_path / "e.sqlite", max_users=2)
    ev = as_raw(engine, random_events(1, engine, seed=0))
    for user in (1, 2, 1, 3):  # user 2 is then the least recently written
        engine.append_events(user, ev)
    assert [engine.store.count(u) for u in (1, 2, 3)] == [2, 0, 1]
    assert engine.stats["user_evict"] == 1
    with pytest.raises(ValueError, match="tasks"):  # a store written for other tasks is refused
        SQLiteStore(tmp_path / "e.sqlite", ("click",))
