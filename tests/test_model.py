"""Model properties on CPU with a tiny config: SUMI equivalence, the KV cache, masks,
adaptivity, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from climber.baselines.common import joint_mask
from climber.embeddings import SMALL_TABLE, lookup
from climber.model import Climber, HistoryCache
from climber.ops.reference import log_bucket, sumi_mask
from climber.runtime import SigmoidGELU
from tests.helpers import perturb, random_batch, tiny_config


def make(**kw):
    torch.manual_seed(0)
    model = Climber(tiny_config(**kw)).eval()
    perturb(model)
    return model


def select(b: dict, cols) -> dict:
    """The same requests with only candidate columns `cols`."""
    out = dict(b)
    for k in ("cand_item", "cand_mask", "labels"):
        out[k] = b[k][:, cols]
    return out


def test_candidates_scored_together_equal_scored_alone():
    model = make()
    b = random_batch(model.cfg, B=4, M=6, full=True)
    together = model(b)
    for j in range(6):
        alone = model(select(b, [j]))
        torch.testing.assert_close(alone[:, 0], together[:, j], atol=1e-5, rtol=1e-5)


def test_permuting_candidates_permutes_scores():
    model = make()
    b = random_batch(model.cfg, B=4, M=6)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(select(b, perm)), model(b)[:, perm], atol=1e-5, rtol=1e-5)


def test_history_keys_and_values_ignore_candidates():
    """In the joint sequence, changing the candidates leaves every layer's history keys and
    values intact (what makes a cache valid), and they equal prefill's."""
    model = make()
    b = random_batch(model.cfg, B=3, M=4, full=True)
    other = dict(b, cand_item=torch.randint(2, model.cfg.n_items, b["cand_item"].shape))
    L = b["hist_item"].shape[-1]
    runs = [model.encode(*model.front(x)[0], L, x["req_scenario"], keep_kv=True) for x in (b, other)]
    cache = model.prefill(b)
    for (k0, v0), (k1, v1), (kc, vc) in zip(runs[0][1], runs[1][1], cache.kv, strict=True):
        torch.testing.assert_close(k0[..., :L, :], k1[..., :L, :], atol=0, rtol=0)
        torch.testing.assert_close(v0[..., :L, :], v1[..., :L, :], atol=0, rtol=0)
        torch.testing.assert_close(k0[..., :L, :], kc, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v0[..., :L, :], vc, atol=1e-6, rtol=1e-6)
        assert not torch.equal(k0[..., L:, :], k1[..., L:, :])
    assert not torch.equal(runs[0][0], runs[1][0])


READOUTS = {"plain": dict(match_readout=False), "match": dict(match_readout=True),
            "pooled": dict(match_readout=False, pooled_readout=True)}


@pytest.mark.parametrize("readout", READOUTS)
def test_forward_equals_score_of_prefill_outputs_and_grads(readout):
    """Training's joint pass and serving's prefill + score are one computation."""
    ref, split = make(dropout=0.0, **READOUTS[readout]), make(dropout=0.0, **READOUTS[readout])
    b = random_batch(ref.cfg, B=5, M=4, seed=7)
    out_r, out_s = ref(b), split.score(split.prefill(b), b["cand_item"], b["req_time"])
    m = b["cand_mask"]
    torch.testing.assert_close(out_s[m], out_r[m], atol=1e-5, rtol=1e-5)
    out_r[m].square().sum().backward()
    out_s[m].square().sum().backward()
    for (name, pr), ps in zip(ref.named_parameters(), split.parameters()):
        if pr.grad is not None:
            scale = pr.grad.abs().max().item()  # fp32 round-off grows with gradient size
            torch.testing.assert_close(ps.grad, pr.grad, atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


HIST = ("hist_item", "hist_time", "hist_action", "hist_scenario", "hist_labels", "hist_mask")


def split_history(b: dict, new: torch.Tensor, reset: torch.Tensor, seed: int) -> tuple[dict, dict]:
    """A batch's histories (B, K, L) cut per block into what a cache already holds and the last
    `new` (B, K) events, each part right-aligned; where `reset` (B, K), the new part is the whole
    window and the old part other random events (a window that overflowed)."""
    B, K, L = b["hist_mask"].shape
    other = random_batch_like(b, seed)
    old, chunk = {k: torch.zeros_like(b[k]) for k in HIST}, {}
    n = max(int(torch.where(reset, b["hist_mask"].sum(-1), new).max()), 1)
    for k in HIST:
        chunk[k] = torch.zeros_like(b[k][:, :, :n])
    for i in range(B):
        for j in range(K):
            count = int(b["hist_mask"][i, j].sum())
            m = count if reset[i, j] else int(new[i, j])
            for k in HIST:
                row = b[k][i, j, L - count:]
                if m:
                    chunk[k][i, j, n - m:] = row[count - m:]
                if reset[i, j]:
                    old[k][i, j] = other[k][i, j]
                elif count - m:
                    old[k][i, j, L - (count - m):] = row[:count - m]
    old.update(req_scenario=b["req_scenario"], user=b["user"])
    return old, chunk


def random_batch_like(b: dict, seed: int) -> dict:
    """Other random histories of the same shapes, earlier in time than b's."""
    B, K, L = b["hist_mask"].shape
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, K, L, generator=g) < 0.7
    out = {k: torch.where(mask.view(*mask.shape, *[1] * (b[k].dim() - 3)), b[k].roll(1, 0), 0) for k in HIST[:-1]}
    out["hist_time"] = torch.where(mask, b["hist_time"].min() - 100, 0)
    out["hist_mask"] = mask
    return out


