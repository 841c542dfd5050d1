"""What every Table 2 baseline (docs/paper.md section 4) shares with Climber, so that a comparison
isolates the architecture: the same embeddings, side-feature buffers, MLP head and reporting.

Embeddings are Climber's own (`climber/embeddings.py`). User side features are summed into one
vector (DLRM keeps them as separate fields).

Baselines that model one unsplit history read extraction block 0, which must be the plain
`recent` strategy (the built-in data sets put it first), i.e. the user's last `seq_len` events.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from climber.config import ModelConfig, parse_strategy
from climber.embeddings import Table, TokenEmbeddings
from climber.ops.reference import sumi_mask

HISTORY_KEYS = ("hist_item", "hist_time", "hist_action", "hist_scenario", "hist_labels", "hist_mask")


def recent_history(b: dict) -> dict:
    """The batch with every hist_* tensor cut to block 0: (B, K, L, ...) -> (B, L, ...)."""
    return {**b, **{k: b[k][:, 0] for k in HISTORY_KEYS}}


def joint_mask(hist_mask: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """History validity (B, L) and candidate validity (B, M) -> allowed (B, L + M, L + M): the
    SUMI mask of a joint [history; candidates] sequence (climber/ops/reference.py)."""
    return sumi_mask(torch.cat([hist_mask, cand_mask], dim=-1), n_hist=hist_mask.shape[-1])


def mlp_head(cfg: ModelConfig, d_in: int) -> nn.Sequential:
    """Climber's head: Linear + GELU + dropout per `head_hidden` width, then one logit per task."""
    dims = (d_in, *cfg.head_hidden)
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.GELU(), nn.Dropout(cfg.dropout)]
    return nn.Sequential(*layers, nn.Linear(dims[-1], len(cfg.tasks)))


def mlp_head_flops(cfg: ModelConfig, d_in: int) -> int:
    """Matmul FLOPs of `mlp_head` for one candidate."""
    dims = (d_in, *cfg.head_hidden, len(cfg.tasks))
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def user_dim(cfg: ModelConfig) -> int:
    """Width of the summed user side-feature vector appended to the head input (0 if none)."""
    return cfg.d_model if cfg.user_feature_cards else 0


class Baseline(TokenEmbeddings):
    """Climber's embeddings, side-feature buffers and `param_counts` (`climber/embeddings.py`);
    subclasses add the architecture, `self.head`, `forward(batch) -> (B, M, T)` and
    `flops(L, M)`, and call `init_weights()` last."""

    def __init__(self, cfg: ModelConfig):
        kind, _, cap = parse_strategy(cfg.strategies[0])
        if kind != "recent" or cap is not None:
            raise ValueError(f"{cfg.arch} reads extraction block 0 as the whole history; put the strategy 'recent' "
                             f"first (got {cfg.strategies})")
        super().__init__(cfg)

    def tokens(self, b: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(the batch cut to block 0, its history tokens (B, L, d), candidate tokens (B, M, d))."""
        r = recent_history(b)
        return r, self.embed_history(r), self.embed_candidates(b["cand_item"], b["req_scenario"])

    def init_weights(self, residual_out: tuple[nn.Linear, ...] = ()) -> None:
        """Climber's init: N(0, 0.02) embeddings and linears, zero biases; `residual_out`
        (the last linear of each residual branch) scaled down by sqrt(2 x layers)."""
        for m in self.modules():
            if isinstance(m, (nn.Embedding, nn.Linear)) and not isinstance(m, Table):  # a Table inits itself
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for lin in residual_out:
            nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
