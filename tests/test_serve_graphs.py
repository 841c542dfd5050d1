"""Shape buckets of the serving engine's model calls (climber/serve/graphs.py): on CPU, the padded
calls run eagerly and equal the unpadded ones for random batch sizes, candidate counts and
history lengths, padding rows and columns change no real row, and a bucketed engine scores as
the plain one through extensions and recomputes; on a GPU, graph replays equal eager calls,
also after the inputs change between replays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from climber import ops
from climber.model import Climber, HistoryCache
from climber.serve.engine import Engine, History, ScoreRequest, SQLiteStore
from climber.serve.graphs import FLOOR, FOLD, Bucketed, bucket, buckets
from tests.helpers import perturb, random_batch, tiny_config

SEQ_LEN, MAX_BATCH, MAX_CAND = 40, 6, 40  # length buckets 16, 32, 40; batch 1, 2, 4, 6; candidates 16, 32, 40
ATOL, RTOL = 1e-4, 1e-5  # fp32 round-off (logits up to ~25): padded shapes sum in another order


def make(device: str = "cpu") -> Climber:
    torch.manual_seed(0)
    # head dim 16: on a GPU "auto" picks the Triton kernels, which need a power of two >= 16
    model = Climber(tiny_config(seq_len=SEQ_LEN, d_model=32)).eval()
    perturb(model)
    model = model.to(device)
    model.attention = ops.backend("auto", device)
    return model


def to(b: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in b.items()}


def new_events(cfg, B: int, seed: int, device: str) -> tuple[dict, torch.Tensor]:
    """Random new events in the shape `Climber.fold` takes: up to FOLD rows per block, a random
    count per block right-aligned (some none), later than `random_batch`'s; and random blocks
    rebuilt from them."""
    g = torch.Generator().manual_seed(seed)
    K, T, n = cfg.n_blocks, len(cfg.tasks), int(torch.randint(1, FOLD + 1, (1,), generator=g))
    count = torch.randint(0, n + 1, (B, K), generator=g)
    mask = torch.arange(n) >= (n - count)[..., None]
    new = {"hist_item": torch.randint(2, cfg.n_items, (B, K, n), generator=g),
           "hist_time": 2_000_000 + torch.arange(n).expand(B, K, n),
           "hist_action": torch.randint(0, cfg.n_actions, (B, K, n), generator=g),
           "hist_scenario": torch.randint(0, cfg.n_scenarios, (B, K, n), generator=g),
           "hist_labels": torch.randint(0, 2, (B, K, n, T), generator=g)}
    new = {k: v * (mask if v.dim() == 3 else mask[..., None]) for k, v in new.items()}
    new["hist_mask"] = mask
    reset = torch.rand(B, K, generator=g) < 0.3
    return to(new, device), reset.to(device)


def assert_caches_match(got: HistoryCache, want: HistoryCache, atol: float) -> None:
    assert torch.equal(got.hist_mask, want.hist_mask)  # the same width, the same padding
    m = want.hist_mask
    assert torch.equal(got.hist_time[m], want.hist_time[m])
    for (k1, v1), (k2, v2) in zip(got.kv, want.kv, strict=True):
        torch.testing.assert_close(k1.transpose(2, 3)[m], k2.transpose(2, 3)[m], atol=atol, rtol=RTOL)
        torch.testing.assert_close(v1.transpose(2, 3)[m], v2.transpose(2, 3)[m], atol=atol, rtol=RTOL)
    torch.testing.assert_close(got.hist_sum, want.hist_sum, atol=atol, rtol=RTOL)


@torch.inference_mode()
def assert_calls_match(model: Climber, padded: Bucketed, B: int, L: int, M: int, seed: int, atol: float) -> None:
    """score, prefill and fold (with candidates and alone) through `padded` equal the model's own on
    a random batch."""
    dev = next(model.parameters()).device.type
    b = to(random_batch(model.cfg, B=B, L=L, M=M, seed=seed), dev)
    cache = model.prefill(b)
    got, want = padded.score(cache, b["cand_item"], b["req_time"]), model.score(cache, b["cand_item"], b["req_time"])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=RTOL)
    one = {k: v[:1] for k, v in b.items()}
    assert_caches_match(padded.prefill(one), model.prefill(one), atol)
    new, reset = new_events(model.cfg, B, seed, dev)
    got, folded = padded.fold(cache, new, reset, b["cand_item"], b["req_time"])
    want, want_cache = model.fold(cache, new, reset, b["cand_item"], b["req_time"])
    scale = max(1.0, want.abs().max().item() / 25)  # the new tokens push some logits to ~100
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=RTOL)
    assert_caches_match(folded, want_cache, atol)
    assert_caches_match(padded.fold(cache, new, reset)[1], want_cache, atol)


def random_shapes(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(B, L, M) within the caps, and a few repeated, so a bucket is reused with other contents."""
    g = np.random.default_rng(seed)
    shapes = [(int(g.integers(1, MAX_BATCH + 1)), int(g.integers(1, SEQ_LEN + 1)), int(g.integers(1, MAX_CAND + 1)))
              for _ in range(n)]
    return shapes + shapes[:3]


def test_buckets_are_powers_of_two_between_floor_and_cap():
    for cap in (1, 5, 8, 32, 40, 800, 1000):
        got = {bucket(n, cap, FLOOR) for n in range(1, cap + 1)}
        for n in range(1, cap + 1):
            b = bucket(n, cap, FLOOR)
            assert n <= b <= cap and (b == cap or (b >= FLOOR and b & (b - 1) == 0 and b < 2 * max(n, FLOOR)))
        assert buckets(cap, FLOOR) == sorted(got, reverse=True)
    assert buckets(800, FLOOR) == [800, 512, 256, 128, 64, 32, 16] and buckets(6) == [6, 4, 2, 1]


