"""Attention pieces of the Adaptive Transformer Layer (PAPER.md sections 2.3 and 3.1).

* `log_bucket`: T5-style bucketing of relative positions and time gaps.
* `joint_mask` and `joint_attention`: the paper's literal SUMI formulation, one sequence
  [history; candidates] with a mask (causal history; each candidate sees the history and
  itself). This is the plain reference path.
* `history_attention` and `candidate_attention`: the same computation split in two. History
  tokens never see candidates, so history is a causal self-attention on its own (its keys and
  values can be cached, PAPER.md 3.2), and each candidate attends to the history keys plus
  its own key, an M x L problem instead of (L + M)^2. Tests prove the split equals the joint.
* `HistoryInputs`: what the history self-attention needs besides q, k, v: key padding, event
  times, the request scenario and the f_b tables. The reference paths ("split", "sdpa") get
  the dense (B, K, H, L, L) bias and mask built once per prefill by `history_inputs`.
* The "flex" path (GPU training speed): FlexAttention with a causal block mask. Its score_mod
  scales q.k by 1 / tau and adds f_b / tau evaluated from the small tables and per-token
  times, so no (B, K, H, L, L) tensor is ever built. The gradients of 1 / tau and of the
  tables are not left to FlexAttention, which scatters one atomic add per score element into
  a few dozen entries: `_score_grad_kernel` (Triton) recomputes the probabilities per tile,
  sums dS q.k per row for 1 / tau and adds each run of equal buckets once (summation by
  parts) for the tables, all in fp32. On CPU, FlexAttention runs forward only.

Scores follow the paper: A = softmax((Q K^T + bias) / tau), tau a per-(sample, block, head)
temperature replacing sqrt(d_head). Shapes: B batch, K blocks, H heads, L history, M candidates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from climber.fused_attention import dense_bias, fused_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the flex path has no backward there anyway
    triton = None

# time gaps in seconds: 0 s, 1 s exact, then log-spaced up to ~2 years
TIME_EXACT, TIME_MAX = 2, 2**26


def log_bucket(x: torch.Tensor, n_buckets: int, exact: int, max_value: float) -> torch.Tensor:
    """Non-negative ints -> buckets: identity below `exact`, log-spaced up to `max_value`."""
    x = x.clamp(min=0)
    if exact >= n_buckets:
        return x.clamp(max=n_buckets - 1)
    xf = x.float().clamp(min=1)
    # two multiplies by constants, no division, so a Triton kernel gets the same float32 values
    inv_exact, scale = _log_bucket_constants(n_buckets, exact, max_value)
    logb = exact + (torch.log(xf * inv_exact) * scale).long()
    return torch.where(x < exact, x, logb.clamp(max=n_buckets - 1))


def _log_bucket_constants(n_buckets: int, exact: int, max_value: float) -> tuple[float, float]:
    span = math.log(max(max_value, exact + 1) / max(exact, 1))
    return 1 / max(exact, 1), (n_buckets - exact) / span


def position_buckets(rel: torch.Tensor, n: int) -> torch.Tensor:
    return log_bucket(rel, n, exact=n // 2, max_value=2048)


def time_buckets(dt: torch.Tensor, n: int) -> torch.Tensor:
    return log_bucket(dt, n, exact=TIME_EXACT, max_value=TIME_MAX)


def joint_mask(hist_mask: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """(B, K, L), (B, M) -> allowed (B, K, S, S), S = L + M.

    Key j is visible to query i if it is a valid history token at or before i, or if j == i
    (every row keeps its diagonal so padded rows never become all -inf).
    """
    B, K, L = hist_mask.shape
    M = cand_mask.shape[1]
    S = L + M
    i = torch.arange(S, device=hist_mask.device)
    key_valid = torch.cat([hist_mask, cand_mask[:, None, :].expand(B, K, M)], dim=-1)  # (B, K, S)
    causal_hist = (i[None, :] < L) & (i[None, :] <= i[:, None])  # (S, S)
    return (key_valid[:, :, None, :] & causal_hist) | torch.eye(S, dtype=torch.bool, device=i.device)


def history_mask(hist_mask: torch.Tensor) -> torch.Tensor:
    """(B, K, L) -> allowed (B, K, L, L): causal over valid history, plus the diagonal."""
    L = hist_mask.shape[-1]
    i = torch.arange(L, device=hist_mask.device)
    causal = i[None, :] <= i[:, None]
    return (hist_mask[:, :, None, :] & causal) | torch.eye(L, dtype=torch.bool, device=i.device)


def _softmax_attend(s: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(v.dtype) @ v


def joint_attention(q, k, v, bias, tau, allowed) -> torch.Tensor:
    """Reference: q, k, v (B, K, H, S, dh); bias (B, K, H, S, S); tau (B, K, H, 1, 1);
    allowed (B, K, S, S) -> (B, K, H, S, dh)."""
    return _softmax_attend((q @ k.transpose(-1, -2) + bias) / tau, allowed[:, :, None], v)


@dataclass
class HistoryInputs:
    """Everything the causal history self-attention needs besides q, k, v and tau."""

    key_valid: torch.Tensor  # (B, K, L) bool, False on padding
    time: torch.Tensor  # (B, K, L) event times in seconds
    scenario: torch.Tensor  # (B,) request scenario, selects the f_b tables
    pos_table: torch.Tensor  # (Kt, St, H, P): Kt = K (or 1: shared), St = n_scenarios (or 1)
    time_table: torch.Tensor  # (Kt, St, H, T)
    bias: torch.Tensor | None = None  # (B, K, H, L, L) dense f_b, reference paths only
    allowed: torch.Tensor | None = None  # (B, K, L, L) causal + padding mask, reference paths only


def per_sample_table(table: torch.Tensor, scenario: torch.Tensor, k: int) -> torch.Tensor:
    """(Kt, St, H, N) f_b table -> (B, K, H, N): each sample's rows for its scenario."""
    s = scenario if table.shape[1] > 1 else torch.zeros_like(scenario)
    return table[:, s].transpose(0, 1).expand(-1, k, -1, -1)


