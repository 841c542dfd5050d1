"""Fused history attention for GPU training (PAPER.md 2.3, ATL; issue 5): one Triton kernel
forward and one backward, FlashAttention-style (tiles in SRAM, online softmax, no (L, L)
probability matrix in memory), with the SUMI history mask, the dynamic temperature and f_b;
two more kernels build f_b densely and reduce its gradient.

What the bias really needs: f_b(block, scenario) is shared by every layer of a block, so it
is built densely once per step, (B*K, H, S, S) in the compute dtype, by `prepare` (a kernel
reading the small tables, a position-bucket LUT and per-sample time-gap buckets), and each
layer's kernel reads one bias tile beside its q.k tile: no bucket arithmetic or table
gathers per score element. Backward, each layer adds d bias = dS / tau for its tiles into one
buffer shared by the layers, in the compute dtype (every score element belongs to one program,
so no atomics; bf16 halves this read-modify-write against fp32), and once every layer is done
that sum is reduced to the tables, once per step (one-hot tensor-core dots accumulating in
fp32, all heads of a chunk at once). A scalar "token" output of the bias build, taken by every layer,
is what makes autograd run the reduction after the last layer.

The backward is one pass over the key tiles (each program owns BN keys and walks the query
tiles that see them): dK, dV and d f_b are the program's own, dQ is added tile by tile into
dqkv by atomic adds in its dtype (a bf16 dQ is rounded once per key tile that sees its row,
4 at L = 208, not once; the pass computing delta = rowsum(dO O) zeroes dQ first). That
saves a second pass's recomputation of q.k, the bias read, exp and dO.V, and needs no fp32
buffer to zero and copy back. The exact d(1/tau) for a bf16 output needs each row's sum_j P dP,
summed the same way (fp32).

The sequence is S tokens, the first `n_hist` of them history (causal), the rest candidates
appended for training (PAPER.md 3.1, SUMI): a candidate sees the valid history and itself.

    s_ij = (q_i . k_j + bias_ij) / tau
    allowed: j <= i and ((j < n_hist and key j valid) or j == i)

`fused_attention` takes the packed qkv projection blocks first, (K, B, S, 3, H, dh), as the
model's BlockLinear leaves it (its transpose to (B, K, ...) happens here, outside compiled
graphs); the kernels take any strides with dh contiguous, read q, k, v as views of it and
write their gradients into one buffer with its strides; the output is stored (B, K, S, H, dh) in the input's
order of B and K, which the output projection reads as is. No layout copies in or out,
forward or backward. Leading key tiles that are all padding (histories are left-padded)
are skipped per sample, and so are the query tiles of key tiles only their own rows see.

Correctness: `tests/test_attention_fast.py` checks outputs and the gradients of q, k, v, tau
and both tables against the plain reference path, on the GPU and, through Triton's
interpreter (TRITON_INTERPRET=1), on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the fused path is GPU-only
    triton = None

BLOCK = 64  # the bias kernels' tile (rows and columns); a power of two >= 16 for tl.dot
# the attention kernels' (query rows, key columns, warps, pipeline stages), tuned on the H200 by
# `benchmarks/bench_attention.py --sweep`
TILES = {"fwd": (64, 64, 4, 3), "bwd": (32, 64, 4, 2)}


def available(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@dataclass
class FusedInputs:
    """What the kernels need besides q, k, v and tau, built once per step by `prepare` and
    shared by the layers."""

    bias: torch.Tensor  # (BK, H, S, S) dense f_b in the compute dtype (no autograd: see `token`)
    token: torch.Tensor  # scalar the layers take, so the table reduction runs after all of them
    valid8: torch.Tensor  # (BK, S) int8 key validity
    first: torch.Tensor  # (BK,) int32 first valid key
    n_hist: int  # leading history tokens; later ones (candidates) are keys for their own row only
    grad: dict = field(default_factory=dict)  # "dense": (BK, H, S, S) sum of the layers' d f_b, bias's dtype


class _DenseBias(torch.autograd.Function):
    """(BK, H, P) position and (BK, H, T) time tables, (S, S) position buckets and (BK, S, S)
    time buckets -> dense f_b (BK, H, S, S) in `dtype` and the token; backward reduces the
    layers' summed dense gradient, which the kernels leave causal (zero above the diagonal),
    to the tables."""

    @staticmethod
    def forward(ctx, pos, tim, pb, tb, dtype, grad):
        BK, H, P = pos.shape
        L = pb.shape[0]
        pb, tb = pb.to(torch.int16).contiguous(), tb.to(torch.int16).contiguous()  # bucket ids < 2^15
        bias = torch.empty(BK, H, L, L, dtype=dtype, device=pos.device)
        grid = (BK * H, triton.cdiv(L, BLOCK))
        _bias_fwd_kernel[grid](pos.float().contiguous(), tim.float().contiguous(), pb, tb, bias, H, L, P=P,
                               T=tim.shape[-1], BM=BLOCK, BN=BLOCK, num_warps=4)
        ctx.save_for_backward(pb, tb)
        ctx.sizes = P, tim.shape[-1]
        ctx.grad = grad
        ctx.mark_non_differentiable(bias)
        ctx.set_materialize_grads(False)
        return bias, pos.new_zeros(())

    @staticmethod
    def backward(ctx, _, __):
        pb, tb = ctx.saved_tensors
        P, T = ctx.sizes
        g = ctx.grad.pop("dense", None)  # consumed: a second backward starts from zero
        if g is None:  # no layer ran backward
            return None, None, None, None, None, None
        BK, H, L, _ = g.shape
        # per-bucket sums of g by one kernel that reads g once, as one-hot matmuls on the tensor
        # cores: the buckets do not depend on the head, so a chunk of score entries of all heads
        # (H, C) times the chunk's one-hot buckets (C, P) gives every head's sums at once. Neither
        # scatter-adds (B*K*H*L*L values into a few thousand entries serialise on atomics: 173 ms
        # at B*K = 64, L = 800 on an H200), nor per-sample one-hot products over whole rows
        # (215 ms there), nor per-bucket masked sums (2.9 ms a step at the paper config)
        n_tiles = triton.cdiv(L, BLOCK)
        dpos = torch.empty(BK, n_tiles, H, P, dtype=torch.float32, device=g.device)
        dtim = torch.empty(BK, n_tiles, H, T, dtype=torch.float32, device=g.device)
        _bias_grad_kernel[(BK, n_tiles)](g, pb, tb, dpos, dtim, H, L, P=P, T=T, HP=_dot_width(H), PP=_dot_width(P),
                                         TP=_dot_width(T), BM=BLOCK, BN=BLOCK, PREC=_precision(g.dtype),
                                         num_warps=4)
        return dpos.sum(1), dtim.sum(1), None, None, None, None


def prepare(pos: torch.Tensor, tim: torch.Tensor, pb: torch.Tensor, tb: torch.Tensor, valid: torch.Tensor,
            n_hist: int, dtype: torch.dtype) -> FusedInputs:
    """Per-sample tables pos (BK, H, P), tim (BK, H, T), position buckets pb (S, S), time
    buckets tb (BK, S, S) and key validity (BK, S) -> the kernels' shared inputs."""
    grad: dict = {}
    bias, token = _DenseBias.apply(pos, tim, pb, tb, dtype, grad)
    S = valid.shape[-1]
    idx = torch.where(valid, torch.arange(S, device=valid.device), S)
    first = idx.min(dim=-1).values.to(torch.int32)  # S if no valid key
    return FusedInputs(bias, token, valid.to(torch.int8).contiguous(), first, n_hist, grad)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, inv_tau, token, fi: FusedInputs):
        """qkv (B, K, S, 3, H, dh) (any strides, dh contiguous); inv_tau (B*K, H) fp32 -> (B, K,
        H, S, dh), stored (B, K, S, H, dh) in qkv's order of B and K."""
        B, K, L, _, H, dh = qkv.shape
        if dh < 16 or dh & (dh - 1):
            raise ValueError(f"attention='fused' needs a power-of-two head dim >= 16, not {dh}")
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        q, k, v = split_heads(qkv)
        out = _empty_heads(qkv)
        lse = torch.empty(B * K, H, L, dtype=torch.float32, device=qkv.device)
        inv_tau = inv_tau.contiguous()
        _fwd_kernel[_grid(q, "fwd")](q, k, v, fi.bias, inv_tau, fi.valid8, fi.first, out, lse, *_strides(q, out),
                                     K, H, L, fi.n_hist, **_meta(q, "fwd"))
        ctx.save_for_backward(qkv, inv_tau, out, lse)
        ctx.fi = fi
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, inv_tau, out, lse = ctx.saved_tensors
        fi = ctx.fi
        q, k, v = split_heads(qkv)
        B, K, H, L, dh = q.shape
        dout = dout.to(q.dtype)
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dqkv = torch.empty_like(qkv)  # qkv's strides: the projection's backward reads it as is
        dq, dk, dv = split_heads(dqkv)
        # d f_b, added to the other layers' (zeros before the first layer: key tiles seen by their
        # own rows only leave the query tiles below them unwritten)
        need_dbias = ctx.needs_input_grad[2]
        if need_dbias and "dense" not in fi.grad:
            fi.grad["dense"] = torch.zeros(fi.bias.shape, dtype=fi.bias.dtype, device=q.device)
        dbias = fi.grad.get("dense", fi.bias)  # (an unused pointer without need_dbias)
        dinv = torch.zeros(B * K, H, dtype=torch.float32, device=q.device)
        delta = torch.empty(B * K, H, L, dtype=torch.float32, device=q.device)  # rowsum(dO O)
        _bwd_delta_kernel[_grid(q, "fwd")](dout, out, delta, dq, *_strides(dout, out, dq), K, H, L, DH=dh,
                                           BM=TILES["fwd"][0])
        # dQ is summed over the key tiles by atomic adds into dqkv (zeroed by the delta pass), and
        # so are each row's sum_j P dP and sum_j P (q.k + bias), in fp32, for the exact d(1/tau)
        row_sums = torch.zeros(2, B * K, H, L, dtype=torch.float32, device=q.device)
        _bwd_kernel[_grid(q, "bwd")](q, k, v, fi.bias, inv_tau, fi.valid8, fi.first, dout, lse, delta, dk, dv, dq,
                                     dbias, dinv, row_sums, *_strides(q, dout, dk), K, H, L, fi.n_hist,
                                     DBIAS_GRAD=need_dbias, **_meta(q, "bwd"))
        dinv += ((delta - row_sums[0]) * row_sums[1]).sum(-1)
        token_grad = torch.zeros((), device=q.device) if need_dbias else None
        return dqkv, dinv.to(inv_tau.dtype), token_grad, None


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed (B, K, S, 3, H, dh) projections -> q, k, v (B, K, H, S, dh), as views."""
    return qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)


def _empty_heads(qkv: torch.Tensor) -> torch.Tensor:
    """A (B, K, H, L, dh) output stored (B, K, L, H, dh), or (K, B, L, H, dh) when qkv is
    stored with K outermost (the model's layout): the output projection then reads it as is."""
    B, K, L, _, H, dh = qkv.shape
    if K > 1 and B > 1 and qkv.stride(1) > qkv.stride(0):
        return torch.empty(K, B, L, H, dh, dtype=qkv.dtype, device=qkv.device).permute(1, 0, 3, 2, 4)
    return torch.empty(B, K, L, H, dh, dtype=qkv.dtype, device=qkv.device).transpose(2, 3)


def _strides(*xs: torch.Tensor) -> list[int]:
    """(B, K, H, L, dh) views -> for each, the strides of B, K, H and L (dh is contiguous)."""
    return [s for x in xs for s in x.stride()[:4]]


def _grid(q: torch.Tensor, kernel: str) -> tuple[int, int]:
    """(sample-block x head, tiles): query tiles for fwd, key tiles for bwd."""
    B, K, H, L, _ = q.shape
    BM, BN, _, _ = TILES[kernel]
    return B * K * H, triton.cdiv(L, BN if kernel == "bwd" else BM)


def _meta(q: torch.Tensor, kernel: str) -> dict:
    """Compile-time kernel arguments."""
    BM, BN, warps, stages = TILES[kernel]
    return dict(DH=q.shape[-1], BM=BM, BN=BN, PREC=_precision(q.dtype), num_warps=warps, num_stages=stages)


def _dot_width(n: int) -> int:
    """n padded to a tl.dot operand size: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 inputs get exact (not tf32) products; tf32 is ignored for
    bf16 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


@torch.compiler.disable  # opaque to torch.compile: the kernels are already fused
def fused_attention(qkv: torch.Tensor, inv_tau: torch.Tensor, fi: FusedInputs) -> torch.Tensor:
    """Attention with temperature and dense bias under the SUMI mask; see the module docstring.
    qkv (K, B, S, 3, H, dh) blocks first; inv_tau (B*K, H) fp32 -> (B, K, H, S, dh)."""
    if not available(qkv.device):
        raise RuntimeError("the fused attention kernels need a CUDA GPU and Triton")
    return _FusedAttention.apply(qkv.transpose(0, 1), inv_tau, fi.token, fi)


if triton is not None:

    @triton.jit
    def _program(H, BLOCK: tl.constexpr):
        """This program's (sample-block x head) index bh, its b and h, and its tile's first row
        (or key) and indices. bh is on grid axis 0 (no 65,535 limit), int64 for the offsets."""
        bh = tl.program_id(0).to(tl.int64)
        start = tl.program_id(1) * BLOCK
        return bh, bh // H, bh % H, start, start + tl.arange(0, BLOCK)

    @triton.jit
    def _offset(b, h, NK, sb, sk, sh):
        """Offset of sample-block b = (sample, block) and head h in a strided (B, K, H, L, DH) tensor."""
        return (b // NK) * sb + (b % NK) * sk + h * sh

    @triton.jit
    def _load_rows(X, off, idx, sl, dims, ok):
        """Rows `idx` (with validity `ok`) of the (L, DH) slice at `off` of a strided tensor."""
        return tl.load(X + off + idx[:, None] * sl + dims[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def _store_rows(X, val, off, idx, sl, dims, ok):
        tl.store(X + off + idx[:, None] * sl + dims[None, :], val.to(X.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _tile_scores(q, k, bias_ptrs, inv, valid_ptr, rows, cols, L, NH, PREC: tl.constexpr):
        """Raw q.k + bias (BM, BN) in fp32, the scaled score s and the allowed mask (keys from
        NH on, the candidates, are seen by their own row only)."""
        col_ok = cols < L
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        raw = qk + tl.load(bias_ptrs, mask=(rows[:, None] < L) & col_ok[None, :], other=0.0).to(tl.float32)
        key_ok = tl.load(valid_ptr + cols, mask=col_ok, other=0) != 0
        diag = rows[:, None] == cols[None, :]
        seen = key_ok & (cols < NH)
        ok = (cols[None, :] <= rows[:, None]) & (seen[None, :] | diag) & col_ok[None, :]
        return raw, raw * inv, ok

    @triton.jit
    def _bias_fwd_kernel(POS, TIM, PB, TB, OUT, H, L, P: tl.constexpr, T: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr):
        """One program per (BM rows, sample-block x head): its rows of the dense f_b, each entry
        its position bucket's plus its time bucket's table value, written in the output dtype."""
        bh, b, _, row0, rows = _program(H, BM)
        row_ok = rows < L
        for start in range(0, L, BN):
            cols = start + tl.arange(0, BN)
            ok = row_ok[:, None] & (cols[None, :] < L)
            idx = rows[:, None] * L + cols[None, :]
            pb = tl.load(PB + idx, mask=ok, other=0)
            tb = tl.load(TB + b * L * L + idx, mask=ok, other=0)
            val = tl.load(POS + bh * P + pb, mask=ok, other=0.0) + tl.load(TIM + bh * T + tb, mask=ok, other=0.0)
            tl.store(OUT + bh * L * L + idx, val.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _one_hot(buckets, N: tl.constexpr, dtype: tl.constexpr):
        """(C,) bucket ids -> (C, N) one-hot rows in `dtype` (ids >= N match nothing)."""
        return (buckets[:, None] == tl.arange(0, N)[None, :]).to(dtype)

    @triton.jit
    def _bias_grad_kernel(G, PB, TB, DPOS, DTIM, H, L, P: tl.constexpr, T: tl.constexpr, HP: tl.constexpr,
                          PP: tl.constexpr, TP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          PREC: tl.constexpr):
        """One program per (sample-block b, BM rows): per-head sums of the dense bias gradient
        per position bucket and per time bucket over its rows' causal tiles, one partial per
        row tile (summed in torch): deterministic, no atomics. Rows are taken R at a time, so
        each chunk is (heads, R * BN entries) against (R * BN, buckets) one-hot: a tensor-core
        dot (heads padded to HP >= 16)."""
        R: tl.constexpr = 256 // BN
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        row0 = tile * BM
        heads = tl.arange(0, HP)
        c = tl.arange(0, R * BN)
        acc_p = tl.zeros([HP, PP], tl.float32)
        acc_t = tl.zeros([HP, TP], tl.float32)
        for r0 in range(row0, tl.minimum(row0 + BM, L), R):
            i = r0 + c // BN
            for start in range(0, tl.minimum(r0 + R, L), BN):  # tiles up to the diagonal
                j = start + c % BN
                ok = (i < L) & (j < L)
                idx = i * L + j
                g = tl.load(G + ((b * H + heads[:, None]) * L) * L + idx[None, :],
                            mask=(heads[:, None] < H) & ok[None, :], other=0.0)  # (HP, R * BN)
                pb = tl.load(PB + idx, mask=ok, other=PP)
                tb = tl.load(TB + b * L * L + idx, mask=ok, other=TP)
                # products with 0/1 are exact; the sums accumulate in fp32
                acc_p += tl.dot(g, _one_hot(pb, PP, g.dtype), input_precision=PREC)
                acc_t += tl.dot(g, _one_hot(tb, TP, g.dtype), input_precision=PREC)
        out = (b * tl.num_programs(1) + tile) * H + heads[:, None]
        p_ids, t_ids = tl.arange(0, PP), tl.arange(0, TP)
        tl.store(DPOS + out * P + p_ids[None, :], acc_p, mask=(heads[:, None] < H) & (p_ids[None, :] < P))
        tl.store(DTIM + out * T + t_ids[None, :], acc_t, mask=(heads[:, None] < H) & (t_ids[None, :] < T))

    @triton.jit
    def _fwd_kernel(Q, K, V, BIAS, INV, VALID, FIRST, OUT, LSE, sqb, sqk, sqh, sql, sob, sok, soh, sol, NK, H, L,
                    NH, DH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """One program per (BM query rows, sample-block b, head h): online softmax over the
        causal key tiles from the first tile holding a valid key (or the diagonal tile)."""
        bh, b, h, row0, rows = _program(H, BM)
        dims = tl.arange(0, DH)
        row_ok = rows < L
        qo = _offset(b, h, NK, sqb, sqk, sqh)  # q, k and v share strides (views of one qkv)
        q = _load_rows(Q, qo, rows, sql, dims, row_ok)
        inv = tl.load(INV + bh)
        first = tl.load(FIRST + b)
        lo = tl.minimum(first // BN * BN, row0 // BN * BN)
        m = tl.full([BM], float("-inf"), tl.float32)
        s_sum = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DH], tl.float32)
        for start in range(lo, tl.minimum(row0 + BM, L), BN):
            cols = start + tl.arange(0, BN)
            kv_ok = cols < L
            k = _load_rows(K, qo, cols, sql, dims, kv_ok)
            bias_ptrs = BIAS + bh * L * L + rows[:, None] * L + cols[None, :]
            _, s, ok = _tile_scores(q, k, bias_ptrs, inv, VALID + b * L, rows, cols, L, NH, PREC)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            s_sum = s_sum * alpha + tl.sum(p, axis=1)
            v = _load_rows(V, qo, cols, sql, dims, kv_ok)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
        o = acc / s_sum[:, None]
        _store_rows(OUT, o, _offset(b, h, NK, sob, sok, soh), rows, sol, dims, row_ok)
        tl.store(LSE + bh * L + rows, m + tl.log(s_sum), mask=row_ok)

    @triton.jit
    def _bwd_delta_kernel(DO, OUT, DELTA, DQ, sdb, sdk, sdh, sdl, sob, sok, soh, sol, sgb, sgk, sgh, sgl, NK, H, L,
                          DH: tl.constexpr, BM: tl.constexpr):
        """delta = rowsum(dO O) for BM rows of (b, h), and those rows of dQ zeroed."""
        bh, b, h, row0, rows = _program(H, BM)
        dims = tl.arange(0, DH)
        row_ok = rows < L
        do = _load_rows(DO, _offset(b, h, NK, sdb, sdk, sdh), rows, sdl, dims, row_ok)
        o = _load_rows(OUT, _offset(b, h, NK, sob, sok, soh), rows, sol, dims, row_ok)
        tl.store(DELTA + bh * L + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1), mask=row_ok)
        _store_rows(DQ, tl.zeros([BM, DH], tl.float32), _offset(b, h, NK, sgb, sgk, sgh), rows, sgl, dims, row_ok)

    @triton.jit
    def _bwd_kernel(Q, K, V, BIAS, INV, VALID, FIRST, DO, LSE, DELTA, DK, DV, DQ, DBIAS, DINV, ROWS, sqb, sqk, sqh,
                    sql, sdb, sdk, sdh, sdl, sgb, sgk, sgh, sgl, NK, H, L, NH, DH: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, PREC: tl.constexpr, DBIAS_GRAD: tl.constexpr):
        """One program per (BN keys, b, h), over the query tiles at or below the diagonal: dK and
        dV, dQ added (atomic, in dQ's dtype) into DQ, d bias = dS / tau added per tile to
        the other layers' (if DBIAS_GRAD), sum dS (q.k + bias) into d(1/tau). dS uses delta =
        rowsum(dO O), which is D = sum_j P dP only up to O's rounding (bf16): each row's D and
        sum_j P (q.k + bias) are added into ROWS (2, BK, H, L) for the exact d(1/tau)
        correction sum_i (delta_i - D_i) sum_j P (q.k + bias), made in torch."""
        bh, b, h, col0, cols = _program(H, BN)
        dims = tl.arange(0, DH)
        col_ok = cols < L
        qo, do_off = _offset(b, h, NK, sqb, sqk, sqh), _offset(b, h, NK, sdb, sdk, sdh)
        k = _load_rows(K, qo, cols, sql, dims, col_ok)
        v = _load_rows(V, qo, cols, sql, dims, col_ok)
        inv = tl.load(INV + bh)
        lo = col0 // BM * BM
        # keys that are all padding, or all candidates, are seen by their own row only: the
        # query tiles holding rows col0 .. col0 + BN - 1
        own_only = (col0 + BN <= tl.load(FIRST + b)) | (col0 >= NH)
        hi = tl.where(own_only, tl.minimum(col0 + BN, L), L)
        dk = tl.zeros([BN, DH], tl.float32)
        dv = tl.zeros([BN, DH], tl.float32)
        dinv = tl.zeros([BN], tl.float32)
        n_rows = tl.num_programs(0) * L
        go = _offset(b, h, NK, sgb, sgk, sgh)
        for start in range(lo, hi, BM):
            rows = start + tl.arange(0, BM)
            row_ok = rows < L
            q = _load_rows(Q, qo, rows, sql, dims, row_ok)
            do = _load_rows(DO, do_off, rows, sdl, dims, row_ok)
            lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
            # scores transposed to (BN keys, BM queries) would save the transposes below; kept
            # in (BM, BN) so the mask logic is the forward's
            bias_ptrs = BIAS + bh * L * L + rows[:, None] * L + cols[None, :]
            raw, s, ok = _tile_scores(q, k, bias_ptrs, inv, VALID + b * L, rows, cols, L, NH, PREC)
            p = tl.where(ok & row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            pdp = p * tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = pdp - p * delta[:, None]  # d loss / d s
            dinv += tl.sum(ds * raw, axis=0)
            dsi = ds * inv  # d loss / d (q.k) = d loss / d bias
            if DBIAS_GRAD:  # this program owns these entries: a plain read-modify-write
                db_ptrs = DBIAS + bh * L * L + rows[:, None] * L + cols[None, :]
                db_ok = row_ok[:, None] & col_ok[None, :]
                tl.store(db_ptrs, dsi + tl.load(db_ptrs, mask=db_ok, other=0.0), mask=db_ok)
            dsi = dsi.to(q.dtype)
            dk += tl.dot(tl.trans(dsi), q, input_precision=PREC)
            dq = tl.dot(dsi, k, input_precision=PREC).to(DQ.dtype.element_ty)
            tl.atomic_add(DQ + go + rows[:, None] * sgl + dims[None, :], dq, mask=row_ok[:, None], sem="relaxed")
            tl.atomic_add(ROWS + bh * L + rows, tl.sum(pdp, axis=1), mask=row_ok, sem="relaxed")
            tl.atomic_add(ROWS + n_rows + bh * L + rows, tl.sum(p * raw, axis=1), mask=row_ok, sem="relaxed")
        _store_rows(DK, dk, go, cols, sgl, dims, col_ok)
        _store_rows(DV, dv, go, cols, sgl, dims, col_ok)
        tl.atomic_add(DINV + bh, tl.sum(dinv, axis=0))
