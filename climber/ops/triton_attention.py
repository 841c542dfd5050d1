"""The ATL attention on the GPU in Triton (docs/paper.md 2.3 and 3.1): `prepare` and `attend`
with the meaning of `climber/ops/reference.py`, FlashAttention-style (tiles in SRAM, online
softmax, no (S, S) probability matrix in memory), with the SUMI mask, the temperature and f_b.
Four kernels: f_b built densely, attention forward, attention backward (one pass), and f_b's
gradient reduced to the tables. A fifth, forward only, serves `attend_cached` (new history
tokens and candidates against a history cache, below).

f_b(block, scenario) is shared by every layer of a block, so `prepare` builds it densely once
per forward, (B*K, H, S, S) in the compute dtype, from the small tables, the position buckets
and the per-sample time buckets; each layer's kernel reads one bias tile beside its q.k tile:
no bucket arithmetic or table gathers per score element. Backward, each layer adds d f_b =
dS / tau for its tiles into one dense buffer in the compute dtype (every score element belongs
to one program, so no atomics), and once every layer is done that sum is reduced to the tables,
once per step (one-hot tensor-core dots accumulating in fp32, all heads of a chunk at once).
The buffer is carried by autograd: each layer's op takes, beside f_b, a "link" input (f_b
itself for the first layer, the previous layer's link output after that) and returns a link of
its own, one zero expanded to f_b's shape, that holds no data; so the gradient that reaches a
layer's backward through its link is the later layers' sum, to which it adds its own in place.

The kernels are PyTorch operators (`climber::dense_bias`, `climber::attention` and their
`_backward`s; see the end of the file): `torch.library.triton_op`s on the GPU, so
torch.compile and torch.export trace `prepare` and `attend` without graph breaks and inductor
launches the kernels itself; opaque `custom_op`s under Triton's CPU interpreter, whose kernels
`wrap_triton` cannot trace. Eager, both launch the same kernels with the same arguments.

The backward is one pass over the key tiles (each program owns BN keys and walks the query
tiles that see them): dK, dV and d f_b are the program's own, dQ is added tile by tile into
dqkv by atomic adds in its dtype (a bf16 dQ is rounded once per key tile that sees its row,
4 at S = 208, not once; the pass computing delta = rowsum(dO O) zeroes dQ first). That saves a
second pass's recomputation of q.k, the bias read, exp and dO.V, and needs no fp32 buffer to
zero and copy back. The exact d(1/tau) for a bf16 output needs each row's sum_j P dP, summed
the same way (fp32).

    s_ij = (q_i . k_j + bias_ij) / tau
    allowed: j <= i and ((j < n_hist and key j valid) or j == i)

`attend` takes the packed qkv projection blocks first, (K, B, S, 3, H, dh), as the model's
projection leaves it; the kernels take any strides with dh contiguous, read q, k, v as views of
it and write their gradients into one buffer with its strides; the output is stored (K, B, S,
H, dh), which the output projection reads as is. No layout copies in or out, forward or
backward. Leading key tiles that are all padding (histories are left-padded) are skipped per
sample, and so are the query tiles of key tiles only their own rows see.

`attend_cached` (serving: new history events and candidates against every layer's cached keys
and values) is one forward-only kernel per layer. Its programs take, per (sample, block,
head), BNEW new tokens (the first tiles, few: a fold carries a handful of rows) or BM
candidates each; each starts the online softmax with its tokens' scores to their own keys,
streams the cached key and value tiles once, from the first tile holding a valid key (found by
a scan of the validity bytes, so no per-layer torch op computes it), then the new tokens' keys
and values as a second segment read from the layer's own q, k, v (not concatenated to the
cache): a new token sees the valid ones before it, a candidate all valid ones. f_b is a dense
row per new token and one row shared by all the candidates, and no score matrix is stored.
New tokens and candidates write their rows of one output, (K, B, n + M, H, dh) in memory, which
the output projection reads as is. With `match` the candidates' tiles of q.k / tau give the
match readout (mean and log-mean-exp over the valid cached and new keys, without f_b; a second
online max, so a large f_b cannot overflow it). No host synchronisation and no data-dependent
shape, so a CUDA graph can capture it.

Correctness: `tests/test_attention.py` checks outputs and the gradients of q, k, v, tau and
both tables against the reference, on the GPU and, through Triton's interpreter
(TRITON_INTERPRET=1), on CPU; and the operators' registrations (`torch.library.opcheck`), one
compiled graph for `prepare` and two layers' `attend`, and their export.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: this backend is GPU-only
    triton = None

BLOCK = 64  # the bias kernels' tile (rows and columns); a power of two >= 16 for tl.dot
# the attention kernels' (query rows, key columns, warps, pipeline stages), tuned on the H200 by
# `benchmarks/bench_attention.py --sweep`; "cached" (`attend_cached`: the same two dots a key tile)
# takes the forward's, untuned
TILES = {"fwd": (64, 64, 4, 3), "bwd": (32, 64, 4, 2), "cached": (64, 64, 4, 3)}


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: CUDA with Triton, or Triton's CPU interpreter."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@dataclass
class Sequence:
    """What the kernels need besides q, k, v and 1 / tau, built once per forward by `prepare`."""

    bias: torch.Tensor  # (BK, H, S, S) dense f_b in the compute dtype
    link: torch.Tensor  # (BK, H, S, S), f_b itself or a layer's no-data link output: d f_b flows back through it
    valid8: torch.Tensor  # (BK, S) int8 key validity
    first: torch.Tensor  # (BK,) int32 first valid key (S if none)
    n_hist: int  # leading history tokens; later ones (candidates) are keys for their own row only


def prepare(pos, tim, pb, tb, valid, n_hist: int, dtype: torch.dtype) -> Sequence:
    """Per-sample tables pos (B, K, H, P), tim (B, K, H, T); position buckets pb (S, S); time
    buckets tb (B, K, S, S); key validity valid (B, K, S); the first n_hist tokens history ->
    the kernels' inputs, f_b in `dtype`."""
    if not available(valid.device):
        raise RuntimeError("the Triton attention kernels need a CUDA GPU and Triton")
    B, K, S = valid.shape
    pb, tb = pb.to(torch.int16).contiguous(), tb.reshape(B * K, S, S).to(torch.int16).contiguous()  # ids < 2^15
    bias = torch.ops.climber.dense_bias(pos.flatten(0, 1), tim.flatten(0, 1), pb, tb, dtype)
    valid = valid.reshape(B * K, S)
    first = torch.where(valid, torch.arange(S, device=valid.device), S).min(dim=-1).values.to(torch.int32)
    return Sequence(bias, bias, valid.to(torch.int8).contiguous(), first, n_hist)