def test_padded_calls_equal_unpadded_for_random_shapes():
    model = make()
    padded = Bucketed(model, MAX_BATCH, MAX_CAND, cuda_graphs=False)
    for i, (B, L, M) in enumerate(random_shapes(12)):
        assert_calls_match(model, padded, B, L, M, seed=i, atol=ATOL)
    assert len({k[1:] for k in padded._calls if k[0] == "score"}) > 3  # several buckets were used


def test_padding_rows_and_columns_change_no_real_row():
    """A request scored again after a call that filled the bucket's padding with other data gets
    bit-identical scores: padding rows, columns and candidates do not reach real ones."""
    model = make()
    padded = Bucketed(model, MAX_BATCH, MAX_CAND, cuda_graphs=False)
    b = random_batch(model.cfg, B=3, L=20, M=10, seed=1)  # bucket (4, 16, 32)
    other = random_batch(model.cfg, B=4, L=32, M=16, seed=2, full=True)  # fills that bucket whole
    with torch.inference_mode():
        cache, filler = model.prefill(b), model.prefill(other)
        want = model.score(cache, b["cand_item"], b["req_time"])
    first = padded.score(cache, b["cand_item"], b["req_time"])
    padded.score(filler, other["cand_item"], other["req_time"])
    again = padded.score(cache, b["cand_item"], b["req_time"])
    assert torch.equal(first, again)
    torch.testing.assert_close(first, want, atol=ATOL, rtol=RTOL)
    _, run = padded._call("score", 4, 16, 32)
    with torch.inference_mode():
        assert torch.isfinite(run()).all()  # the padding row (an empty history) too


def test_cache_last_drops_leading_padding_and_pads():
    model = make()
    b = random_batch(model.cfg, B=2, L=10, M=3, seed=3)
    b["hist_mask"][..., :4] = False
    with torch.inference_mode():
        cache = model.prefill(b)
        want = model.score(cache, b["cand_item"], b["req_time"])
        for n in (6, 10, 13):
            c = cache.last(n)
            assert c.hist_mask.shape[-1] == n and c.kv[0][0].shape[-2] == n
            torch.testing.assert_close(model.score(c, b["cand_item"], b["req_time"]), want, atol=ATOL, rtol=RTOL)


def store_engine(model: Climber) -> Engine:
    """An engine on `model` with no prepared data: histories come from posted events only."""
    cfg = model.cfg
    return Engine(model, SQLiteStore(":memory:", cfg.tasks), np.arange(cfg.n_items - 2), np.arange(cfg.n_users - 1))


def assert_engines_agree(model: Climber, cuda_graphs: bool, atol: float) -> None:
    """Users post events (extensions; window overflows recompute blocks) and are scored in
    batches, some beyond the caps: the bucketed engine answers as the plain one."""
    plain, padded = store_engine(model), store_engine(model)
    padded.use_cuda_graphs(max_batch=4, max_candidates=8, cuda_graphs=cuda_graphs)
    cfg, g, t = model.cfg, np.random.default_rng(0), 1_000_000
    for _ in range(12):
        users = g.choice(10, size=int(g.integers(1, 6)), replace=False)  # 5 users: over max_batch
        for u in users:
            n = int(g.integers(0, 9))
            t += 100
            ev = History(g.integers(0, cfg.n_items - 2, n), t + np.sort(g.integers(0, 50, n)),
                         g.integers(0, cfg.n_actions, n), g.integers(0, cfg.n_scenarios, n),
                         g.integers(0, 2, (n, len(cfg.tasks))))
            for e in (plain, padded):
                e.append_events(int(u), ev)
        reqs = [ScoreRequest(g.integers(2, cfg.n_items, int(g.integers(1, 10))), int(g.integers(0, 2)), t + 60,
                             user=int(u)) for u in users]  # up to 9 candidates: over max_candidates
        for a, b in zip(plain.score_requests(reqs), padded.score_requests(reqs), strict=True):
            assert (a.cache, a.history_length) == (b.cache, b.history_length)
            np.testing.assert_allclose(b.probs, a.probs, atol=atol, rtol=RTOL)
    assert padded.stats == plain.stats and plain.stats["recompute"] and plain.stats["recompute_blocks"] > 12


def test_bucketed_engine_scores_as_the_plain_engine():
    assert_engines_agree(make(), cuda_graphs=False, atol=ATOL)


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA"):
        Bucketed(make(), MAX_BATCH, MAX_CAND, cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_equal_eager_calls_on_gpu():
    """Every call replayed from a graph equals the eager model's, for random shapes, with buckets
    replayed again on other contents (the graphs read their inputs' new values); and an engine
    on graphs scores as an eager one through extensions and recomputes."""
    model = make("cuda")
    graphed = Bucketed(model, MAX_BATCH, MAX_CAND, cuda_graphs=True)
    for i, (B, L, M) in enumerate(random_shapes(12, seed=1)):
        assert_calls_match(model, graphed, B, L, M, seed=100 + i, atol=1e-4)
    assert graphed.warm() == len(graphed._calls) >= len(buckets(SEQ_LEN, FLOOR)) * (len(buckets(MAX_BATCH)) + 2)
    with torch.inference_mode():  # results are copies: a later replay of the bucket leaves them alone
        b1, b2 = (to(random_batch(model.cfg, B=1, L=12, M=3, seed=s), "cuda") for s in (5, 6))
        first = graphed.prefill(b1)
        kept = [k.clone() for k, _ in first.kv]
        graphed.prefill(b2)
        assert all(torch.equal(k, c) for (k, _), c in zip(first.kv, kept, strict=True))
    assert_engines_agree(model, cuda_graphs=True, atol=1e-4)
