"""DLRM-style baseline (docs/paper.md section 4, Table 2 "DLRM"; Naumov et al., "Deep Learning
Recommendation Model for Personalization and Recommendation Systems", arXiv 1906.00091).

Every input becomes a d-vector "field": the candidate, the mean of each extraction block's
history events (block 0 = the recent history, the others the behaviour-specific sequences of
the data set, e.g. liked / disliked), and each user side feature. DLRM's interaction takes the
dot product of every pair of fields; the top MLP reads the fields and the pairwise products.
There are no dense (continuous) features here, so there is no bottom MLP.
"""

from __future__ import annotations

import torch

from climber.baselines.common import Baseline, mlp_head, mlp_head_flops
from climber.config import ModelConfig


class DLRM(Baseline):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        F = 1 + cfg.n_blocks + len(cfg.user_feature_cards)  # candidate, pooled blocks, user features
        self.head_in = F * cfg.d_model + F * (F - 1) // 2
        self.head = mlp_head(cfg, self.head_in)
        self.init_weights()

    def forward(self, b: dict) -> torch.Tensor:
        """Batch of SUMI samples -> logits (B, M, T)."""
        h = self.embed_history(b)  # (B, K, L, d)
        m = b["hist_mask"][..., None].to(h.dtype)
        pooled = (h * m).sum(2) / m.sum(2).clamp(min=1)  # (B, K, d); zero for an empty block
        c = self.embed_candidates(b["cand_item"], b["req_scenario"])  # (B, M, d)
        B, M, _ = c.shape
        ctx = torch.cat([pooled, self.user_fields(b["user"]).to(pooled.dtype)], 1)  # (B, K + F_u, d)
        x = torch.cat([c[:, :, None], ctx[:, None].expand(B, M, -1, -1)], 2)  # (B, M, F, d)
        F = x.shape[2]
        i, j = torch.tril_indices(F, F, offset=-1, device=x.device)
        z = (x @ x.transpose(-1, -2))[:, :, i, j]  # (B, M, F(F-1)/2): each pair's dot product once
        return self.head(torch.cat([x.flatten(2), z], -1))

    def flops(self, L: int, M: int) -> dict[str, float]:
        """Forward FLOPs for one request (L history events per block, M candidates).

        paper: the paper's length x layers form (weights applied per sequence token): 0, since
            DLRM only averages its history; all its compute is per candidate.
        exact: matmuls as torch's FlopCounterMode counts them (2 per multiply-add), per
            candidate: the F x F field Gram matrix 2 F^2 d and the top MLP. Pooling is additions.
        per_candidate: exact / M.
        """
        cfg = self.cfg
        F = 1 + cfg.n_blocks + len(cfg.user_feature_cards)
        exact = M * (2 * F * F * cfg.d_model + mlp_head_flops(cfg, self.head_in))
        return {"paper": 0.0, "exact": float(exact), "per_candidate": exact / M}
