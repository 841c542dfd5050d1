"""The attention backends (climber/ops): the reference against the literal masked formulation,
and the Triton kernels against the reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is
no GPU; skipped if Triton is not installed), so outputs and the gradients of q, k, v, the
temperature and both f_b tables are checked here as on the GPU. The `gpu` tests compare
outputs and all gradients in fp32, and in bf16 against the reference's own bf16 error. The
kernels' `climber::` operators are checked by `torch.library.opcheck`, by one full-graph
compile of `prepare` and two layers' `attend` (equal to eager) and by `torch.export`.
`attend_cached` (serving, forward only) is checked against the reference, output and match
readout, on shapes off the tiles, empty and one-key histories, M = 1, new history tokens folded
in beside the candidates (n = 1 and 3, padding rows) and large logits, and through a model's
`score` and `fold`; on the GPU also in bf16 and replayed from a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

from climber import ops
from climber.model import Climber
from climber.ops import reference, triton_attention
from climber.runtime import Runtime, apply
from tests.helpers import perturb, random_batch, tiny_config

interpreted = pytest.mark.skipif(triton_attention.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs Triton's CPU interpreter")

# (B, K, H, L, dh, pos buckets, time buckets, table blocks, table scenarios), head dims of 16
# and up (tensor-core tiles). In the interpreter: one partial 64-row tile with shared tables
# (the "MSE only" ablation); three tiles, fully padded leading tiles, all-exact time buckets
# (T = 2). On GPU each shape compiles its own kernels.
INTERPRETER_SHAPES = [(2, 3, 1, 37, 16, 32, 32, 3, 1), (3, 2, 2, 140, 16, 8, 2, 2, 3)]
GPU_SHAPES = [INTERPRETER_SHAPES[0], (4, 2, 2, 200, 64, 32, 32, 2, 3), (1, 4, 8, 333, 32, 32, 32, 4, 2)]


def attention_inputs(B, K, H, L, dh, P, T, Kt, St, seed=0, device="cpu"):
    """Random q, k, v, temperature and f_b tables; left-padded histories (one row empty,
    one full) with sorted times and some zero time gaps."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, K, H, L, dh, generator=g) for _ in range(3))
    tau = torch.rand(B, K, H, 1, 1, generator=g) * 2 + 0.5
    pos_table, time_table = torch.randn(Kt, St, H, P, generator=g), torch.randn(Kt, St, H, T, generator=g)
    lengths = torch.randint(0, L + 1, (B, K), generator=g)
    lengths[0, 0], lengths[-1, -1] = 0, L
    hist_mask = torch.arange(L) >= (L - lengths)[..., None]
    time = torch.sort(torch.randint(0, 10**7, (B, K, L), generator=g), dim=-1).values
    time[..., 1::5] = time[..., ::5][..., : time[..., 1::5].shape[-1]]  # repeated timestamps
    scenario = torch.randint(0, St, (B,), generator=g)
    out = dict(q=q, k=k, v=v, tau=tau, pos_table=pos_table, time_table=time_table, hist_mask=hist_mask,
               time=time, scenario=scenario)
    return {n: x.to(device) for n, x in out.items()}


def run(backend, x, grad=True, blocks_outer=False, n_hist=None):
    """One layer's attention on `x` through `backend`, q, k, v packed (K, B, S, 3, H, dh), stored
    (B, K, ...) or, `blocks_outer`, (K, B, ...) in memory (the model's layout, contiguous), the
    tokens from `n_hist` on candidates; returns the output and the inputs that take gradients."""
    leaves = {n: x[n].clone().requires_grad_(grad) for n in ("q", "k", "v", "tau", "pos_table", "time_table")}
    B, K, H, S, dh = x["q"].shape
    n_hist = S if n_hist is None else n_hist
    s = x["scenario"] if leaves["pos_table"].shape[1] > 1 else torch.zeros_like(x["scenario"])
    pos, tim = (leaves[n][:, s].transpose(0, 1).expand(-1, K, -1, -1) for n in ("pos_table", "time_table"))
    i = torch.arange(S, device=x["q"].device).clamp(max=n_hist)
    pb = reference.position_buckets(i[:, None] - i[None, :], pos.shape[-1])
    tb = reference.time_buckets(x["time"][..., :, None] - x["time"][..., None, :], tim.shape[-1])
    qkv = torch.stack([leaves[n].transpose(2, 3) for n in "qkv"], dim=3)  # (B, K, S, 3, H, dh)
    qkv = qkv.transpose(0, 1).contiguous() if blocks_outer else qkv.transpose(0, 1)
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else qkv.dtype
    seq = backend.prepare(pos, tim, pb, tb, x["hist_mask"], n_hist, dtype)
    inv_tau = leaves["tau"][..., 0, 0].reciprocal()
    return backend.attend(qkv.to(dtype) if backend is ops.TRITON else qkv, inv_tau, seq)[0], leaves


