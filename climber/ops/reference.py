"""The attention of the Adaptive Transformer Layer in plain PyTorch: the specification
(docs/paper.md sections 2.3 and 3.1). `climber/ops/triton_attention.py` implements `prepare`,
`attend` and `attend_cached` with the same meaning on the GPU; tests check the two agree, outputs
and gradients (`attend_cached`, for serving, is forward only).

Scores follow the paper: A = softmax((Q K^T + f_b) / tau). tau is a learned temperature per
(layer, block, scenario, head), passed as 1 / tau; f_b is a bias per (block, scenario, head)
looked up from a relative-position table and a time-gap table by bucket ids (`position_buckets`,
`time_buckets`; `bias` is the lookup).

The sequence is "single user, multiple items" (SUMI): n_hist history tokens, causal over the
valid ones, then (in training) M candidates, each at position n_hist with the request's time,
each seeing the valid history and itself, never another candidate:

    allowed(i, j) = j <= i and ((j < n_hist and key j valid) or j == i)

Every row keeps its diagonal, so no row is empty (padding rows see themselves). `attend`
computes the history rows as an (L, L) problem and the candidate rows as (M, L + 1): one
history row shared by every candidate plus the candidate's own key (`softmax_attention`'s
`self_kv`), which is the masked (L + M)^2 formulation with its zeros left out. `attend_cached`
is the same computation against cached history keys and values, for candidates (scoring) and
for new history events folded into a cache with them (their keys a second segment beside the
cache's; the new rows causal among themselves); it also returns the match readout's features
(`match_readout`), so that a kernel can make both from one read of the cached keys. Shapes: B
requests, K blocks, H heads, L history tokens, M candidates, dh head width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
    """Relative positions (query minus key) -> bucket ids: exact below n / 2, then log-spaced."""
    return log_bucket(rel, n, exact=n // 2, max_value=2048)


def time_buckets(dt: torch.Tensor, n: int) -> torch.Tensor:
    """Time gaps in seconds (query minus key) -> bucket ids."""
    return log_bucket(dt, n, exact=TIME_EXACT, max_value=TIME_MAX)


def bias(pos: torch.Tensor, tim: torch.Tensor, pb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
    """f_b: per-sample tables pos (..., H, P) and tim (..., H, T), position buckets pb (Sq, Sk),
    or per sample (..., Sq, Sk), and time buckets tb (..., Sq, Sk) -> (..., H, Sq, Sk)."""
    return (pos[..., pb.long()] if pb.dim() == 2 else _lookup(pos, pb)) + _lookup(tim, tb)


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-sample tables (..., H, N) at bucket ids (..., Sq, Sk) -> (..., H, Sq, Sk)."""
    H, (Sq, Sk) = table.shape[-2], idx.shape[-2:]
    flat = idx.flatten(-2).unsqueeze(-2).expand(*idx.shape[:-2], H, Sq * Sk).long()
    return table.gather(-1, flat).unflatten(-1, (Sq, Sk))


def sumi_mask(valid: torch.Tensor, n_hist: int) -> torch.Tensor:
    """Key validity (..., S) -> allowed (..., S, S), the SUMI mask of the module docstring."""
    S = valid.shape[-1]
    i = torch.arange(S, device=valid.device)
    seen = (i[None, :] <= i[:, None]) & (i[None, :] < n_hist)
    return (valid[..., None, :] & seen) | torch.eye(S, dtype=torch.bool, device=valid.device)


def softmax_attention(q, k, v, inv_tau, bias, allowed, self_kv=None, self_bias=None) -> torch.Tensor:
    """softmax((q k^T + bias) / tau) v over the allowed keys; the one place scores are made.

    q (..., Sq, dh); k, v (..., Sk, dh); bias (..., Sq or 1, Sk); allowed bool, broadcastable to
    (..., Sq, Sk); inv_tau (..., 1, 1). With `self_kv` = (k_self, v_self), each (..., Sq, dh),
    every query also sees its own key, with bias `self_bias` (..., 1 or Sq, 1). -> (..., Sq, dh)."""
    s = (q @ k.transpose(-1, -2) + bias) * inv_tau
    s = s.masked_fill(~allowed, float("-inf"))
    if self_kv is not None:
        k_self, v_self = self_kv
        s = torch.cat([s, ((q * k_self).sum(-1, keepdim=True) + self_bias) * inv_tau], dim=-1)
    p = torch.softmax(s.float(), dim=-1).to(v.dtype)
    if self_kv is None:
        return p @ v
    return p[..., :-1] @ v + p[..., -1:] * v_self


@dataclass
class Sequence:
    """What `attend` needs besides q, k, v and 1 / tau, built once per forward and shared by the
    layers (f_b does not depend on the layer). Leading dims (B, K)."""

    hist_bias: torch.Tensor  # (B, K, H, L, L)
    hist_allowed: torch.Tensor  # (B, K, L, L) bool
    key_valid: torch.Tensor  # (B, K, L) bool, history keys
    cand_bias: torch.Tensor | None  # (B, K, H, 1, L): every candidate's row to the history
    self_bias: torch.Tensor | None  # (B, K, H, 1, 1): a candidate's bias to its own key


