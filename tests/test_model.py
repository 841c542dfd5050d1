"""Model properties on CPU with a tiny config: SUMI equivalence, masks, adaptivity, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from climber.attention import history_mask, joint_mask, log_bucket
from climber.embeddings import SMALL_TABLE, lookup
from climber.model import Climber, gelu
from tests.helpers import perturb, random_batch, tiny_config

IMPLS = ("joint", "split", "sdpa")


def make(impl="split", **kw):
    torch.manual_seed(0)
    model = Climber(tiny_config(attention=impl, **kw)).eval()
    perturb(model)
    return model


def select(b: dict, cols) -> dict:
    """The same requests with only candidate columns `cols`."""
    out = dict(b)
    for k in ("cand_item", "cand_mask", "labels"):
        out[k] = b[k][:, cols]
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_candidates_scored_together_equal_scored_alone(impl):
    model = make(impl)
    b = random_batch(model.cfg, B=4, M=6, full=True)
    together = model(b)
    for j in range(6):
        alone = model(select(b, [j]))
        torch.testing.assert_close(alone[:, 0], together[:, j], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_permuting_candidates_permutes_scores(impl):
    model = make(impl)
    b = random_batch(model.cfg, B=4, M=6)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(select(b, perm)), model(b)[:, perm], atol=1e-5, rtol=1e-5)


def test_joint_history_rows_ignore_candidates():
    """In the joint reference path, changing candidates leaves every history hidden state intact."""
    model = make("joint")
    states = []
    last, run = model.layers[-1], model.layers[-1].joint
    last.joint = lambda *a: states.append(run(*a)) or states[-1]  # record the last layer's output
    b = random_batch(model.cfg, B=3, M=4, full=True)
    other = dict(b, cand_item=torch.randint(2, model.cfg.n_items, b["cand_item"].shape))
    model.forward_joint(b)
    model.forward_joint(other)
    L = b["hist_item"].shape[-1]
    torch.testing.assert_close(states[0][:, :, :L], states[1][:, :, :L], atol=0, rtol=0)
    assert not torch.equal(states[0][:, :, L:], states[1][:, :, L:])


@pytest.mark.parametrize("impl", ("split", "sdpa"))
def test_fast_paths_match_joint_reference_outputs_and_grads(impl):
    ref, fast = make("joint", dropout=0.0), make(impl, dropout=0.0)
    fast.load_state_dict(ref.state_dict())
    b = random_batch(ref.cfg, B=5, M=4, seed=7)
    out_r, out_f = ref(b), fast(b)
    m = b["cand_mask"]
    torch.testing.assert_close(out_f[m], out_r[m], atol=1e-5, rtol=1e-5)
    out_r[m].square().sum().backward()
    out_f[m].square().sum().backward()
    for (name, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        if pr.grad is not None:
            scale = pr.grad.abs().max().item()  # fp32 round-off grows with gradient size
            torch.testing.assert_close(pf.grad, pr.grad, atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


def test_joint_mask_by_hand():
    hist = torch.tensor([[[False, True, True]]])  # one padded slot, two events
    cand = torch.tensor([[True, True]])
    got = joint_mask(hist, cand)[0, 0].int()
    want = torch.tensor([
        # keys: pad h1 h2 c1 c2
        [1, 0, 0, 0, 0],  # pad row sees only itself
        [0, 1, 0, 0, 0],  # h1: itself (causal)
        [0, 1, 1, 0, 0],  # h2: h1, h2
        [0, 1, 1, 1, 0],  # c1: history + itself, not c2
        [0, 1, 1, 0, 1],  # c2: history + itself, not c1
    ])
    assert torch.equal(got, want)
    assert torch.equal(history_mask(hist)[0, 0].int(), want[:3, :3])


def test_log_bucket_is_monotone_and_bounded():
    x = torch.arange(0, 5000)
    b = log_bucket(x, 16, exact=8, max_value=2048)
    assert torch.equal(b[:8], x[:8])
    assert (b.diff() >= 0).all() and b.max() == 15


@pytest.mark.parametrize("param", ("log_tau", "pos_bias", "time_bias"))
def test_temperature_and_bias_change_attention(param):
    model = make("split")
    b = random_batch(model.cfg, B=3, M=4, full=True)
    before = model(b)
    with torch.no_grad():
        getattr(model, param).add_(torch.randn_like(getattr(model, param)))
    assert (model(b) - before).abs().max() > 1e-3


def test_scenario_selects_temperature_and_bias_tables():
    model = make("split")
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
        model = make("split", **kw)
        out = model(random_batch(model.cfg))
        assert out.shape == (3, 5, 2) and torch.isfinite(out).all()
    assert not make("split", adaptive=False).log_tau.requires_grad


def test_empty_history_gives_finite_scores():
    model = make("split")
    b = random_batch(model.cfg)
    b["hist_mask"][:] = False
    b["hist_item"][:] = 0
    assert torch.isfinite(model(b)).all()
    torch.testing.assert_close(model(b), make("joint")(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ("joint", "split"))
@pytest.mark.parametrize("bgf,target_product", [(True, True), (True, False), (False, True)])
def test_flops_formula_matches_torch_flop_counter(impl, bgf, target_product):
    model = make(impl, bgf=bgf, target_product=target_product)
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
    """`gelu` compiled (x sigmoid(2 u)) and eager (F.gelu, tanh form) are one function: values
    and gradients agree to fp32 rounding, and both stay within 5e-4 of exact (erf) GELU."""
    x = torch.linspace(-8, 8, 4001, requires_grad=True)
    g = torch.randn(4001)
    fast = torch.compile(gelu)(x)
    (dfast,) = torch.autograd.grad(fast, x, g)
    eager = gelu(x)
    (deager,) = torch.autograd.grad(eager, x, g)
    torch.testing.assert_close(fast, F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dfast, deager, rtol=1e-5, atol=1e-5)
    assert (eager - F.gelu(x)).abs().max() < 5e-4
