"""HSTU baseline in ranking mode (docs/paper.md section 4, Table 2 "HSTU"; Zhai et al., "Actions
Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
Recommendations", arXiv 2402.17152, section 3).

Tokens are item-action tokens: each recent history event (extraction block 0) is its item
embedding plus its action and behaviour-flag embeddings (the same history token as Climber's);
candidates are appended under the SUMI mask (causal history, each candidate sees the history
and itself). Each HSTU layer (eqs. 1-3):

    U, V, Q, K = Split(SiLU(f1(LayerNorm(X))))
    A V = SiLU(Q K^T / sqrt(d_head) + rab^{p,t}) V / N      pointwise, not softmax
    Y = X + f2(LayerNorm(A V) * U)

rab^{p,t}: a relative attention bias from the bucketed relative position and the
log-bucketed time gap (Climber's bucketing), one scalar per bucket per layer, shared by the
heads, as in the reference implementation. N = seq_len + 1, the most keys a token can see,
is a constant (the reference divides by the padded maximum length): a per-batch count would
make a candidate's score depend on the other candidates. The 1 / sqrt(d_head) scale follows
the reference code. HSTU has no FFN. The last layer's state at each candidate, after a
LayerNorm, goes to the MLP head with the user features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from climber.baselines.common import Baseline, joint_mask, mlp_head, mlp_head_flops, user_dim
from climber.config import ModelConfig
from climber.ops.reference import position_buckets, time_buckets


class HSTULayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.h = cfg.n_heads
        self.n = cfg.seq_len + 1
        self.norm_in, self.norm_attn = nn.LayerNorm(d), nn.LayerNorm(d)
        self.uvqk, self.out = nn.Linear(d, 4 * d), nn.Linear(d, d)
        self.pos_bias = nn.Parameter(torch.zeros(cfg.pos_buckets))
        self.time_bias = nn.Parameter(torch.zeros(cfg.time_buckets))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, tim: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, S, d); pos, tim: bucket ids (B, S, S); allowed (B, S, S) -> (B, S, d)."""
        B, S, d = x.shape
        H, dh = self.h, d // self.h
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).chunk(4, dim=-1)  # (B, S, d) each
        q, k, v = (t.view(B, S, H, dh).transpose(1, 2) for t in (q, k, v))  # (B, H, S, dh)
        # F.embedding, not table[idx]: its backward reduces the ~B S^2 duplicate indices of a
        # 32-entry table in parallel, where index_put's accumulation serialises them (~10x slower on GPU)
        rab = (F.embedding(pos, self.pos_bias[:, None]) + F.embedding(tim, self.time_bias[:, None]))[..., 0]
        rab = rab[:, None]  # (B, 1, S, S)
        a = F.silu((q @ k.transpose(-1, -2)).float() / math.sqrt(dh) + rab) / self.n * allowed[:, None]
        o = (a.to(v.dtype) @ v).transpose(1, 2).reshape(B, S, d)
        return x + self.drop(self.out(self.norm_attn(o) * u))


class HSTU(Baseline):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(d)
        self.head_in = d + user_dim(cfg)
        self.head = mlp_head(cfg, self.head_in)
        self.init_weights(tuple(layer.out for layer in self.layers))

    def forward(self, b: dict) -> torch.Tensor:
        """Batch of SUMI samples -> logits (B, M, T)."""
        r, h, c = self.tokens(b)  # h (B, L, d), c (B, M, d)
        (B, L, _), M = h.shape, c.shape[1]
        x = torch.cat([h, c], 1)  # (B, S, d), S = L + M
        # every candidate sits at position L with the request's time
        p = torch.cat([torch.arange(L), torch.full((M,), L)]).to(x.device)
        t = torch.cat([r["hist_time"], b["req_time"][:, None].expand(B, M)], 1)  # (B, S)
        pos = position_buckets((p[:, None] - p[None, :])[None], self.cfg.pos_buckets)  # (1, S, S)
        tim = time_buckets(t[:, :, None] - t[:, None, :], self.cfg.time_buckets)  # (B, S, S)
        allowed = joint_mask(r["hist_mask"], b["cand_mask"])  # (B, S, S)
        for layer in self.layers:
            x = layer(x, pos, tim, allowed)
        return self.head(self.with_user(self.norm_out(x[:, L:]), b["user"]))

    def flops(self, L: int, M: int) -> dict[str, float]:
        """Forward FLOPs for one request (L recent history events, M candidates, S = L + M).

        paper: the paper's length x layers form, attention neglected: 2 N_L S (4 d^2 + d^2)
            for the U, V, Q, K and output projections.
        exact: matmuls as torch's FlopCounterMode counts them (2 per multiply-add): the above
            plus Q K^T and A V over the joint sequence, 2 x 2 S^2 d per layer, and the head.
        per_candidate: exact / M.
        """
        cfg = self.cfg
        d, NL, S = cfg.d_model, cfg.n_layers, L + M
        paper = 2 * NL * S * 5 * d * d
        exact = paper + NL * 2 * 2 * S * S * d + M * mlp_head_flops(cfg, self.head_in)
        return {"paper": float(paper), "exact": float(exact), "per_candidate": exact / M}