def prepare(pos, tim, pb, tb, valid, n_hist: int, dtype: torch.dtype | None = None) -> Sequence:
    """f_b and the mask of a sequence of S tokens, the first n_hist of them history, the rest
    candidates, which share one time (the request's) and position (n_hist). Per-sample
    tables pos (B, K, H, P), tim (B, K, H, T); position buckets pb (S, S); time buckets tb
    (B, K, S, S); key validity valid (B, K, S). `dtype` is the kernels' concern: here f_b stays
    in the tables' dtype."""
    L, S = n_hist, valid.shape[-1]
    hist = bias(pos, tim, pb[:L, :L], tb[..., :L, :L])
    key_valid = valid[..., :L]
    cand = own = None
    if S > L:  # candidates: all at position L with the request time, so one row serves them all
        cand = bias(pos, tim, pb[L:L + 1, :L], tb[..., L:L + 1, :L])
        own = bias(pos, tim, pb[L:L + 1, L:L + 1], tb[..., L:L + 1, L:L + 1])
    return Sequence(hist, sumi_mask(key_valid, L), key_valid, cand, own)


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed projections (K, B, S, 3, H, dh), blocks first -> q, k, v (B, K, H, S, dh), views."""
    return qkv.permute(3, 1, 0, 4, 2, 5).unbind(0)


def attend(qkv: torch.Tensor, inv_tau: torch.Tensor, seq: Sequence) -> tuple[torch.Tensor, Sequence]:
    """SUMI attention of one layer. qkv (K, B, S, 3, H, dh) blocks first, as the model's
    projection leaves it; inv_tau (B, K, H) -> (output (B, K, H, S, dh), seq). `seq` comes back
    unchanged (the kernels' version threads f_b's gradient through it)."""
    S, L = qkv.shape[2], seq.key_valid.shape[-1]
    q, k, v = split_heads(qkv)
    it = inv_tau[..., None, None]
    kh, vh = k[..., :L, :], v[..., :L, :]
    out = softmax_attention(q[..., :L, :], kh, vh, it, seq.hist_bias, seq.hist_allowed[:, :, None])
    if S > L:
        valid = seq.key_valid[:, :, None, None, :]  # (B, K, 1, 1, L)
        c = softmax_attention(q[..., L:, :], kh, vh, it, seq.cand_bias, valid, (k[..., L:, :], v[..., L:, :]),
                              seq.self_bias)
        out = torch.cat([out, c], dim=-2)
    return out, seq


def match_readout(q, k_hist, hist_valid, inv_tau) -> torch.Tensor:
    """The match readout (climber/model.py, step 6): queries q (B, K, H, M, dh) against history
    keys k_hist (B, K, H, L, dh) with validity hist_valid (B, K, L) and 1 / tau (B, K, H, 1, 1)
    -> (B, K, H, M, 2) fp32: each query's mean logit over the valid keys, q . mean(k) / tau, and
    their log-mean-exp, a soft maximum that grows with the number and strength of close matches
    (as an item co-occurrence score does); 0 for an empty history. f_b is left out: the match is
    between items, not positions. In fp32."""
    q, k = q.float(), k_hist.float()
    valid = hist_valid[:, :, None, None, :]  # (B, K, 1, 1, L)
    logits = torch.einsum("bkhmd,bkhld->bkhml", q, k) * inv_tau.float()
    n = valid.sum(-1).clamp(min=1)
    mean = logits.masked_fill(~valid, 0).sum(-1) / n
    lme = torch.logsumexp(logits.masked_fill(~valid, float("-inf")), -1) - n.log()
    return torch.stack([mean, torch.where(valid.any(-1), lme, 0.0)], -1)


def attend_cached(q, k, v, inv_tau, k_hist, v_hist, hist_bias, self_bias, hist_valid, match: bool,
                  new_bias=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens against a history cache: n new history tokens, then M candidates.

    q, k, v (B, K, H, n + M, dh); inv_tau (B, K, H, 1, 1); the cached k_hist, v_hist (B, K, H,
    L, dh); hist_valid (B, K, L + n), the validity of the cached keys, then of the new tokens
    (right-aligned: padding rows first), so n = hist_valid's length - L. A new token i sees the
    valid cached keys, the valid new tokens up to itself and itself, with f_b a row each,
    new_bias (B, K, H, n, L + n) (None if n = 0). A candidate sees the valid cached and new keys
    and itself, with one f_b row hist_bias (B, K, H, 1, L + n) and self_bias (B, K, H, 1, 1)
    (both None if M = 0). -> (output (B, K, H, n + M, dh), and with `match` the candidates'
    `match_readout` against the valid cached and new keys (B, K, H, M, 2) fp32, else None)."""
    L, n = k_hist.shape[-2], hist_valid.shape[-1] - k_hist.shape[-2]
    if n:  # the new tokens' keys join the cache's
        k_hist, v_hist = torch.cat([k_hist, k[..., :n, :]], -2), torch.cat([v_hist, v[..., :n, :]], -2)
    valid = hist_valid[:, :, None, None, :]  # (B, K, 1, 1, L + n)
    ys = []
    if n:  # new token i: the valid keys up to key L + i, and key L + i itself
        allowed = valid.expand(*valid.shape[:3], n, L + n).tril(L)
        allowed[..., L:] |= torch.eye(n, dtype=torch.bool, device=q.device)
        ys.append(softmax_attention(q[..., :n, :], k_hist, v_hist, inv_tau, new_bias, allowed))
    if q.shape[-2] > n:
        ys.append(softmax_attention(q[..., n:, :], k_hist, v_hist, inv_tau, hist_bias, valid,
                                    (k[..., n:, :], v[..., n:, :]), self_bias))
    y = ys[0] if len(ys) == 1 else torch.cat(ys, -2)
    return y, match_readout(q[..., n:, :], k_hist, hist_valid, inv_tau) if match else None