def history_inputs(hist_mask, time, scenario, pos_table, time_table, impl: str) -> HistoryInputs:
    """Bundle the history's attention inputs; materialise the dense bias only where used."""
    hist = HistoryInputs(hist_mask, time, scenario, pos_table, time_table)
    if impl == "flex":
        return hist
    B, K, L = hist_mask.shape
    i = torch.arange(L, device=time.device)
    pb = position_buckets(i[:, None] - i[None, :], pos_table.shape[-1])  # (L, L)
    tb = time_buckets(time[..., :, None] - time[..., None, :], time_table.shape[-1])  # (B, K, L, L)
    if impl == "fused":  # f_b once per step in the compute dtype, with a table-reducing backward
        H = pos_table.shape[2]
        dtype = torch.get_autocast_dtype("cuda") if time.is_cuda and torch.is_autocast_enabled("cuda") else \
            torch.float32
        tables = (per_sample_table(t, scenario, K).reshape(B * K, H, -1) for t in (pos_table, time_table))
        bias = dense_bias(*tables, pb, tb.reshape(B * K, L, L), dtype)
        return dataclasses.replace(hist, bias=bias.view(B, K, H, L, L))
    pos = per_sample_table(pos_table, scenario, K)[..., pb]  # (B, K, H, L, L)
    tim = per_sample_table(time_table, scenario, K)  # (B, K, H, T)
    H = tim.shape[2]
    tim = torch.gather(tim[:, :, :, None].expand(-1, -1, -1, L, -1), -1, tb[:, :, None].expand(-1, -1, H, -1, -1))
    return dataclasses.replace(hist, bias=pos + tim, allowed=history_mask(hist_mask))


def history_attention(q, k, v, hist: HistoryInputs, tau, impl: str = "split") -> torch.Tensor:
    """Causal history self-attention. q, k, v (B, K, H, L, dh); tau (B, K, H, 1, 1)
    -> (B, K, H, L, dh)."""
    if impl == "flex":
        return _flex_history(q, k, v, hist, tau)
    if impl == "fused":
        B, K, H, L, _ = q.shape
        inv = tau.reciprocal().reshape(B * K, H).float()
        return fused_attention(q, k, v, hist.bias.reshape(B * K, H, L, L), inv, hist.key_valid.reshape(B * K, L))
    if impl == "sdpa":
        # temperature folded into q (scale=1); bias and mask folded into one additive mask
        add = (hist.bias / tau).masked_fill(~hist.allowed[:, :, None], float("-inf"))
        return F.scaled_dot_product_attention(q / tau, k, v, attn_mask=add.to(q.dtype), scale=1.0)
    return _softmax_attend((q @ k.transpose(-1, -2) + hist.bias) / tau, hist.allowed[:, :, None], v)