def outputs_and_grads(impl, x, blocks_outer=False, n_hist=None) -> dict[str, torch.Tensor]:
    out, leaves = run(impl, x, blocks_outer=blocks_outer, n_hist=n_hist)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out.float() * g).sum().backward()
    return {"out": out.float(), **{n: p.grad.float() for n, p in leaves.items()}}


def with_candidates(x: dict, n_hist: int) -> dict:
    """`x` with the tokens from n_hist on made candidates: all at the request's time."""
    time = x["time"].clone()
    time[..., n_hist:] = time[..., -1:]
    return {**x, "time": time}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@interpreted
@pytest.mark.parametrize(("shape", "blocks_outer"), list(zip(INTERPRETER_SHAPES, (False, True))))
def test_triton_outputs_and_grads_match_reference_in_interpreter(shape, blocks_outer):
    x = attention_inputs(*shape)
    fast, ref = outputs_and_grads(ops.TRITON, x, blocks_outer), outputs_and_grads(ops.REFERENCE, x)
    for name in ref:
        assert relative_error(fast[name], ref[name]) < 1e-4, name  # fp32 round-off over long sums


@interpreted
@pytest.mark.parametrize(("shape", "n_hist"), [(INTERPRETER_SHAPES[0], 30), (INTERPRETER_SHAPES[1], 64)])
def test_triton_candidate_rows_match_reference_in_interpreter(shape, n_hist):
    """Candidates appended after n_hist history tokens (training's joint pass): each sees the
    valid history and itself. At n_hist = 64 whole key tiles are candidates, which the backward
    pass visits on their diagonal tile only."""
    x = with_candidates(attention_inputs(*shape), n_hist)
    fast, ref = outputs_and_grads(ops.TRITON, x, True, n_hist), outputs_and_grads(ops.REFERENCE, x, n_hist=n_hist)
    for name in ref:
        assert relative_error(fast[name], ref[name]) < 1e-4, name


@interpreted
@pytest.mark.parametrize("tiles", [(16, 32, 4, 1), (32, 16, 4, 1)])
def test_triton_any_tile_shape_matches_reference_in_interpreter(tiles, monkeypatch):
    """Query tiles narrower or wider than key tiles (what the tile sweep picks from), with
    candidates from n_hist = 40 on: whole key tiles of candidates and padding are visited on
    their diagonal rows only, however many query tiles those rows span."""
    monkeypatch.setattr(triton_attention, "TILES", {k: tiles for k in ("fwd", "bwd")})
    x = with_candidates(attention_inputs(*INTERPRETER_SHAPES[1]), 40)
    fast, ref = outputs_and_grads(ops.TRITON, x, True, n_hist=40), outputs_and_grads(ops.REFERENCE, x, n_hist=40)
    for name in ref:
        assert relative_error(fast[name], ref[name]) < 1e-4, name