def attend(qkv: torch.Tensor, inv_tau: torch.Tensor, seq: Sequence) -> tuple[torch.Tensor, Sequence]:
    """SUMI attention of one layer. qkv (K, B, S, 3, H, dh) blocks first; inv_tau (B, K, H) ->
    (output (B, K, H, S, dh), seq for the next layer: the same f_b, and this layer's link,
    through which autograd brings the later layers' summed f_b gradient back to this layer)."""
    K, B, _, _, H, _ = qkv.shape
    out, _, link = torch.ops.climber.attention(qkv.transpose(0, 1), inv_tau.reshape(B * K, H).float(), seq.bias,
                                               seq.link, seq.valid8, seq.first, seq.n_hist)
    return out, dataclasses.replace(seq, link=link)


def attend_cached(q, k, v, inv_tau, k_hist, v_hist, hist_bias, self_bias, hist_valid, match: bool,
                  new_bias=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens against a history cache, forward only: `reference.attend_cached` in one kernel.

    q, k, v (B, K, H, n + M, dh), n new history tokens, then M candidates; inv_tau (B, K, H, 1,
    1); the cached k_hist, v_hist (B, K, H, L, dh) (any strides, dh contiguous); hist_valid (B,
    K, L + n), the cached keys' validity, then the new tokens'; new_bias (B, K, H, n, L + n) or
    None (n = 0); hist_bias (B, K, H, 1, L + n) and self_bias (B, K, H, 1, 1), or None (M = 0)
    -> (output (B, K, H, n + M, dh) in q's dtype, stored (K, B, n + M, H, dh) as the output
    projection reads it; with `match` the candidates' match readout (B, K, H, M, 2) fp32, else
    None). The new tokens' keys and values are read from k, v: not concatenated to the cache."""
    if not available(q.device):
        raise RuntimeError("the Triton attention kernels need a CUDA GPU and Triton")
    B, K, H = q.shape[:3]
    LN = hist_valid.shape[-1]

    def rows(x: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
        return None if x is None else x.reshape(B * K * H, *shape)  # views of the model's f_b

    n = LN - k_hist.shape[-2]
    out, feats = torch.ops.climber.attend_cached(q, k, v, inv_tau[..., 0, 0], k_hist, v_hist, rows(hist_bias, LN),
                                                 rows(self_bias), rows(new_bias, n, LN),
                                                 hist_valid.reshape(B * K, LN).view(torch.int8), match)
    return out, feats if match else None


def _split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed (B, K, S, 3, H, dh) projections -> q, k, v (B, K, H, S, dh), as views."""
    return qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)


def _empty_heads(qkv: torch.Tensor) -> torch.Tensor:
    """A (B, K, H, S, dh) output stored (B, K, S, H, dh), or (K, B, S, H, dh) when qkv is
    stored with K outermost (the model's layout): the output projection then reads it as is."""
    B, K, S, _, H, dh = qkv.shape
    if K > 1 and B > 1 and qkv.stride(1) > qkv.stride(0):
        return torch.empty(K, B, S, H, dh, dtype=qkv.dtype, device=qkv.device).permute(1, 0, 3, 2, 4)
    return torch.empty(B, K, S, H, dh, dtype=qkv.dtype, device=qkv.device).transpose(2, 3)


def _strides(name: str, x: torch.Tensor) -> dict[str, int]:
    """A (B, K, H, S, dh) view's strides of B, K, H and S as the kernels' keyword arguments
    s<name>b, s<name>k, s<name>h, s<name>l (dh is contiguous)."""
    return {f"s{name}{axis}": s for axis, s in zip("bkhl", x.stride()[:4])}


def _grid(q: torch.Tensor, kernel: str) -> tuple[int, int]:
    """(sample-block x head, tiles): query tiles for fwd, key tiles for bwd."""
    B, K, H, S, _ = q.shape
    BM, BN, _, _ = TILES[kernel]
    return B * K * H, triton.cdiv(S, BN if kernel == "bwd" else BM)


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
    def _cached_kernel(Q, K, V, KH, VH, HBIAS, NBIAS, SBIAS, INV, VALID, OUT, MATCH, sqb, sqk, sqh, sql, skb, skk,
                       skh, skl, svb, svk, svh, svl, skhb, skhk, skhh, skhl, svhb, svhk, svhh, svhl, sob, sok, soh,
                       sol, sib, sik, sih, NK, H, N, M, L, DH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BNEW: tl.constexpr, PREC: tl.constexpr, WITH_MATCH: tl.constexpr):
        """One program per (sample-block b, head h) and tile of tokens: the first cdiv(N, BNEW)
        tiles take BNEW new history tokens each, the rest BM candidates each (`_cached_rows`)."""
        bh = tl.program_id(0).to(tl.int64)
        b, h = bh // H, bh % H
        tile = tl.program_id(1)
        new_tiles = tl.cdiv(N, BNEW)
        q, k, v = Q + _offset(b, h, NK, sqb, sqk, sqh), K + _offset(b, h, NK, skb, skk, skh), V + _offset(
            b, h, NK, svb, svk, svh)
        kh, vh = KH + _offset(b, h, NK, skhb, skhk, skhh), VH + _offset(b, h, NK, svhb, svhk, svhh)
        out, valid = OUT + _offset(b, h, NK, sob, sok, soh), VALID + b * (L + N)
        inv = tl.load(INV + _offset(b, h, NK, sib, sik, sih)).to(tl.float32)
        if tile < new_tiles:
            _cached_rows(q, k, v, kh, vh, NBIAS + bh * N * (L + N), SBIAS, valid, out, MATCH, sql, skl, svl, skhl, svhl,
                         sol, inv, tile * BNEW + tl.arange(0, BNEW), N, N, L, DH, BN, BNEW, PREC, True, False)
        else:
            _cached_rows(q, k, v, kh, vh, HBIAS + bh * (L + N), SBIAS + bh, valid, out, MATCH + bh * M * 2, sql, skl,
                         svl, skhl, svhl, sol, inv, N + (tile - new_tiles) * BM + tl.arange(0, BM), N, N + M, L, DH,
                         BN, BNEW, PREC, False, WITH_MATCH)

    @triton.jit
    def _cached_rows(Q, K, V, KH, VH, BIAS, SBIAS, VALID, OUT, MATCH, sql, skl, svl, skhl, svhl, sol, inv, rows, N,
                     END, L, DH: tl.constexpr, BN: tl.constexpr, BNEW: tl.constexpr, PREC: tl.constexpr,
                     NEW: tl.constexpr, WITH_MATCH: tl.constexpr):
        """Rows `rows` (< END) of q, k, v and the output, pointers at this (sample-block, head):
        new history tokens (NEW: rows < N, f_b a row each, BIAS (N, L + N)) or candidates (rows N
        .. N + M - 1, f_b one row BIAS (L + N,) and SBIAS to the own key). The online softmax
        starts from each token's score to its own key (so its running max is finite from the
        start), then takes the cached key tiles once each, from the first tile holding a valid
        key, then the new tokens' keys (k, v rows 0 .. N - 1) as a second segment: a candidate
        sees the valid ones, new token i the valid ones before it. With WITH_MATCH the same
        q.k / tau of both segments, without f_b, also feed the match readout: their sum over the
        valid keys and a second online log-sum-exp."""
        dims = tl.arange(0, DH)
        row_ok = rows < END
        q = _load_rows(Q, 0, rows, sql, dims, row_ok)
        k = _load_rows(K, 0, rows, skl, dims, row_ok)
        if NEW:
            own = tl.load(BIAS + rows * (L + N) + L + rows, mask=row_ok, other=0.0)
        else:
            own = tl.load(SBIAS)
        m = (tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1) + own.to(tl.float32)) * inv
        s_sum = tl.zeros_like(m) + 1.0
        acc = _load_rows(V, 0, rows, svl, dims, row_ok).to(tl.float32)
        n = tl.zeros_like(m)  # match: the number of valid keys (the same in every row),
        total = tl.zeros_like(m)  # the sum of their q.k / tau,
        m2 = tl.zeros_like(m) - float("inf")  # and the running max and sum of exp of those
        s2 = tl.zeros_like(m)
        first = L + tl.zeros([BN], tl.int32)  # the first valid cached key: leading padding tiles are skipped
        for start in range(0, L, BN):
            cols = start + tl.arange(0, BN)
            first = tl.minimum(first, tl.where(tl.load(VALID + cols, mask=cols < L, other=0) != 0, cols, L))
        for start in range(tl.min(first, axis=0) // BN * BN, L, BN):  # the cached keys
            cols = start + tl.arange(0, BN)
            key_ok = tl.load(VALID + cols, mask=cols < L, other=0) != 0
            if NEW:
                fb = tl.load(BIAS + rows[:, None] * (L + N) + cols[None, :], mask=row_ok[:, None] & key_ok[None, :],
                             other=0.0)
            else:
                fb = tl.load(BIAS + cols, mask=key_ok, other=0.0)[None, :]
            m, s_sum, acc, n, total, m2, s2 = _cached_tile(
                q, _load_rows(KH, 0, cols, skhl, dims, key_ok), _load_rows(VH, 0, cols, svhl, dims, key_ok), fb,
                key_ok[None, :], key_ok, inv, m, s_sum, acc, n, total, m2, s2, PREC, WITH_MATCH)
        for start in range(0, N, BNEW):  # the new tokens' keys
            j = start + tl.arange(0, BNEW)
            key_ok = tl.load(VALID + L + j, mask=j < N, other=0) != 0
            if NEW:  # token i sees new key j < i (itself: the start)
                ok = key_ok[None, :] & (j[None, :] < rows[:, None])
                fb = tl.load(BIAS + rows[:, None] * (L + N) + L + j[None, :], mask=row_ok[:, None] & ok, other=0.0)
            else:
                ok = key_ok[None, :]
                fb = tl.load(BIAS + L + j, mask=key_ok, other=0.0)[None, :]
            m, s_sum, acc, n, total, m2, s2 = _cached_tile(
                q, _load_rows(K, 0, j, skl, dims, key_ok), _load_rows(V, 0, j, svl, dims, key_ok), fb, ok, key_ok,
                inv, m, s_sum, acc, n, total, m2, s2, PREC, WITH_MATCH)
        _store_rows(OUT, acc / s_sum[:, None], 0, rows, sol, dims, row_ok)
        if WITH_MATCH:  # (mean, log-mean-exp), both 0 with no valid key
            lme = tl.where(n > 0, m2 + tl.log(s2) - tl.log(tl.maximum(n, 1.0)), 0.0)
            tl.store(MATCH + (rows - N) * 2, total / tl.maximum(n, 1.0), mask=row_ok)
            tl.store(MATCH + (rows - N) * 2 + 1, lme, mask=row_ok)

    @triton.jit
    def _cached_tile(q, kx, vx, fb, ok, key_ok, inv, m, s_sum, acc, n, total, m2, s2, PREC: tl.constexpr,
                     WITH_MATCH: tl.constexpr):
        """One key tile kx, vx (C, DH) of `_cached_rows`: f_b fb (rows or 1, C), allowed ok (rows
        or 1, C), valid keys key_ok (C,) -> the online softmax's running max m, sum s_sum and
        output acc, and the match readout's key count n, logit sum total, max m2 and sum s2,
        updated."""
        qk = tl.dot(q, tl.trans(kx), input_precision=PREC) * inv  # (rows, C) q.k / tau
        s = tl.where(ok, qk + fb.to(tl.float32) * inv, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vx.dtype), vx, input_precision=PREC)
        if WITH_MATCH:
            n += tl.sum(key_ok.to(tl.float32), axis=0)
            total += tl.sum(tl.where(key_ok[None, :], qk, 0.0), axis=1)
            x = tl.where(key_ok[None, :], qk, float("-inf"))
            m2_new = tl.maximum(m2, tl.max(x, axis=1))
            m2_safe = tl.where(m2_new == float("-inf"), 0.0, m2_new)  # no valid key yet
            s2 = s2 * tl.exp(m2 - m2_safe) + tl.sum(tl.exp(x - m2_safe[:, None]), axis=1)
            m2 = m2_new
        return m_new, s_sum, acc, n, total, m2, s2

    @triton.jit
    def _bwd_delta_kernel(DO, OUT, DELTA, DG, sdb, sdk, sdh, sdl, sob, sok, soh, sol, sgb, sgk, sgh, sgl, NK, H, L,
                          DH: tl.constexpr, BM: tl.constexpr):
        """delta = rowsum(dO O) for BM rows of (b, h), and those rows of dQ (the q part of the
        packed gradient DG) zeroed."""
        bh, b, h, row0, rows = _program(H, BM)
        dims = tl.arange(0, DH)
        row_ok = rows < L
        do = _load_rows(DO, _offset(b, h, NK, sdb, sdk, sdh), rows, sdl, dims, row_ok)
        o = _load_rows(OUT, _offset(b, h, NK, sob, sok, soh), rows, sol, dims, row_ok)
        tl.store(DELTA + bh * L + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1), mask=row_ok)
        _store_rows(DG, tl.zeros([BM, DH], tl.float32), _offset(b, h, NK, sgb, sgk, sgh), rows, sgl, dims, row_ok)

    @triton.jit
    def _bwd_kernel(Q, K, V, BIAS, INV, VALID, FIRST, DO, LSE, DELTA, DG, DBIAS, DINV, ROWS, sqb, sqk, sqh,
                    sql, sdb, sdk, sdh, sdl, sgb, sgk, sgh, sgl, sgp, NK, H, L, NH, DH: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, PREC: tl.constexpr, DBIAS_GRAD: tl.constexpr):
        """One program per (BN keys, b, h), over the query tiles at or below the diagonal: dK and
        dV, dQ added (atomic, in dQ's dtype), into the packed gradient DG (q, k, v parts sgp
        apart), d bias = dS / tau added per tile to
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
            dq = tl.dot(dsi, k, input_precision=PREC).to(DG.dtype.element_ty)
            tl.atomic_add(DG + go + rows[:, None] * sgl + dims[None, :], dq, mask=row_ok[:, None], sem="relaxed")
            tl.atomic_add(ROWS + bh * L + rows, tl.sum(pdp, axis=1), mask=row_ok, sem="relaxed")
            tl.atomic_add(ROWS + n_rows + bh * L + rows, tl.sum(p * raw, axis=1), mask=row_ok, sem="relaxed")
        _store_rows(DG + sgp, dk, go, cols, sgl, dims, col_ok)
        _store_rows(DG + 2 * sgp, dv, go, cols, sgl, dims, col_ok)
        tl.atomic_add(DINV + bh, tl.sum(dinv, axis=0))



# ---- the kernels as PyTorch operators ---------------------------------------------------------
# Each launch is an operator in the `climber` namespace, its backward another, tied on with
# `register_autograd`. On the GPU they are `torch.library.triton_op`s: eager they call their
# kernels directly; torch.compile and torch.export trace through them and inductor sees the
# Triton kernels themselves (`wrap_triton`). Triton's CPU interpreter (TRITON_INTERPRET=1, the
# tests) makes @triton.jit return functions that `wrap_triton` cannot put in a graph; there the
# same bodies are opaque `torch.library.custom_op`s. The fake implementations below give
# tracing the outputs' shapes, dtypes and strides, made by the code that makes the real
# outputs. No op returns a view of an input; the one input written in place, the f_b gradient,
# is declared in `mutates_args`.

if triton is not None:
    from triton.runtime.jit import JITFunction

    INTERPRETED = not isinstance(_fwd_kernel, JITFunction)
    if INTERPRETED:
        def wrap_triton(kernel):
            return kernel

        def _op(name: str, mutates_args=()):
            return torch.library.custom_op(name, mutates_args=mutates_args)
    else:
        from torch.library import wrap_triton

        def _op(name: str, mutates_args=()):
            return torch.library.triton_op(name, mutates_args=mutates_args)

    @_op("climber::dense_bias")
    def _dense_bias(pos: torch.Tensor, tim: torch.Tensor, pb: torch.Tensor, tb: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
        """(BK, H, P) position and (BK, H, T) time tables, int16 (S, S) position buckets and (BK,
        S, S) time buckets -> dense f_b (BK, H, S, S) in `dtype`."""
        BK, H, P = pos.shape
        S, T = pb.shape[0], tim.shape[-1]
        bias = _dense_bias_fake(pos, tim, pb, tb, dtype)
        wrap_triton(_bias_fwd_kernel)[(BK * H, triton.cdiv(S, BLOCK))](
            POS=pos.float().contiguous(), TIM=tim.float().contiguous(), PB=pb, TB=tb, OUT=bias, H=H, L=S, P=P, T=T,
            BM=BLOCK, BN=BLOCK, num_warps=4)
        return bias

    @_dense_bias.register_fake
    def _dense_bias_fake(pos, tim, pb, tb, dtype):
        S = pb.shape[0]
        return torch.empty(*pos.shape[:2], S, S, dtype=dtype, device=pos.device)

    @_op("climber::dense_bias_backward")
    def _dense_bias_backward(g: torch.Tensor, pb: torch.Tensor, tb: torch.Tensor, P: int,
                             T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers' summed dense gradient g (BK, H, S, S), which the kernels leave causal
        (zero above the diagonal), reduced to the tables: (BK, H, P), (BK, H, T) in fp32."""
        BK, H, S, _ = g.shape
        # per-bucket sums of g by one kernel that reads g once, as one-hot matmuls on the tensor
        # cores: the buckets do not depend on the head, so a chunk of score entries of all heads
        # (H, C) times the chunk's one-hot buckets (C, P) gives every head's sums at once. Neither
        # scatter-adds (B*K*H*S*S values into a few thousand entries serialise on atomics: 173 ms
        # at B*K = 64, S = 800 on an H200), nor per-sample one-hot products over whole rows
        # (215 ms there), nor per-bucket masked sums (2.9 ms a step at the paper config)
        n_tiles = triton.cdiv(S, BLOCK)
        dpos = torch.empty(BK, n_tiles, H, P, dtype=torch.float32, device=g.device)
        dtim = torch.empty(BK, n_tiles, H, T, dtype=torch.float32, device=g.device)
        wrap_triton(_bias_grad_kernel)[(BK, n_tiles)](
            G=g.contiguous(), PB=pb, TB=tb, DPOS=dpos, DTIM=dtim, H=H, L=S, P=P, T=T, HP=_dot_width(H),
            PP=_dot_width(P), TP=_dot_width(T), BM=BLOCK, BN=BLOCK, PREC=_precision(g.dtype), num_warps=4)
        return dpos.sum(1), dtim.sum(1)

    @_dense_bias_backward.register_fake
    def _(g, pb, tb, P, T):
        BK, H = g.shape[:2]
        return g.new_empty(BK, H, P, dtype=torch.float32), g.new_empty(BK, H, T, dtype=torch.float32)

    def _dense_bias_setup(ctx, inputs, output):
        pos, tim, pb, tb, _ = inputs
        ctx.save_for_backward(pb, tb)
        ctx.sizes = pos.shape[-1], tim.shape[-1]

    def _dense_bias_grad(ctx, g):
        pb, tb = ctx.saved_tensors
        dpos, dtim = torch.ops.climber.dense_bias_backward(g, pb, tb, *ctx.sizes)
        return dpos, dtim, None, None, None

    _dense_bias.register_autograd(_dense_bias_grad, setup_context=_dense_bias_setup)

    @_op("climber::attention")
    def _attention(qkv: torch.Tensor, inv_tau: torch.Tensor, bias: torch.Tensor, link: torch.Tensor,
                   valid8: torch.Tensor, first: torch.Tensor,
                   n_hist: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (B, K, S, 3, H, dh) (any strides, dh contiguous); inv_tau (B*K, H) fp32; bias (BK, H,
        S, S); link (BK, H, S, S), read by nothing: f_b's gradient path (see `attend`) ->
        output (B, K, H, S, dh), stored (B, K, S, H, dh) in qkv's order of B and K; the rows'
        log-sum-exp (BK, H, S) fp32 for the backward; this layer's link, (BK, H, S, S) with no
        data (one zero, expanded), through which the next layer's f_b gradient comes."""
        B, K, S, _, H, dh = qkv.shape
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        q, k, v = _split_heads(qkv)
        out, lse, link = _attention_fake(qkv, inv_tau, bias, link, valid8, first, n_hist)
        wrap_triton(_fwd_kernel)[_grid(q, "fwd")](
            Q=q, K=k, V=v, BIAS=bias, INV=inv_tau.contiguous(), VALID=valid8, FIRST=first, OUT=out, LSE=lse,
            **_strides("q", q), **_strides("o", out), NK=K, H=H, L=S, NH=n_hist, **_meta(q, "fwd"))
        return out, lse, link

    def _check_head_dim(dh: int) -> None:
        if dh < 16 or dh & (dh - 1):
            raise ValueError(f"the Triton attention needs a power-of-two head dim >= 16, not {dh}")

    @_attention.register_fake
    def _attention_fake(qkv, inv_tau, bias, link, valid8, first, n_hist):
        B, K, S, _, H, dh = qkv.shape
        _check_head_dim(dh)
        out = _empty_heads(qkv if qkv.stride(-1) == 1 else qkv.contiguous())
        lse = torch.empty(B * K, H, S, dtype=torch.float32, device=qkv.device)
        return out, lse, link.new_zeros(()).expand(link.shape)

    @_op("climber::attention_backward", mutates_args=("dbias",))
    def _attention_backward(dout: torch.Tensor, qkv: torch.Tensor, inv_tau: torch.Tensor, bias: torch.Tensor,
                            valid8: torch.Tensor, first: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                            dbias: torch.Tensor | None, n_hist: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`attention`'s gradient dout (B, K, H, S, dh) -> (dqkv with qkv's strides, d inv_tau
        (B*K, H) fp32); this layer's d f_b is added in place to dbias (the later layers' sum,
        zeros after the last layer), if given."""
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        q, k, v = _split_heads(qkv)
        B, K, H, S, dh = q.shape
        inv_tau = inv_tau.contiguous()
        dout = dout.to(q.dtype)
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        # qkv's strides: the projection's backward reads it as is. The kernels write it through
        # its base pointer and strides, not through the q, k, v views: torch.compile clones a
        # kernel's written inputs, and a clone of a strided view is laid out afresh while the
        # kernel is handed the view's strides (seen as garbage dQ under inductor, torch 2.11)
        dqkv = torch.empty_like(qkv)
        dq = _split_heads(dqkv)[0]
        dinv = torch.zeros(B * K, H, dtype=torch.float32, device=q.device)
        delta = torch.empty(B * K, H, S, dtype=torch.float32, device=q.device)  # rowsum(dO O)
        wrap_triton(_bwd_delta_kernel)[_grid(q, "fwd")](
            DO=dout, OUT=out, DELTA=delta, DG=dqkv, **_strides("d", dout), **_strides("o", out), **_strides("g", dq),
            NK=K, H=H, L=S, DH=dh, BM=TILES["fwd"][0])
        # dQ is summed over the key tiles by atomic adds into dqkv (zeroed by the delta pass), and
        # so are each row's sum_j P dP and sum_j P (q.k + bias), in fp32, for the exact d(1/tau)
        row_sums = torch.zeros(2, B * K, H, S, dtype=torch.float32, device=q.device)
        wrap_triton(_bwd_kernel)[_grid(q, "bwd")](
            Q=q, K=k, V=v, BIAS=bias, INV=inv_tau, VALID=valid8, FIRST=first, DO=dout, LSE=lse, DELTA=delta,
            DG=dqkv, DBIAS=bias if dbias is None else dbias, DINV=dinv, ROWS=row_sums,
            **_strides("q", q), **_strides("d", dout), **_strides("g", dq), sgp=dqkv.stride(3), NK=K, H=H, L=S,
            NH=n_hist, DBIAS_GRAD=dbias is not None, **_meta(q, "bwd"))
        dinv += ((delta - row_sums[0]) * row_sums[1]).sum(-1)
        return dqkv, dinv

    @_attention_backward.register_fake
    def _(dout, qkv, inv_tau, bias, valid8, first, out, lse, dbias, n_hist):
        dqkv = torch.empty_like(qkv if qkv.stride(-1) == 1 else qkv.contiguous())
        return dqkv, torch.empty(inv_tau.shape, dtype=torch.float32, device=qkv.device)

    def _attention_setup(ctx, inputs, output):
        qkv, inv_tau, bias, _, valid8, first, n_hist = inputs
        out, lse, _ = output
        ctx.save_for_backward(qkv, inv_tau, bias, valid8, first, out, lse)
        ctx.n_hist = n_hist

    def _attention_grad(ctx, dout, _, dlink):
        """dlink: the later layers' summed f_b gradient (zeros after the last layer: autograd
        materialises an unused output's gradient), to which this layer's is added in place and
        which goes on to the previous layer's link (or, from the first layer, to f_b). The
        kernel needs it contiguous; any other gradient (one a caller passed) is copied first."""
        dbias = dlink.contiguous() if ctx.needs_input_grad[3] else None
        dqkv, dinv = torch.ops.climber.attention_backward(dout, *ctx.saved_tensors, dbias, ctx.n_hist)
        return dqkv, dinv, None, dbias, None, None, None

    _attention.register_autograd(_attention_grad, setup_context=_attention_setup)

    @_op("climber::attend_cached")
    def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_tau: torch.Tensor,
                       k_hist: torch.Tensor, v_hist: torch.Tensor, hist_bias: torch.Tensor | None,
                       self_bias: torch.Tensor | None, new_bias: torch.Tensor | None, valid8: torch.Tensor,
                       match: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """n new history tokens then M candidates, q, k, v (B, K, H, n + M, dh), against the
        cached k_hist, v_hist (B, K, H, L, dh) (any strides, dh contiguous) and the new tokens'
        keys; inv_tau (B, K, H) (any strides); key validity valid8 (B*K, L + n) int8, the cached
        keys then the new ones; f_b: the new tokens' rows new_bias (B*K*H, n, L + n), the
        candidates' shared row hist_bias (B*K*H, L + n) and own key's self_bias (B*K*H,), None
        where there are no such tokens -> output (B, K, H, n + M, dh) in q's dtype, stored (K, B,
        n + M, H, dh); the candidates' match readout (B, K, H, M, 2) fp32, or (B, K, H, M, 0)
        without `match`. Forward only (no autograd registered)."""
        q, k, v, k_hist, v_hist = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, k_hist, v_hist))
        _, K, H, S, _ = q.shape
        L = k_hist.shape[-2]
        n = valid8.shape[-1] - L
        out, feats = _attend_cached_fake(q, k, v, inv_tau, k_hist, v_hist, hist_bias, self_bias, new_bias, valid8,
                                         match)
        BM, BN, warps, stages = TILES["cached"]
        BNEW = min(BM, _dot_width(n))  # a tile of new tokens (rows), and of their keys
        # a kind of token that is not there (n or M = 0) has no program: any pointer will do
        some = hist_bias if hist_bias is not None else new_bias
        wrap_triton(_cached_kernel)[(q.shape[0] * K * H, triton.cdiv(n, BNEW) + triton.cdiv(S - n, BM))](
            Q=q, K=k, V=v, KH=k_hist, VH=v_hist, HBIAS=some.contiguous(), NBIAS=(
                new_bias if new_bias is not None else some).contiguous(),
            SBIAS=(self_bias if self_bias is not None else some).contiguous(), INV=inv_tau, VALID=valid8.contiguous(),
            OUT=out, MATCH=feats if match else out, **_strides("q", q), **_strides("k", k), **_strides("v", v),
            **_strides("kh", k_hist), **_strides("vh", v_hist), **_strides("o", out),
            **{f"si{axis}": st for axis, st in zip("bkh", inv_tau.stride())}, NK=K, H=H, N=n, M=S - n, L=L,
            DH=q.shape[-1], BM=BM, BN=BN, BNEW=BNEW, PREC=_precision(q.dtype), WITH_MATCH=match, num_warps=warps,
            num_stages=stages)
        return out, feats

    @_attend_cached.register_fake
    def _attend_cached_fake(q, k, v, inv_tau, k_hist, v_hist, hist_bias, self_bias, new_bias, valid8, match):
        B, K, H, S, dh = q.shape
        _check_head_dim(dh)
        M = S - (valid8.shape[-1] - k_hist.shape[-2])
        out = torch.empty(K, B, S, H, dh, dtype=q.dtype, device=q.device).permute(1, 0, 3, 2, 4)
        return out, torch.empty(B, K, H, M, 2 if match else 0, dtype=torch.float32, device=q.device)