# ---- the "flex" path --------------------------------------------------------------------------

# On H200 with torch 2.11 the default flex tiles run out of shared memory; these compile.
FLEX_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2}
_flex_compiled = torch.compile(flex_attention, dynamic=False)  # compiles lazily, on first call


@functools.lru_cache(maxsize=16)
def _causal_blocks(L: int, device: torch.device):
    """Causal block sparsity shared by every sample; padding is masked in the score_mod."""
    return create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device=device)


def history_score_mod(inv_tau, pos_rel, tim, time, valid):
    """score_mod q.k / tau + f_b / tau, padded keys masked, from (BK, H) 1 / tau, (BK, H, L)
    distance-indexed position bias, (BK, H, T) time table (both already / tau), (BK, L) times
    and (BK, L) key validity."""
    n_time = tim.shape[-1]

    def score_mod(s, b, h, i, j):
        bias = pos_rel[b, h, (i - j).clamp(min=0)] + tim[b, h, time_buckets(time[b, i] - time[b, j], n_time)]
        return torch.where(valid[b, j] | (i == j), s * inv_tau[b, h] + bias, float("-inf"))

    return score_mod


def _flex_history(q, k, v, hist: HistoryInputs, tau) -> torch.Tensor:
    B, K, H, L, dh = q.shape
    inv_tau = tau.reciprocal().reshape(B * K, H)
    # f_b / tau per sample, (BK, H, P) and (BK, H, T)
    pos = (per_sample_table(hist.pos_table, hist.scenario, K) / tau[..., 0]).reshape(B * K, H, -1)
    tim = (per_sample_table(hist.time_table, hist.scenario, K) / tau[..., 0]).reshape(B * K, H, -1)
    lut = position_buckets(torch.arange(L, device=q.device), pos.shape[-1])  # (L,) bucket of i - j
    # FlexAttention is not on autocast's list; follow autocast as SDPA does (q, k, v arrive in
    # fp32 when a bias add promoted them)
    dtype = torch.get_autocast_dtype("cuda") if q.is_cuda and torch.is_autocast_enabled("cuda") else q.dtype
    q, k, v = (x.to(dtype).reshape(B * K, H, L, dh) for x in (q, k, v))
    t, valid = hist.time.reshape(B * K, L), hist.key_valid.reshape(B * K, L)
    # 1 / tau and the tables enter the kernel detached: their gradient comes from `_ScoreGrads`
    score_mod = history_score_mod(inv_tau.detach(), pos.detach()[..., lut], tim.detach(), t, valid)
    train = torch.is_grad_enabled() and any(x.requires_grad for x in (inv_tau, pos, tim))
    flex, opts = (_flex_compiled, FLEX_KERNEL_OPTIONS) if q.is_cuda else (flex_attention, None)
    out, aux = flex(q, k, v, score_mod=score_mod, block_mask=_causal_blocks(L, q.device), scale=1.0,
                    kernel_options=opts, return_aux=AuxRequest(lse=train))
    if train:
        out = _ScoreGrads.apply(out, aux.lse, q, k, v, inv_tau, pos, tim, t, valid, lut)
    return out.view(B, K, H, L, dh)


class _ScoreGrads(torch.autograd.Function):
    """Identity on the attention output (BK, H, L, dh); its backward returns d loss / d 1/tau
    (BK, H) and d loss / d (f_b / tau) for the (BK, H, P) position and (BK, H, T) time tables."""

    @staticmethod
    def forward(ctx, out, lse, q, k, v, inv_tau, pos, tim, t, valid, lut):
        ctx.save_for_backward(out, lse, q, k, v, inv_tau, pos, tim, t, valid, lut)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        out, lse, q, k, v, inv_tau, pos, tim, t, valid, lut = ctx.saved_tensors
        dinv, dpos, dtim = torch.ops.climber.history_score_grads(out, lse, q, k, v, dout, inv_tau, pos, tim, t,
                                                                  valid, lut)
        return dout, None, None, None, None, dinv, dpos, dtim, None, None, None