def check_table_gradients(dtype: torch.dtype, device: str) -> None:
    """The layers' summed d f_b (lower triangular, in the compute dtype) reduces to the tables as
    exact per-head sums over each position and time bucket (one-hot tensor-core dots)."""
    g = torch.Generator().manual_seed(0)
    BK, H, S, P, T = 3, 3, 70, 32, 8
    pos = torch.zeros(BK, H, P, device=device, requires_grad=True)
    tim = torch.zeros(BK, H, T, device=device, requires_grad=True)
    pb, tb = torch.randint(0, P, (S, S), generator=g), torch.randint(0, T, (BK, S, S), generator=g)
    dense = torch.randn(BK, H, S, S, generator=g).tril().to(dtype)
    bias = torch.ops.climber.dense_bias(pos, tim, pb.to(device, torch.int16), tb.to(device, torch.int16), dtype)
    bias.backward(dense.to(device))
    dense = dense.float()
    want_pos = torch.zeros(BK, H, P).index_add_(2, pb.flatten(), dense.reshape(BK, H, -1))
    want_tim = torch.stack([torch.zeros(H, T).index_add_(1, tb[b].flatten(), dense[b].reshape(H, -1))
                            for b in range(BK)])
    torch.testing.assert_close(pos.grad.cpu(), want_pos, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tim.grad.cpu(), want_tim, rtol=1e-5, atol=1e-4)


@interpreted
def test_table_gradients_are_exact_bucket_sums_in_interpreter():
    check_table_gradients(torch.float32, "cpu")  # the interpreter mishandles bf16 dot products


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_table_gradients_are_exact_bucket_sums_on_gpu(dtype):
    check_table_gradients(dtype, "cuda")


def check_model_gradients(device: str, compiled: bool = False) -> None:
    """The whole model, training mode (the joint [history; candidates] sequence): with the
    Triton backend, logits and every parameter's gradient equal the reference's, over two
    backward passes of different batches accumulating (each pass carries its layers' summed
    d f_b afresh). `compiled`: three layers under the runtime's regional compile, whose layer
    regions each end with the next layer's input norm; the second batch's shapes make the
    graphs dynamic."""
    torch.manual_seed(0)
    layers = 3 if compiled else 2
    ref = Climber(tiny_config(d_model=32, seq_len=20, n_layers=layers))
    perturb(ref)
    fast = Climber(tiny_config(d_model=32, seq_len=20, n_layers=layers))
    fast.load_state_dict(ref.state_dict())
    apply(fast, Runtime(device=device, attention="triton", compile=compiled))
    fast.stream_dtype = None  # fp32 here, no autocast
    batches = [{k: v.to(device) for k, v in random_batch(ref.cfg, B=3, L=L, M=M, seed=s).items()}
               for s, (L, M) in enumerate([(20, 4), (13, 6)], start=2)]
    logits = []
    for m in (ref, fast):  # tiny_config has no dropout
        for b in batches:
            logits.append(m.to(device)(b))
            logits[-1].square().mean().backward()
    for got, want in zip(logits[2:], logits[:2]):
        assert relative_error(got, want) < 1e-5
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.grad is not None:
            assert q.grad is not None, name
            # d log_tau = sum_ij dS_ij (q.k + bias)_ij / tau, and the bias tables' gradients are
            # sums of dS_ij / tau over buckets: each row's dS sums to zero, so their terms cancel
            # and the rounding of the two paths' states shows up ~100x magnified (log_tau 1.3e-4
            # compiled on the H200, 1.1e-4 in the interpreter; pos_bias 1.3e-4 on the H200);
            # an error in these gradients would be O(1)
            tol = 1e-3 if name in ("log_tau", "pos_bias", "time_bias") else 1e-4
            assert relative_error(q.grad, p.grad) < tol, name


@interpreted
def test_triton_model_gradients_match_reference_in_interpreter():
    check_model_gradients("cpu")


