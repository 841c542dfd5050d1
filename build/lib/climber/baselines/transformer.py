"""Plain Transformer baseline (docs/paper.md sections 1 and 4, Table 2 "Transformer"): what Climber
is measured against when the adaptive layer, multi-scale extraction and fusion are taken away.

One standard pre-norm Transformer encoder (LayerNorm, softmax attention with the fixed
sqrt(d_head) temperature, GELU FFN, no relative bias) over the whole unsplit recent history
(extraction block 0) with the candidates appended under the SUMI mask of docs/paper.md 3.1: causal
history, each candidate sees the history and itself. Learned absolute position embeddings are
counted from the end (the latest event always has position seq_len - 1, every candidate
seq_len), so trimming a batch's padding never changes a score. The last layer's state at each
candidate token, after a final LayerNorm, goes to the MLP head with the user features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from climber.baselines.common import Baseline, joint_mask, mlp_head, mlp_head_flops, recent_history, user_dim
from climber.config import ModelConfig


class EncoderLayer(nn.Module):
    """Pre-norm multi-head softmax attention and GELU FFN, each with a residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.h = cfg.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.ffn_mult * d), nn.Linear(cfg.ffn_mult * d, d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, S, d), allowed (B, S, S) -> (B, S, d)."""
        B, S, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)  # (B, H, S, dh)
        s = (q @ k.transpose(-1, -2)).float() / math.sqrt(d // self.h)
        p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).to(v.dtype)
        x = x + self.drop(self.proj((p @ v).transpose(1, 2).reshape(B, S, d)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class Transformer(Baseline):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.pos_emb = nn.Embedding(cfg.seq_len + 1, d)  # history positions 0..seq_len-1, candidates seq_len
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(d)
        self.head_in = d + user_dim(cfg)
        self.head = mlp_head(cfg, self.head_in)
        self.init_weights(tuple(lin for layer in self.layers for lin in (layer.proj, layer.fc2)))

    def forward(self, b: dict) -> torch.Tensor:
        """Batch of SUMI samples -> logits (B, M, T)."""
        r = recent_history(b)
        h = self.embed_history(r)  # (B, L, d), left-padded
        L, N = h.shape[1], self.cfg.seq_len
        h = h + self.pos_emb(torch.arange(N - L, N, device=h.device))
        c = self.embed_candidates(b["cand_item"], b["req_scenario"]) + self.pos_emb.weight[N]  # (B, M, d)
        x = torch.cat([h, c], 1)  # (B, L + M, d)
        allowed = joint_mask(r["hist_mask"], b["cand_mask"])  # (B, L + M, L + M)
        for layer in self.layers:
            x = layer(x, allowed)
        return self.head(self.with_user(self.norm_out(x[:, L:]), b["user"]))

    def flops(self, L: int, M: int) -> dict[str, float]:
        """Forward FLOPs for one request (L recent history events, M candidates, S = L + M).

        paper: the paper's length x layers form, attention scores neglected:
            2 N_L S (4 d^2 + 2 d f), f the FFN width.
        exact: matmuls as torch's FlopCounterMode counts them (2 per multiply-add): the above
            plus the joint masked attention 2 x 2 S^2 d per layer, and the head.
        per_candidate: exact / M.
        """
        cfg = self.cfg
        d, NL, f, S = cfg.d_model, cfg.n_layers, cfg.ffn_mult * cfg.d_model, L + M
        paper = 2 * NL * S * (4 * d * d + 2 * d * f)
        exact = paper + NL * 2 * 2 * S * S * d + M * mlp_head_flops(cfg, self.head_in)
        return {"paper": float(paper), "exact": float(exact), "per_candidate": exact / M}