@torch.library.custom_op("climber::history_score_grads", mutates_args=(), device_types="cuda")
def history_score_grads(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        dout: torch.Tensor, inv_tau: torch.Tensor, pos: torch.Tensor, tim: torch.Tensor,
                        t: torch.Tensor, valid: torch.Tensor, lut: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return score_grads(out, lse, q, k, v, dout, inv_tau, pos, tim, t, valid, lut)


@history_score_grads.register_fake
def _(out, lse, q, k, v, dout, inv_tau, pos, tim, t, valid, lut):
    return torch.empty_like(inv_tau), torch.empty_like(pos), torch.empty_like(tim)


def score_grads(out, lse, q, k, v, dout, inv_tau, pos, tim, t, valid, lut, block_m: int = 64, block_n: int = 64):
    """fp32 d loss / d inv_tau (BK, H), d pos (BK, H, P) and d tim (BK, H, T), from the flex
    forward's output and log-sum-exp (BK, H, L), its inputs q, k, v (BK, H, L, dh) and dout."""
    if triton is None:
        raise RuntimeError("the flex attention backward needs Triton")
    BK, H, L, dh = q.shape
    dinv, dpos, dtim = (torch.zeros(x.shape, dtype=torch.float32, device=q.device) for x in (inv_tau, pos, tim))
    nt = tim.shape[-1]
    inv_exact, scale = _log_bucket_constants(nt, TIME_EXACT, TIME_MAX)
    # k, v are strided views of the fused qkv projection; dout may come in another dtype
    x = [a.to(q.dtype).contiguous() for a in (q, k, v, out, dout)]
    _score_grad_kernel[(triton.cdiv(L, block_m), BK * H)](
        *x, lse.contiguous(), *(a.detach().float().contiguous() for a in (inv_tau, pos, tim)), t.contiguous(),
        valid.contiguous(), lut.to(torch.int32), dinv, dpos, dtim, L, H, NP=pos.shape[-1], NT=nt, EXACT=TIME_EXACT,
        INV_EXACT=inv_exact, SCALE=scale, DH=dh, BM=block_m, BN=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=8, num_stages=2)
    return dinv.to(inv_tau.dtype), dpos.to(pos.dtype), dtim.to(tim.dtype)


if triton is not None:

    @triton.jit
    def _time_bucket(dt, NT: tl.constexpr, EXACT: tl.constexpr, INV_EXACT: tl.constexpr, SCALE: tl.constexpr):
        """`time_buckets` in Triton, the same float32 operations in the same order."""
        x = tl.maximum(dt, 0)
        if EXACT >= NT:
            b = tl.minimum(x, NT - 1)
        else:
            logb = EXACT + (tl.log(tl.maximum(x.to(tl.float32), 1.0) * INV_EXACT) * SCALE).to(tl.int64)
            b = tl.where(x < EXACT, x, tl.minimum(logb, NT - 1))
        return b.to(tl.int32)

    @triton.jit
    def _add_runs(grad, c, c_next, cs, row_ok, last):
        """Summation by parts along a tile row: sum_j ds_j e[c_j] = sum_j cs_j (e[c_j] -
        e[c_{j+1}]) + cs_last e[c_last], cs the running sum of ds. Buckets are monotone along
        a row (distances and time gaps shrink), so only run ends issue an atomic add."""
        change = c != c_next
        tl.atomic_add(grad + c, cs, mask=row_ok & (change | last))
        tl.atomic_add(grad + c_next, -cs, mask=row_ok & change & (last == 0))

    @triton.jit
    def _score_grad_kernel(Q, K, V, OUT, DO, LSE, INV, POS, TIM, T, VALID, LUT, DINV, DPOS, DTIM, L, H,
                           NP: tl.constexpr, NT: tl.constexpr, EXACT: tl.constexpr, INV_EXACT: tl.constexpr,
                           SCALE: tl.constexpr, DH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           PRECISION: tl.constexpr):
        """One program per (BM query rows, sample-block b, head h): recompute P and dP = dO V^T
        over the causal key tiles, dS = P (dP - rowsum(dO O)) (the gradient of the final
        score), then add dS q.k into d(1/tau) and dS into the table buckets."""
        bh = tl.program_id(1).to(tl.int64)  # offsets below can pass 2^31
        b = bh // H
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        dims = tl.arange(0, DH)
        row_ok = rows < L
        tile = bh * L * DH + rows[:, None] * DH + dims[None, :]  # (BM, DH) offsets, all (BK, H, L, DH)
        q = tl.load(Q + tile, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + tile, mask=row_ok[:, None], other=0.0)
        o = tl.load(OUT + tile, mask=row_ok[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # (BM,)
        lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
        t_q = tl.load(T + b * L + rows, mask=row_ok, other=0)
        inv = tl.load(INV + bh)
        # d(1/tau) = sum dS q.k with dS = P (dP - D), D = sum_j P dP exactly; delta = rowsum(dO O)
        # is D up to O's bf16 rounding, so accumulate with delta and add (delta - D) sum P q.k
        dsqk = tl.zeros([BM], dtype=tl.float32)
        pqk = tl.zeros([BM], dtype=tl.float32)
        pdp_sum = tl.zeros([BM], dtype=tl.float32)
        last = (tl.arange(0, BN) == BN - 1)[None, :]
        for start in range(0, tl.program_id(0) * BM + BM, BN):  # causal: keys up to the last row
            cols = start + tl.arange(0, BN)
            col_ok = cols < L
            kv = bh * L * DH + cols[:, None] * DH + dims[None, :]
            k = tl.load(K + kv, mask=col_ok[:, None], other=0.0)
            v = tl.load(V + kv, mask=col_ok[:, None], other=0.0)
            r = rows[:, None] - cols[None, :]  # (BM, BN) distance i - j
            # bucket labels of this column and of the next one, clamped in range; labels of
            # masked entries are harmless, their dS is zero
            pb = tl.load(LUT + tl.minimum(tl.maximum(r, 0), L - 1))
            pb_next = tl.load(LUT + tl.minimum(tl.maximum(r - 1, 0), L - 1))
            t_k = tl.load(T + b * L + tl.minimum(cols, L - 1))
            t_next = tl.load(T + b * L + tl.minimum(cols + 1, L - 1))
            tb = _time_bucket(t_q[:, None] - t_k[None, :], NT, EXACT, INV_EXACT, SCALE)
            tb_next = _time_bucket(t_q[:, None] - t_next[None, :], NT, EXACT, INV_EXACT, SCALE)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s = qk * inv + tl.load(POS + bh * NP + pb) + tl.load(TIM + bh * NT + tb)
            key_ok = tl.load(VALID + b * L + cols, mask=col_ok, other=0) != 0
            ok = row_ok[:, None] & col_ok[None, :] & (r >= 0) & (key_ok[None, :] | (r == 0))
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            pdp = p * tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = pdp - p * delta[:, None]
            dsqk += tl.sum(ds * qk, axis=1)
            pqk += tl.sum(p * qk, axis=1)
            pdp_sum += tl.sum(pdp, axis=1)
            cs = tl.cumsum(ds, axis=1)
            _add_runs(DPOS + bh * NP, pb, pb_next, cs, row_ok[:, None], last)
            _add_runs(DTIM + bh * NT, tb, tb_next, cs, row_ok[:, None], last)
        tl.atomic_add(DINV + bh, tl.sum(dsqk + (delta - pdp_sum) * pqk, axis=0))


def candidate_attention(q, k_self, v_self, k_hist, v_hist, bias_hist, bias_self, tau, hist_mask):
    """Each candidate attends to the history and to itself, never to other candidates.

    q, k_self, v_self (B, K, H, M, dh); k_hist, v_hist (B, K, H, L, dh); bias_hist
    (B, K, H, 1, L) (identical for every candidate: same position and time); bias_self
    (B, K, H, 1, 1); tau (B, K, H, 1, 1); hist_mask (B, K, L) -> (B, K, H, M, dh).
    """
    s_hist = (q @ k_hist.transpose(-1, -2) + bias_hist) / tau  # (B, K, H, M, L)
    s_hist = s_hist.masked_fill(~hist_mask[:, :, None, None, :], float("-inf"))
    s_self = ((q * k_self).sum(-1, keepdim=True) + bias_self) / tau  # (B, K, H, M, 1)
    p = torch.softmax(torch.cat([s_hist, s_self], dim=-1).float(), dim=-1).to(q.dtype)
    return p[..., :-1] @ v_hist + p[..., -1:] * v_self