@interpreted
@pytest.mark.slow
def test_compiled_triton_model_gradients_match_reference_in_interpreter():
    check_model_gradients("cpu", compiled=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", (False, True))
def test_triton_model_gradients_match_reference_on_gpu(compiled):
    check_model_gradients("cuda", compiled)


@interpreted
def test_triton_rejects_head_dims_the_kernels_cannot_tile():
    x = attention_inputs(2, 1, 2, 8, 8, 8, 8, 1, 1)
    with pytest.raises(ValueError, match="head dim"):
        run(ops.TRITON, x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("blocks_outer", (False, True))
def test_triton_outputs_and_grads_match_reference_fp32(shape, blocks_outer):
    x = attention_inputs(*shape, device="cuda")
    fast, ref = outputs_and_grads(ops.TRITON, x, blocks_outer), outputs_and_grads(ops.REFERENCE, x)
    for name in ref:
        # d tau sums L^2 terms of both signs per (sample, head) (seen on the H200: 1.02e-4 at L =
        # 200, fp32 round-off of the cancelling sum); everything else is within 1e-4
        assert relative_error(fast[name], ref[name]) < (3e-4 if name == "tau" else 1e-4), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES[-1:])
def test_triton_bf16_is_as_accurate_as_reference_bf16(shape):
    """Under bf16 autocast, the Triton output and gradients are about as far from the fp32
    reference as the reference path's own bf16 run: round-off, not a bug."""
    x = attention_inputs(*shape, device="cuda")
    exact = outputs_and_grads(ops.REFERENCE, x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast, ref = outputs_and_grads(ops.TRITON, x, blocks_outer=True), outputs_and_grads(ops.REFERENCE, x)
    for name in exact:
        e_fast, e_ref = relative_error(fast[name], exact[name]), relative_error(ref[name], exact[name])
        assert e_fast < 2 * e_ref + 1e-3, f"{name}: triton {e_fast:.1e}, reference {e_ref:.1e}"


def op_cases(device: str) -> list[tuple[str, tuple]]:
    """(op name, small inputs) for each of the kernels' operators: a partial tile, candidates
    from n_hist = 12 on, some invalid keys, qkv strided (K, B) as the model stores it."""
    g = torch.Generator().manual_seed(0)
    B, K, H, S, dh, P, T = 1, 2, 2, 20, 16, 8, 4
    BK = B * K

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    pb = torch.randint(0, P, (S, S), generator=g).to(device, torch.int16)
    tb = torch.randint(0, T, (BK, S, S), generator=g).to(device, torch.int16)
    qkv, inv, bias = rand(K, B, S, 3, H, dh).transpose(0, 1), rand(BK, H).exp(), rand(BK, H, S, S)
    valid = (torch.rand(BK, S, generator=g) > 0.3).to(device)
    first = torch.where(valid, torch.arange(S, device=device), S).min(-1).values.to(torch.int32)
    fwd = (qkv, inv, bias, bias, valid.to(torch.int8), first, 12)
    out, lse, _ = torch.ops.climber.attention(*(a.detach() if torch.is_tensor(a) else a for a in fwd))
    bwd = (rand(*out.shape, grad=False), qkv.detach(), inv.detach(), bias.detach(), *fwd[4:6], out, lse,
           rand(BK, H, S, S, grad=False).tril(), 12)
    # attend_cached (forward only, inputs without gradients): 3 new history tokens and M = 5
    # candidates against the S cached keys
    new, cache = (rand(K, B, n, 3, H, dh, grad=False).permute(3, 1, 0, 4, 2, 5).unbind(0) for n in (8, S))
    valid8 = torch.cat([fwd[4], torch.tensor([[0, 1, 1]] * BK, dtype=torch.int8, device=device)], -1)
    cached = (*new, inv.detach().view(B, K, H), *cache[1:], rand(BK * H, S + 3, grad=False), rand(BK * H, grad=False),
              rand(BK * H, 3, S + 3, grad=False), valid8, True)
    return [("dense_bias", (rand(BK, H, P), rand(BK, H, T), pb, tb, torch.float32)),
            ("dense_bias_backward", (rand(BK, H, S, S, grad=False).tril(), pb, tb, P, T)),
            ("attention", fwd), ("attention_backward", bwd), ("attend_cached", cached)]


@interpreted
@pytest.mark.parametrize("case", range(5))
def test_triton_ops_pass_opcheck_in_interpreter(case):
    """Each operator's schema (mutations declared, no output aliasing an input), its fake
    implementation (shapes, dtypes and strides equal to the real outputs'), its autograd
    registration and its behaviour under AOTAutograd with dynamic shapes. Under the interpreter
    they are opaque custom ops; the GPU test checks the triton_op registrations."""
    name, args = op_cases("cpu")[case]
    torch.library.opcheck(getattr(torch.ops.climber, name), args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", range(5))
def test_triton_ops_pass_opcheck_on_gpu(case):
    name, args = op_cases("cuda")[case]
    torch.library.opcheck(getattr(torch.ops.climber, name), args)


def two_layers(x: dict, n_hist: int):
    """(f, inputs): f runs prepare and two layers' attend on the packed q, k, v, temperature and
    tables of `x` and returns the layers' summed output; f_b's gradient passes layer to layer."""
    B, K, H, S, dh = x["q"].shape
    device = x["q"].device
    i = torch.arange(S, device=device).clamp(max=n_hist)
    pb = reference.position_buckets(i[:, None] - i[None, :], x["pos_table"].shape[-1])
    tb = reference.time_buckets(x["time"][..., :, None] - x["time"][..., None, :], x["time_table"].shape[-1])

    def f(qkv, tau, pos_table, time_table):
        pos, tim = (t[:, x["scenario"]].transpose(0, 1) for t in (pos_table, time_table))
        seq = ops.TRITON.prepare(pos, tim, pb, tb, x["hist_mask"], n_hist, qkv.dtype)
        y1, seq = ops.TRITON.attend(qkv, 1 / tau, seq)
        y2, seq = ops.TRITON.attend(qkv * 2, 0.5 / tau, seq)
        return y1 + y2

    qkv = torch.stack([x[n].transpose(2, 3) for n in "qkv"], dim=3).transpose(0, 1).contiguous()
    return f, (qkv, x["tau"][..., 0, 0], x["pos_table"], x["time_table"])


def compiled_and_eager(x: dict, n_hist: int, backend: str):
    """The output and the gradients of every input, eager and under torch.compile(fullgraph=True)
    (which fails on any graph break)."""
    f, inputs = two_layers(x, n_hist)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=backend)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.square().sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    return results


@interpreted
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_prepare_and_attend_compile_as_one_graph_in_interpreter(backend):
    """prepare and two layers' attend trace into one graph, forward and backward, and the compiled
    function gives the eager results to the bit (the same kernels; in the interpreter the ops
    are opaque, so this checks their registration, not inductor's use of the kernels)."""
    x = with_candidates(attention_inputs(2, 2, 2, 20, 16, 8, 4, 2, 1), 16)
    eager, compiled = compiled_and_eager(x, 16, backend)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prepare_and_attend_compile_as_one_graph_on_gpu():
    """On the GPU inductor traces through the triton_ops and launches the kernels itself. The
    gradients are summed by atomic adds in no fixed order, so compiled and eager agree to fp32
    round-off, not to the bit (seen on an H100: entries differ by at most 9e-5 of the tensor's
    largest, d tau; dqkv by 2.5e-6). Before the kernels wrote the packed gradient through its
    base, inductor handed them re-laid-out clones of the q, k, v views, and a quarter of dQ
    was garbage."""
    x = with_candidates(attention_inputs(*GPU_SHAPES[1], device="cuda"), 150)
    eager, compiled = compiled_and_eager(x, 150, "inductor")
    for name, got, want in zip(("output", "qkv", "tau", "pos", "time"), compiled, eager):
        assert relative_error(got, want) < (3e-4 if name == "tau" else 1e-4), name


@interpreted
def test_prepare_and_attend_export():
    """torch.export keeps the operators as calls to `climber::` ops; the program gives the eager
    output."""
    x = with_candidates(attention_inputs(2, 2, 2, 20, 16, 8, 4, 2, 1), 16)
    f, inputs = two_layers(x, 16)
    program = torch.export.export(type("Attention", (torch.nn.Module,), {"forward": lambda self, *a: f(*a)})(),
                                  inputs)
    targets = {str(n.target) for n in program.graph.nodes}
    assert {"climber.dense_bias.default", "climber.attention.default"} <= targets
    assert torch.equal(program.module()(*inputs), f(*inputs))


# ---- attend_cached: new tokens against a history cache (serving), forward only ------------------
# (B, K, H, M new tokens, L cached keys, dh): the new tokens and the cache both off the 64-row
# tiles, over several key tiles and within one; M = 1 (Climber.extend); M over two query tiles
# against a cache shorter than a tile; every head dim the model allows.
CACHED_SHAPES = [(2, 3, 2, 37, 70, 16), (1, 3, 1, 1, 130, 32), (2, 2, 2, 70, 20, 64), (1, 3, 1, 5, 9, 128)]


def cached_inputs(B, K, H, M, L, dh, seed=0, scale=1.0, dtype=torch.float32, device="cpu", n=0) -> dict:
    """`attend_cached`'s inputs in the model's layouts: n new history tokens then M candidates,
    their q, k, v views of one packed projection (K, B, n + M, 3, H, dh), the cached keys and
    values views of another (as prefill leaves them), 1 / tau expanded over blocks. Left-padded
    histories of random length with some holes; the first three (sample, block) rows have no
    valid key, one, and L less holes. The new tokens are right-aligned, a random number of them
    valid, none in the first row (so it has no valid key at all), all of them in the fourth
    (whose cache is empty). `scale` multiplies q and the cached keys (large logits)."""
    g = torch.Generator().manual_seed(seed)

    def heads(rows, scaled):  # (K, B, rows, 3, H, dh), part `scaled` times `scale` -> q, k, v (B, K, H, rows, dh)
        packed = torch.randn(K, B, rows, 3, H, dh, generator=g)
        packed[..., scaled, :, :] *= scale
        return packed.to(device, dtype).permute(3, 1, 0, 4, 2, 5).unbind(0)

    q, k, v = heads(n + M, 0)
    _, k_hist, v_hist = heads(L, 1)
    lengths = torch.randint(0, L + 1, (B, K), generator=g)
    lengths.view(-1)[:4] = torch.tensor([0, 1, L, 0])[:B * K]
    valid = (torch.arange(L) >= L - lengths[..., None]) & ((torch.rand(B, K, L, generator=g) > 0.2)
                                                           | (lengths <= 1)[..., None])
    inv_tau = (torch.rand(B, 1, H, generator=g) * 2 + 0.5).expand(B, K, H)[..., None, None]
    hist_bias, self_bias = torch.randn(B, K, H, 1, L + n, generator=g) * 2, torch.randn(B, K, H, 1, 1, generator=g)
    new = {}
    if n:
        added = torch.randint(0, n + 1, (B, K), generator=g)
        added.view(-1)[:4] = torch.tensor([0, n, n, n])[:B * K]
        valid = torch.cat([valid, torch.arange(n) >= n - added[..., None]], -1)
        new["new_bias"] = (torch.randn(B, K, H, n, L + n, generator=g) * 2).to(device, dtype)
    return dict(q=q, k=k, v=v, inv_tau=inv_tau.to(device, dtype), k_hist=k_hist, v_hist=v_hist,
                hist_bias=hist_bias.to(device, dtype), self_bias=self_bias.to(device, dtype),
                hist_valid=valid.to(device), **new)


def assert_cached_match_reference(x: dict, rtol: float, atol: float) -> None:
    """The kernel's output (new tokens' rows and candidates') and both match features (the
    candidates') equal the reference's; without `match` the kernel gives the same output and no
    features."""
    (y, m), (y_ref, m_ref) = (impl.attend_cached(**x, match=True) for impl in (ops.TRITON, ops.REFERENCE))
    M = x["q"].shape[-2] - (x["hist_valid"].shape[-1] - x["k_hist"].shape[-2])  # less the new tokens
    assert y.dtype == x["q"].dtype and m.dtype == torch.float32 and m.shape == (*x["q"].shape[:-2], M, 2)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(m[..., 0], m_ref[..., 0], rtol=rtol, atol=atol, msg="mean logit")
    torch.testing.assert_close(m[..., 1], m_ref[..., 1], rtol=rtol, atol=atol, msg="log-mean-exp")
    empty = ~x["hist_valid"].any(-1)
    assert empty.any() and (m[empty] == 0).all()  # no valid key: both features 0
    y_only, none = ops.TRITON.attend_cached(**x, match=False)
    assert none is None and torch.equal(y_only, y)


@interpreted
@pytest.mark.parametrize("shape", CACHED_SHAPES)
def test_triton_cached_matches_reference_in_interpreter(shape):
    assert_cached_match_reference(cached_inputs(*shape), rtol=1e-5, atol=1e-5)


# (B, K, H, M, L, dh, n): new history tokens folded in with the candidates: n = 1 and 3 (some
# padding rows), candidates over two tiles (not a multiple of 64), the cache over three key tiles
# with leading padding tiles, and within one
FOLD_SHAPES = [(2, 3, 2, 70, 130, 16, 1), (2, 3, 2, 70, 130, 16, 3), (1, 4, 2, 65, 20, 32, 3)]


@interpreted
@pytest.mark.parametrize("shape", FOLD_SHAPES)
def test_triton_cached_with_new_tokens_matches_reference_in_interpreter(shape):
    """New history tokens and candidates in one kernel: every row of the output (the new tokens'
    first) and the candidates' match readout, over the cached and the new keys."""
    *shape, n = shape
    x = cached_inputs(*shape, n=n)
    assert x["hist_valid"][..., -n:].any() and not x["hist_valid"][..., -n:].all()  # some padding rows
    assert_cached_match_reference(x, rtol=1e-5, atol=1e-5)
    y, _ = ops.TRITON.attend_cached(**x, match=True)
    assert y.shape[-2] == n + shape[3]
    y_ref, _ = ops.REFERENCE.attend_cached(**x, match=True)
    assert relative_error(y[..., :n, :], y_ref[..., :n, :]) < 1e-4  # the new tokens' rows on their own


@interpreted
def test_triton_cached_large_logits_do_not_overflow_in_interpreter():
    """Logits q.k / tau up to some 4e4 (exp overflows fp32 beyond 88): both online log-sum-exps
    keep every exponent <= 0. Features that large differ from the reference's by fp32 round-off
    of the logits (summed in another order), some 1e-4 absolute."""
    x = cached_inputs(*CACHED_SHAPES[0], scale=30.0)
    assert x["q"].abs().max() * x["k_hist"].abs().max() > 3000
    assert_cached_match_reference(x, rtol=1e-5, atol=1e-3)


@interpreted
def test_triton_serving_equals_reference_in_interpreter():
    """`Climber.score` and `Climber.fold` (one attend_cached per layer for the new tokens and the
    candidates, match readout on) give the same logits and new keys and values with either
    backend, against one prefilled cache; so does a fold with no candidates."""
    torch.manual_seed(0)
    model = Climber(tiny_config(d_model=32, seq_len=20, match_readout=True)).eval()  # head dim 16
    perturb(model)
    b = random_batch(model.cfg, B=3, L=20, M=6, seed=2)
    B, K, _ = b["hist_mask"].shape
    new = {n: b[n][:, :1, -2:].expand(B, K, 2, *b[n].shape[3:]) for n in b if n.startswith("hist_")}
    new["hist_time"] = b["req_time"][:, None, None].expand(B, K, 2)
    new["hist_mask"] = torch.rand(B, K, 2, generator=torch.Generator().manual_seed(0)) < 0.6
    new["hist_mask"][..., 1] |= new["hist_mask"][..., 0]  # right-aligned
    reset = torch.zeros(B, K, dtype=torch.bool)
    reset[0, 1] = True
    with torch.inference_mode():
        cache = model.prefill(b)
        out = {}
        for name in ("reference", "triton"):
            model.attention = ops.backend(name, "cpu")
            out[name] = (model.score(cache, b["cand_item"], b["req_time"]),
                         *model.fold(cache, new, reset, b["cand_item"], b["req_time"]),
                         model.fold(cache, new, reset)[1])
    (logits_ref, folded_logits_ref, folded_ref, _), (logits, folded_logits, folded, alone) = out.values()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded_logits, folded_logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.kv, folded_ref.kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.kv, folded_ref.kv, rtol=1e-5, atol=1e-5)  # the new tokens alone (no candidates)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [*CACHED_SHAPES, (1, 3, 4, 1000, 800, 64)])  # the last: the serving benchmark's
def test_triton_cached_matches_reference_on_gpu(shape):
    assert_cached_match_reference_on_gpu(shape)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [*FOLD_SHAPES, (1, 3, 4, 1000, 800, 64, 16)])  # the last: a serving fold's