@pytest.mark.parametrize("readout", READOUTS)
def test_fold_equals_prefill_of_the_longer_history(readout):
    """`fold` adds each block's new events (0 to 3 here, a different count per block) and
    rebuilds reset blocks from their whole window; its cache and the candidates it scores in the
    same pass equal a prefill from scratch of the longer history, and folding alone then scoring
    equals folding while scoring."""
    model = make(**READOUTS[readout])
    b = random_batch(model.cfg, B=3, L=7, M=4, seed=4)
    b["hist_mask"][0, 0] = True  # a full window
    b["hist_time"] = b["hist_time"] * b["hist_mask"]
    g = torch.Generator().manual_seed(5)
    counts = b["hist_mask"].sum(-1)
    new = torch.minimum(torch.randint(0, 4, counts.shape, generator=g), counts)
    reset = torch.zeros_like(counts, dtype=torch.bool)
    reset[1, 2] = reset[2, 0] = True
    old, chunk = split_history(b, new, reset, seed=6)
    t = b["req_time"] + 10
    logits, folded = model.fold(model.prefill(old), chunk, reset, b["cand_item"], t)
    full = model.prefill({**{k: b[k] for k in HIST}, "req_scenario": b["req_scenario"], "user": b["user"]})
    want = model.score(full, b["cand_item"], t)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    L = full.hist_mask.shape[-1]
    cut = folded.last(L)
    assert torch.equal(cut.hist_mask, full.hist_mask)
    assert torch.equal(cut.hist_time[cut.hist_mask], full.hist_time[full.hist_mask])
    m = full.hist_mask[None, None, :, :, None, :, None].expand_as(full.kv)
    torch.testing.assert_close(cut.kv[m], full.kv[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cut.pooled, full.pooled, atol=1e-5, rtol=1e-5)
    _, alone = model.fold(model.prefill(old), chunk, reset)
    torch.testing.assert_close(model.score(alone, b["cand_item"], t), logits, atol=1e-5, rtol=1e-5)


def test_fold_in_bf16_matches_a_bf16_prefill():
    """The serving dtype: in bf16 the fold keeps the query, keys and mask in one dtype (the fused
    attention of the new tokens needs that) and scores as a bf16 prefill of the longer history does,
    to bf16 rounding."""
    model = make(match_readout=True, pooled_readout=True).to(torch.bfloat16)
    b = random_batch(model.cfg, B=2, L=6, M=3, seed=7)
    new = torch.minimum(torch.full(b["hist_mask"].shape[:2], 2), b["hist_mask"].sum(-1))
    old, chunk = split_history(b, new, torch.zeros_like(new, dtype=torch.bool), seed=8)
    t = b["req_time"] + 10
    logits, _ = model.fold(model.prefill(old), chunk, torch.zeros_like(new, dtype=torch.bool), b["cand_item"], t)
    full = model.prefill({**{k: b[k] for k in HIST}, "req_scenario": b["req_scenario"], "user": b["user"]})
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model.score(full, b["cand_item"], t).float(), atol=0.1, rtol=0.05)


