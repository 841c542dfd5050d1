"""TWIN baseline (docs/paper.md section 4, Table 2 "TWIN"; Chang et al., "TWIN: TWo-stage Interest
Network for Lifelong User Behavior Modeling in CTR Prediction at Kuaishou", KDD 2023).

Two stages over the recent history (extraction block 0), per candidate:
* general search unit (GSU): scores every history event against the candidate and keeps the
  top k = max(1, seq_len // 4). TWIN's point is that the GSU uses the same relevance as the
  ESU ("consistency-preserving"): here the ESU's own attention logits summed over heads, from
  projected keys that serving could precompute per item;
* exact search unit (ESU): multi-head target attention (query: the candidate; keys and values:
  the k retrieved events; softmax with sqrt(d_head) temperature), then an output projection.
The MLP head reads [ESU output, candidate, user features]. Simplified from the paper: no
cross features (e.g. the time gap) in the ESU, and one embedding table for both stages.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from climber.baselines.common import Baseline, mlp_head, mlp_head_flops, user_dim
from climber.config import ModelConfig


class TWIN(Baseline):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.top_k = max(1, cfg.seq_len // 4)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.head_in = 2 * d + user_dim(cfg)
        self.head = mlp_head(cfg, self.head_in)
        self.init_weights()

    def forward(self, b: dict) -> torch.Tensor:
        """Batch of SUMI samples -> logits (B, M, T)."""
        r, h, c = self.tokens(b)  # h (B, L, d), c (B, M, d)
        (B, L, d), M = h.shape, c.shape[1]
        H, dh = self.cfg.n_heads, self.cfg.d_head
        k_ = min(self.top_k, L)
        q = self.q(c).view(B, M, H, dh).transpose(1, 2)  # (B, H, M, dh)
        key, val = self.kv(h).view(B, L, 2, H, dh).permute(2, 0, 3, 1, 4)  # (B, H, L, dh) each
        s = (q @ key.transpose(-1, -2)).float() / math.sqrt(dh)  # (B, H, M, L)
        valid = r["hist_mask"][:, None]  # (B, 1, L)
        # GSU: the ESU's relevance over the whole history; padding is never retrieved
        relevance = s.sum(1).masked_fill(~valid, float("-inf"))  # (B, M, L)
        top = relevance.topk(k_, dim=-1).indices  # (B, M, k)
        # ESU: softmax target attention over the k retrieved events (fewer if the history is short)
        s_top = s.gather(-1, top[:, None].expand(B, H, M, k_))  # (B, H, M, k)
        ok = valid.expand(B, M, L).gather(-1, top)[:, None]  # (B, 1, M, k)
        p = torch.softmax(s_top.masked_fill(~ok, torch.finfo(s_top.dtype).min), -1) * ok  # 0 if no history
        v_top = val.gather(2, top.view(B, 1, M * k_, 1).expand(B, H, M * k_, dh)).view(B, H, M, k_, dh)
        o = torch.einsum("bhmk,bhmkd->bhmd", p.to(v_top.dtype), v_top)  # (B, H, M, dh)
        o = self.proj(o.transpose(1, 2).reshape(B, M, d))
        return self.head(self.with_user(torch.cat([o, c], -1), b["user"]))

    def flops(self, L: int, M: int) -> dict[str, float]:
        """Forward FLOPs for one request (L recent history events, M candidates).

        paper: the paper's length x layers form, weights applied per token: key/value
            projections of the L events, query and output projections of the M candidates,
            2 (2 L d^2 + 2 M d^2).
        exact: matmuls as torch's FlopCounterMode counts them (2 per multiply-add): the
            projections, GSU scores 2 M L d, ESU weighted sum 2 M k d, and the head.
        per_candidate: exact / M.
        """
        d, k_ = self.cfg.d_model, min(self.top_k, L)
        paper = 2 * (2 * L * d * d + 2 * M * d * d)
        exact = paper + 2 * M * L * d + 2 * M * k_ * d + M * mlp_head_flops(self.cfg, self.head_in)
        return {"paper": float(paper), "exact": float(exact), "per_candidate": exact / M}