def test_triton_cached_with_new_tokens_matches_reference_on_gpu(shape):
    *shape, n = shape
    assert_cached_match_reference_on_gpu(shape, n)


def assert_cached_match_reference_on_gpu(shape, n=0):
    """fp32 to round-off; bf16 inputs about as far from the fp32 reference (on the same rounded
    inputs) as the reference's own bf16 run (torch's default: no tf32 in the fp32 reference's matmuls)."""
    x = cached_inputs(*shape, device="cuda", n=n)
    assert_cached_match_reference(x, rtol=1e-5, atol=1e-5)
    x = cached_inputs(*shape, dtype=torch.bfloat16, device="cuda", n=n)
    exact = ops.REFERENCE.attend_cached(**{k: t.float() if t.is_floating_point() else t for k, t in x.items()},
                                        match=True)
    fast, ref = ops.TRITON.attend_cached(**x, match=True), ops.REFERENCE.attend_cached(**x, match=True)
    for name, i in (("output", 0), ("match", 1)):
        e_fast, e_ref = relative_error(fast[i].float(), exact[i]), relative_error(ref[i].float(), exact[i])
        assert e_fast < 2 * e_ref + 1e-3, f"{name}: triton {e_fast:.1e}, reference {e_ref:.1e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_cached_is_captured_by_a_cuda_graph():
    """attend_cached (3 new tokens and the candidates) captured in a CUDA graph (no host
    synchronisation, no data-dependent shape) and replayed on new inputs copied into the
    captured ones equals an eager call on those."""
    shape = (2, 3, 4, 100, 300, 64)
    static = {n: t.clone() for n, t in cached_inputs(*shape, dtype=torch.bfloat16, device="cuda", n=3).items()}
    ops.TRITON.attend_cached(**static, match=True)  # compiles the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, m = ops.TRITON.attend_cached(**static, match=True)
    new = cached_inputs(*shape, seed=1, dtype=torch.bfloat16, device="cuda", n=3)
    for n, t in static.items():
        t.copy_(new[n])
    graph.replay()
    y_eager, m_eager = ops.TRITON.attend_cached(**new, match=True)
    assert torch.equal(y, y_eager) and torch.equal(m, m_eager)


