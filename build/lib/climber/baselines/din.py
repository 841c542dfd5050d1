"""DIN baseline (docs/paper.md section 4, Table 2 "DIN"; Zhou et al., "Deep Interest Network for
Click-Through Rate Prediction", KDD 2018, section 4.3).

Target attention: for each candidate c and each recent history event h (extraction block 0),
an activation unit, an MLP on [h, c, h - c, h * c], gives a weight; the user's interest in c is
the weighted sum of the history. As in the paper the weights are not softmax-normalised, so
the interest keeps the intensity of the matching behaviour. The MLP head reads [interest, c,
user features]. The activation unit uses the reference implementation's widths (80, 40) and
sigmoid activations.
"""

from __future__ import annotations

import torch
from torch import nn

from climber.baselines.common import Baseline, mlp_head, mlp_head_flops, user_dim
from climber.config import ModelConfig

ATTENTION_HIDDEN = (80, 40)


class DIN(Baseline):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        d = cfg.d_model
        a1, a2 = ATTENTION_HIDDEN
        self.activation_unit = nn.Sequential(nn.Linear(4 * d, a1), nn.Sigmoid(), nn.Linear(a1, a2), nn.Sigmoid(),
                                             nn.Linear(a2, 1))
        self.head_in = 2 * d + user_dim(cfg)
        self.head = mlp_head(cfg, self.head_in)
        self.init_weights()

    def forward(self, b: dict) -> torch.Tensor:
        """Batch of SUMI samples -> logits (B, M, T)."""
        r, h, c = self.tokens(b)  # h (B, L, d), c (B, M, d)
        (B, L, d), M = h.shape, c.shape[1]
        hh, cc = h[:, None].expand(B, M, L, d), c[:, :, None].expand(B, M, L, d)
        w = self.activation_unit(torch.cat([hh, cc, hh - cc, hh * cc], -1)).squeeze(-1)  # (B, M, L)
        w = w * r["hist_mask"][:, None]  # padding contributes nothing
        interest = w @ h  # (B, M, d) weighted sum pooling
        return self.head(self.with_user(torch.cat([interest, c], -1), b["user"]))

    def flops(self, L: int, M: int) -> dict[str, float]:
        """Forward FLOPs for one request (L recent history events, M candidates).

        paper: the paper's length x layers form: the activation unit's weights applied to each
            of the M x L (candidate, event) pairs, 2 M L (4d a1 + a1 a2 + a2).
        exact: matmuls as torch's FlopCounterMode counts them (2 per multiply-add): the
            activation unit, the weighted sum 2 M L d, and the head.
        per_candidate: exact / M.
        """
        d = self.cfg.d_model
        a1, a2 = ATTENTION_HIDDEN
        paper = 2 * M * L * (4 * d * a1 + a1 * a2 + a2)
        exact = paper + 2 * M * L * d + M * mlp_head_flops(self.cfg, self.head_in)
        return {"paper": float(paper), "exact": float(exact), "per_candidate": exact / M}