def test_stacked_caches_score_as_each_alone():
    """Caches of different lengths, left-padded and stacked, score as they do alone (the match
    readout's mean keys and the pooled readout's means must ignore the padding)."""
    model = make(match_readout=True, pooled_readout=True)
    b1, b2 = random_batch(model.cfg, B=1, L=8, seed=1), random_batch(model.cfg, B=1, L=5, seed=2)
    c1, c2 = model.prefill(b1), model.prefill(b2)
    stacked = HistoryCache.stack([c1, c2])
    cand = torch.cat([b1["cand_item"], b2["cand_item"]])
    got = model.score(stacked, cand, torch.cat([b1["req_time"], b2["req_time"]]))
    torch.testing.assert_close(got[:1], model.score(c1, b1["cand_item"], b1["req_time"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:], model.score(c2, b2["cand_item"], b2["req_time"]), atol=1e-5, rtol=1e-5)
    assert stacked.nbytes == sum(t.numel() * t.element_size() for kv in stacked.kv for t in kv) + sum(
        t.numel() * t.element_size() for t in (stacked.hist_mask, stacked.hist_time, stacked.scenario, stacked.user,
                                               stacked.hist_sum))


def test_joint_mask_by_hand():
    hist = torch.tensor([[False, True, True]])  # one padded slot, two events
    cand = torch.tensor([[True, True]])
    got = joint_mask(hist, cand)[0].int()
    want = torch.tensor([
        # keys: pad h1 h2 c1 c2
        [1, 0, 0, 0, 0],  # pad row sees only itself
        [0, 1, 0, 0, 0],  # h1: itself (causal)
        [0, 1, 1, 0, 0],  # h2: h1, h2
        [0, 1, 1, 1, 0],  # c1: history + itself, not c2
        [0, 1, 1, 0, 1],  # c2: history + itself, not c1
    ])
    assert torch.equal(got, want)
    assert torch.equal(sumi_mask(hist, 3)[0].int(), want[:3, :3])


def test_log_bucket_is_monotone_and_bounded():
    x = torch.arange(0, 5000)
    b = log_bucket(x, 16, exact=8, max_value=2048)
    assert torch.equal(b[:8], x[:8])
    assert (b.diff() >= 0).all() and b.max() == 15


@pytest.mark.parametrize("param", ("log_tau", "pos_bias", "time_bias"))
def test_temperature_and_bias_change_attention(param):
    model = make()
    b = random_batch(model.cfg, B=3, M=4, full=True)
    before = model(b)
    with torch.no_grad():
        getattr(model, param).add_(torch.randn_like(getattr(model, param)))
    assert (model(b) - before).abs().max() > 1e-3


def test_scenario_selects_temperature_and_bias_tables():
    model = make()
    b = random_batch(model.cfg, B=3, M=4, full=True)
    out0 = model(dict(b, req_scenario=torch.zeros(3, dtype=torch.long)))
    with torch.no_grad():  # change only scenario 1's tables: scenario 0 output must not move
        model.log_tau[:, :, 1] += 1.0
        model.pos_bias[:, 1] += 1.0
    assert torch.equal(model(dict(b, req_scenario=torch.zeros(3, dtype=torch.long))), out0)
    b1 = dict(b, req_scenario=torch.ones(3, dtype=torch.long))
    out1 = model(b1)
    with torch.no_grad():
        model.log_tau[:, :, 1] -= 1.0
        model.pos_bias[:, 1] -= 1.0
    assert (model(b1) - out1).abs().max() > 1e-4


def test_ablations_build_and_run():
    for kw in ({"adaptive": False}, {"bgf": False}, {"adaptive": False, "bgf": False}):
        model = make(**kw)
        out = model(random_batch(model.cfg))
        assert out.shape == (3, 5, 2) and torch.isfinite(out).all()
    assert not make(adaptive=False).log_tau.requires_grad


def test_match_readout_is_the_mean_attention_logit():
    """The match features equal q . mean(valid history keys) / tau and log(mean(exp(q . k /
    tau))) over the valid keys, per request, candidate, layer, block and head, computed by a
    loop from the projections; the cached path gives the same features."""
    model = make(match_readout=True)
    L, M = 6, 2
    b = random_batch(model.cfg, B=3, L=L, M=M, seed=3)
    qkvs = []
    hooks = [layer.qkv.register_forward_hook(lambda m, i, o: qkvs.append(o)) for layer in model.layers]
    inputs, _, _ = model.front(b)
    _, _, match = model.encode(*inputs, L, b["req_scenario"])
    for h in hooks:
        h.remove()
    cfg = model.cfg
    K, H, N_L, dh = cfg.n_blocks, cfg.n_heads, cfg.n_layers, cfg.d_head
    want = torch.zeros(3, M, N_L, K, H, 2)
    for layer, out in enumerate(qkvs):
        qkv = out.view(K, 3, L + M, 3, H, dh)
        for i in range(3):
            s = b["req_scenario"][i]
            for blk in range(K):
                valid = b["hist_mask"][i, blk]
                for hd in range(H):
                    keys = qkv[blk, i, :L, 1, hd][valid]
                    if not len(keys):
                        continue  # an empty history matches nothing: 0
                    inv = torch.exp(-model.log_tau[layer, blk, s, hd])
                    logits = qkv[blk, i, L:, 0, hd] @ keys.T * inv  # (M, n)
                    want[i, :, layer, blk, hd, 0] = qkv[blk, i, L:, 0, hd] @ keys.mean(0) * inv
                    want[i, :, layer, blk, hd, 1] = logits.exp().mean(-1).log()
    assert not b["hist_mask"].all(-1).all()  # some padding, whose keys must be ignored
    torch.testing.assert_close(match.view(3, M, N_L, K, H, 2), want, atol=1e-5, rtol=1e-5)
    c0 = model.embed_candidates(b["cand_item"], b["req_scenario"])[None].expand(K, -1, -1, -1)
    cached = model._through_cache(model.prefill(b), c0, b["req_time"])[2]
    torch.testing.assert_close(cached, match, atol=1e-5, rtol=1e-5)


def test_pooled_readout_is_the_mean_of_the_valid_history_embeddings():
    """The pooled readout's per-block means, by a loop over the valid events; an empty block's
    is zero, and the head input is [c, pooled_1 .. pooled_K] and their pairwise dots."""
    from climber.model import _pooled_features

    model = make(pooled_readout=True)
    b = random_batch(model.cfg, B=3, L=6, M=2, seed=5)
    b["hist_mask"][1, 2] = False  # an empty block
    e = model.embed_history(b)
    pooled = model.prefill(b).pooled
    for i in range(3):
        for k in range(model.cfg.n_blocks):
            valid = b["hist_mask"][i, k]
            want = e[i, k][valid].mean(0) if valid.any() else torch.zeros(model.cfg.d_model)
            torch.testing.assert_close(pooled[i, k], want, atol=1e-6, rtol=1e-5)
    c = model.embed_candidates(b["cand_item"], b["req_scenario"])
    got = _pooled_features(c, pooled)
    fields = [c[0, 1]] + list(pooled[0])
    want = torch.cat([*fields, torch.stack([fields[a] @ fields[j] for a in range(len(fields)) for j in range(a)])])
    torch.testing.assert_close(got[0, 1], want, atol=1e-6, rtol=1e-5)


def test_empty_history_gives_finite_scores():
    model = make()
    b = random_batch(model.cfg)
    b["hist_mask"][:] = False
    b["hist_item"][:] = 0
    assert torch.isfinite(model(b)).all()
    torch.testing.assert_close(model(b), model.score(model.prefill(b), b["cand_item"], b["req_time"]), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("bgf,target_product,match_readout,pooled_readout",
                         [(True, True, False, False), (True, False, False, False), (False, True, False, False),
                          (True, False, True, False), (True, False, False, True)])
def test_flops_formula_matches_torch_flop_counter(bgf, target_product, match_readout, pooled_readout):
    model = make(bgf=bgf, target_product=target_product, match_readout=match_readout, pooled_readout=pooled_readout)
    L, M = 8, 5
    b = random_batch(model.cfg, B=1, L=L, M=M, full=True)
    with FlopCounterMode(display=False) as fc:
        model(b)
    assert fc.get_total_flops() == model.flops(L, M)["exact"]


def test_paper_flops_scale_with_length_times_layers():
    cfg = tiny_config()
    f = Climber(cfg).flops(100, 1)["paper"]
    assert Climber(dataclasses.replace(cfg, n_layers=4)).flops(100, 1)["paper"] == 2 * f
    assert Climber(cfg).flops(201, 1)["paper"] == 2 * f


def test_param_counts_split_embedding_and_dense():
    model = make()
    pc = model.param_counts()
    assert pc["embedding"] + pc["dense"] == sum(p.numel() for p in model.parameters())
    assert pc["embedding"] >= model.item_emb.weight.numel()


@pytest.mark.parametrize("rows", (3, 11, 16, SMALL_TABLE + 1))
@pytest.mark.parametrize("compiled", (False, True))
def test_small_table_lookup_gradient_equals_embedding_gradient(rows, compiled):
    """`lookup` (one-hot matmul gradient for small tables, plain lookup above SMALL_TABLE rows):
    the same values and the same table gradient as F.embedding, repeated ids included, in the
    table's dtype when the backward runs under autocast; an out-of-range id is an IndexError."""
    torch.manual_seed(0)
    w = torch.randn(rows, 8, requires_grad=True)
    ids = torch.randint(0, rows, (5, 7, 3))
    ids[0, 0] = 1  # a repeated id
    g = torch.randn(5, 7, 3, 8)
    fn = torch.compile(lookup) if compiled else lookup
    out = fn(ids, w)
    out.backward(g)
    ours, w.grad = w.grad, None
    ref = F.embedding(ids, w)
    ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(ours, w.grad, rtol=1e-6, atol=1e-5)
    ref_grad, w.grad = w.grad, None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward run under autocast: a bf16 matmul
        lookup(ids, w).backward(g)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, ref_grad, rtol=2e-2, atol=5e-2)
    with pytest.raises(IndexError):
        lookup(torch.tensor([rows]), w)


def test_compiled_gelu_is_the_tanh_form():
    """The runtime's `SigmoidGELU` (x sigmoid(2 u)) is the model's GELU (tanh form), eager and
    compiled: values and gradients agree to fp32 rounding; both within 5e-4 of erf GELU."""
    gelu = SigmoidGELU()
    x = torch.linspace(-8, 8, 4001, requires_grad=True)
    g = torch.randn(4001)
    want = F.gelu(x, approximate="tanh")
    (dwant,) = torch.autograd.grad(want, x, g)
    for fn in (gelu, torch.compile(gelu)):
        got = fn(x)
        (dgot,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dgot, dwant, rtol=1e-5, atol=1e-5)
    assert (gelu(x) - F.gelu(x)).abs().max() < 5e-4


def test_bag_feature_embeds_as_the_mean_of_its_values():
    """An item's bag feature (several columns, 0 = unused) adds the mean of its values' rows;
    an empty bag adds nothing; a one-column feature adds its row; prefill + score equals the
    joint pass with bags too."""
    model = make(item_feature_cards=(6, 4), item_feature_widths=(3, 1))
    feats = torch.tensor([[1, 4, 0, 2], [0, 0, 0, 3], [5, 5, 2, 0]])  # items 2, 3, 4: bag (3 cols), one column
    with torch.no_grad():
        model.item_features[2:5] = feats
    bag_w, one_w = model.item_feat_emb[0].weight, model.item_feat_emb[1].weight
    got = model.embed_items(torch.tensor([2, 3, 4]))
    base = model.item_emb(torch.tensor([2, 3, 4]))
    want = torch.stack([(bag_w[1] + bag_w[4]) / 2 + one_w[2], one_w[3], (2 * bag_w[5] + bag_w[2]) / 3 + one_w[0]])
    torch.testing.assert_close(got - base, want, atol=1e-6, rtol=1e-5)
    b = random_batch(model.cfg, B=3, M=4, seed=9)
    torch.testing.assert_close(model.score(model.prefill(b), b["cand_item"], b["req_time"]), model(b), atol=1e-5,
                               rtol=1e-5)


def test_shared_tau_variant_ignores_the_scenario_in_attention():
    """scenario_adaptive=False: one temperature and bias table per block for every scenario, so
    with the scenario embedding zeroed the scores do not depend on the request scenario; the
    adaptive model's (perturbed) tables make them depend on it. Cached == uncached either way."""
    for adaptive in (True, False):
        model = make(scenario_adaptive=adaptive)
        assert model.log_tau.shape[2] == (model.cfg.n_scenarios if adaptive else 1)
        with torch.no_grad():
            model.scenario_emb.weight.zero_()
        b = random_batch(model.cfg, B=3, M=4, seed=11)
        other = dict(b, req_scenario=(b["req_scenario"] + 1) % model.cfg.n_scenarios)
        assert torch.allclose(model(b), model(other), atol=1e-6) != adaptive
        torch.testing.assert_close(model.score(model.prefill(b), b["cand_item"], b["req_time"]), model(b),
                                   atol=1e-5, rtol=1e-5)