def test_auto_picks_the_reference_where_the_kernels_cannot_run(monkeypatch):
    """A model trained with the Triton kernels evaluates and serves on a CPU without Triton;
    asking for them there is a clear error."""
    assert ops.backend("auto", "cpu") is ops.REFERENCE  # CPU: the reference even with the interpreter
    monkeypatch.setattr(triton_attention, "available", lambda device: False)
    assert ops.backend("auto", "cuda") is ops.REFERENCE
    with pytest.raises(ValueError, match="triton attention backend needs"):
        ops.backend("triton", "cpu")


def dense_attention(x, n_hist):
    """The literal formulation: softmax((q k^T + f_b) / tau) over the whole (S, S) score matrix
    under the SUMI mask, f_b gathered densely."""
    B, K, H, S, dh = x["q"].shape
    i = torch.arange(S).clamp(max=n_hist)
    rel = reference.position_buckets(i[:, None] - i[None, :], x["pos_table"].shape[-1])
    dt = reference.time_buckets(x["time"][..., :, None] - x["time"][..., None, :], x["time_table"].shape[-1])
    s = x["scenario"] if x["pos_table"].shape[1] > 1 else torch.zeros_like(x["scenario"])
    bias = torch.empty(B, K, H, S, S)
    for b in range(B):
        for k in range(K):
            kt = k if x["pos_table"].shape[0] > 1 else 0
            bias[b, k] = x["pos_table"][kt, s[b]][:, rel] + x["time_table"][kt, s[b]][:, dt[b, k]]
    scores = (x["q"] @ x["k"].transpose(-1, -2) + bias) / x["tau"]
    allowed = reference.sumi_mask(x["hist_mask"], n_hist)[:, :, None]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ x["v"]


@pytest.mark.parametrize("n_hist", (37, 30, 1))
def test_reference_equals_the_dense_masked_formulation(n_hist):
    """The reference computes history rows (L, L) and candidate rows (M, L + 1); the literal
    (S, S) masked softmax is the same function."""
    x = with_candidates(attention_inputs(*INTERPRETER_SHAPES[0]), n_hist)
    got, _ = run(ops.REFERENCE, x, grad=False, n_hist=n_hist)
    torch.testing.assert_close(got, dense_attention(x, n_hist), rtol=1e-5, atol=1e-5)
