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
  times, the request scenario and the f_b tables, plus the dense (B, K, H, L, L) bias built
  once per prefill by `history_inputs` and shared by the layers (f_b does not depend on the
  layer). The reference paths ("split", "sdpa") also get the dense mask.
* The "fused" path (GPU training speed): Triton kernels in `climber/fused_attention.py`
  that read the dense bias tile by tile (FlashAttention-style, no (L, L) probabilities in
  memory) and reduce its gradient to the tables once per step. `history_inputs(...,
  n_hist=L)` describes a history followed by candidates (training's joint pass): the mask
  then lets a token after n_hist see the history and itself only, i.e. `joint_mask`.

Scores follow the paper: A = softmax((Q K^T + bias) / tau), tau a per-(sample, block, head)
temperature replacing sqrt(d_head). Shapes: B batch, K blocks, H heads, L history, M candidates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from climber import fused_attention as fused
from climber.fused_attention import split_heads

# time gaps in seconds: 0 s, 1 s exact, then log-spaced up to ~2 years
TIME_EXACT, TIME_MAX = 2, 2**26


def log_bucket(x: torch.Tensor, n_buckets: int, exact: int, max_value: float) -> torch.Tensor:
    """Non-negative ints -> buckets: identity below `exact`, log-spaced up to `max_value`."""
    x = x.clamp(min=0)
    if exact >= n_buckets:
        return x.clamp(max=n_buckets - 1)
    xf = x.float().clamp(min=1)
    span = math.log(max(max_value, exact + 1) / max(exact, 1))
    logb = exact + (torch.log(xf * (1 / max(exact, 1))) * ((n_buckets - exact) / span)).long()
    return torch.where(x < exact, x, logb.clamp(max=n_buckets - 1))


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
    key_valid = torch.cat([hist_mask, cand_mask[:, None, :].expand(B, K, -1)], dim=-1)  # (B, K, S)
    return history_mask(key_valid, n_hist=L)


def history_mask(hist_mask: torch.Tensor, n_hist: int | None = None) -> torch.Tensor:
    """(B, K, S) -> allowed (B, K, S, S): causal over the valid keys among the first `n_hist`
    (all by default), plus the diagonal; `joint_mask` with candidates after n_hist tokens."""
    S = hist_mask.shape[-1]
    i = torch.arange(S, device=hist_mask.device)
    seen = (i[None, :] <= i[:, None]) & (i[None, :] < (S if n_hist is None else n_hist))
    return (hist_mask[:, :, None, :] & seen) | torch.eye(S, dtype=torch.bool, device=i.device)


def _softmax_attend(s: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(v.dtype) @ v


def joint_attention(q, k, v, bias, tau, allowed) -> torch.Tensor:
    """Reference: q, k, v (B, K, H, S, dh); bias (B, K, H, S, S); tau (B, K, H, 1, 1);
    allowed (B, K, S, S) -> (B, K, H, S, dh)."""
    return _softmax_attend((q @ k.transpose(-1, -2) + bias) / tau, allowed[:, :, None], v)


@dataclass
class HistoryInputs:
    """Everything the history self-attention needs besides q, k, v and tau. The sequence is S
    tokens: n_hist history tokens, then (training's joint pass) the candidates, at position
    n_hist with the request time, each seeing the history and itself."""

    key_valid: torch.Tensor  # (B, K, S) bool, False on padding
    time: torch.Tensor  # (B, K, S) event times in seconds
    scenario: torch.Tensor  # (B,) request scenario, selects the f_b tables
    pos_table: torch.Tensor  # (Kt, St, H, P): Kt = K (or 1: shared), St = n_scenarios (or 1)
    time_table: torch.Tensor  # (Kt, St, H, T)
    n_hist: int
    bias: torch.Tensor | None = None  # (B, K, H, S, S) dense f_b, reference paths
    allowed: torch.Tensor | None = None  # (B, K, S, S) mask, reference paths
    fused: fused.FusedInputs | None = None  # the fused kernels' f_b and mask inputs


def per_sample_table(table: torch.Tensor, scenario: torch.Tensor, k: int) -> torch.Tensor:
    """(Kt, St, H, N) f_b table -> (B, K, H, N): each sample's rows for its scenario."""
    s = scenario if table.shape[1] > 1 else torch.zeros_like(scenario)
    return table[:, s].transpose(0, 1).expand(-1, k, -1, -1)


def resolve_impl(impl: str, device: torch.device) -> str:
    """"fused" runs where its kernels can (CUDA with Triton), else the equal "split" reference,
    so a model trained with the fused path evaluates and serves anywhere."""
    return "split" if impl == "fused" and not fused.available(device) else impl


def history_inputs(hist_mask, time, scenario, pos_table, time_table, impl: str,
                   n_hist: int | None = None, tb: torch.Tensor | None = None) -> HistoryInputs:
    """Bundle the attention inputs of a sequence whose first `n_hist` tokens (all by default)
    are history: f_b densely (the fused kernels' own form, or for the reference paths a
    tensor and the mask). Tokens after n_hist sit at position n_hist. `tb`: the time buckets
    of `time` if already made (`Climber.fused_front`)."""
    impl = resolve_impl(impl, time.device)
    B, K, S = hist_mask.shape
    n_hist = S if n_hist is None else n_hist
    hist = HistoryInputs(hist_mask, time, scenario, pos_table, time_table, n_hist)
    i = torch.arange(S, device=time.device).clamp(max=n_hist)
    pb = position_buckets(i[:, None] - i[None, :], pos_table.shape[-1])  # (S, S)
    if tb is None:
        tb = time_buckets(time[..., :, None] - time[..., None, :], time_table.shape[-1])  # (B, K, S, S)
    if impl == "fused":  # f_b once per step in the compute dtype, with a table-reducing backward
        H = pos_table.shape[2]
        dtype = torch.get_autocast_dtype("cuda") if time.is_cuda and torch.is_autocast_enabled("cuda") else \
            torch.float32
        tables = (per_sample_table(t, scenario, K).reshape(B * K, H, -1) for t in (pos_table, time_table))
        fi = fused.prepare(*tables, pb, tb.reshape(B * K, S, S), hist_mask.reshape(B * K, S), n_hist, dtype)
        return dataclasses.replace(hist, fused=fi)
    pos = per_sample_table(pos_table, scenario, K)[..., pb]  # (B, K, H, S, S)
    tim = per_sample_table(time_table, scenario, K)  # (B, K, H, T)
    H = tim.shape[2]
    tim = torch.gather(tim[:, :, :, None].expand(-1, -1, -1, S, -1), -1, tb[:, :, None].expand(-1, -1, H, -1, -1))
    return dataclasses.replace(hist, bias=pos + tim, allowed=history_mask(hist_mask, n_hist))


def history_attention(qkv, hist: HistoryInputs, tau, impl: str = "split") -> torch.Tensor:
    """Causal history self-attention. qkv (K, B, L, 3, H, dh): the packed projections blocks
    first, as the model's qkv matmul leaves them (the fused kernels read them and write their
    gradient in place: under torch.compile, a graph output that is a transposed view would get
    its gradient copied to contiguous); tau (B, K, H, 1, 1) -> (B, K, H, L, dh)."""
    impl = resolve_impl(impl, qkv.device)
    if impl == "fused":  # takes qkv blocks first: its transpose stays outside compiled graphs
        K, B, _, _, H, _ = qkv.shape
        return fused.fused_attention(qkv, tau.reciprocal().reshape(B * K, H).float(), hist.fused)
    q, k, v = split_heads(qkv.transpose(0, 1))
    if impl == "sdpa":
        # temperature folded into q (scale=1); bias and mask folded into one additive mask
        add = (hist.bias / tau).masked_fill(~hist.allowed[:, :, None], float("-inf"))
        return F.scaled_dot_product_attention(q / tau, k, v, attn_mask=add.to(q.dtype), scale=1.0)
    return _softmax_attend((q @ k.transpose(-1, -2) + hist.bias) / tau, hist.allowed[:, :, None], v)


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
