"""What every Table 2 baseline (PAPER.md section 4) shares with Climber, so that a comparison
isolates the architecture: the same embeddings, side-feature buffers, MLP head and reporting.

Embeddings follow `climber/model.py` exactly: an item is its id embedding plus its side-feature
embeddings; a history token adds its action, its behaviour flags (one embedding per task and
label) and its scenario; a candidate adds a learned target embedding and the request's
scenario. User side features are summed into one vector (DLRM keeps them as separate fields).

Baselines that model one unsplit history read extraction block 0, which must be the plain
`recent` strategy (the built-in data sets put it first), i.e. the user's last `seq_len` events.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from climber.config import ModelConfig, parse_strategy

HISTORY_KEYS = ("hist_item", "hist_time", "hist_action", "hist_scenario", "hist_labels", "hist_mask")


def recent_history(b: dict) -> dict:
    """The batch with every hist_* tensor cut to block 0: (B, K, L, ...) -> (B, L, ...)."""
    return {**b, **{k: b[k][:, 0] for k in HISTORY_KEYS}}


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


class Baseline(nn.Module):
    """Embedding tables, side-feature buffers and `param_counts`; subclasses add the
    architecture, `self.head`, `forward(batch) -> (B, M, T)` and `flops(L, M)`, and call
    `init_weights()` last."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kind, _, cap = parse_strategy(cfg.strategies[0])
        if kind != "recent" or cap is not None:
            raise ValueError(f"{cfg.arch} reads extraction block 0 as the whole history; put the strategy 'recent' "
                             f"first (got {cfg.strategies})")
        self.cfg = cfg
        d, T = cfg.d_model, len(cfg.tasks)
        self.item_emb = nn.Embedding(cfg.n_items, d, padding_idx=0)
        self.item_feat_emb = nn.ModuleList(nn.Embedding(c, d) for c in cfg.item_feature_cards)
        self.user_feat_emb = nn.ModuleList(nn.Embedding(c, d) for c in cfg.user_feature_cards)
        self.action_emb = nn.Embedding(cfg.n_actions, d)
        self.flag_emb = nn.Embedding(2 * T, d)  # index 2t + label_t
        self.scenario_emb = nn.Embedding(cfg.n_scenarios, d)
        self.target_emb = nn.Parameter(torch.zeros(d))
        # side-feature lookup tables travel with the weights; `train.build_model` fills them
        self.register_buffer("item_features", torch.zeros(cfg.n_items, len(cfg.item_feature_cards), dtype=torch.long))
        self.register_buffer("user_features", torch.zeros(cfg.n_users, len(cfg.user_feature_cards), dtype=torch.long))

    def init_weights(self, residual_out: tuple[nn.Linear, ...] = ()) -> None:
        """Climber's init: N(0, 0.02) embeddings and linears, zero biases; `residual_out`
        (the last linear of each residual branch) scaled down by sqrt(2 x layers)."""
        for m in self.modules():
            if isinstance(m, (nn.Embedding, nn.Linear)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for lin in residual_out:
            nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    # ---- embeddings, as in Climber ------------------------------------------------------------
    def embed_items(self, item: torch.Tensor) -> torch.Tensor:  # (...) -> (..., d)
        e = self.item_emb(item)
        feats = self.item_features[item]
        for f, emb in enumerate(self.item_feat_emb):
            e = e + emb(feats[..., f])
        return e

    def embed_history(self, b: dict) -> torch.Tensor:
        """History tokens (B, [K,] L, d) for hist_* of shape (B, [K,] L)."""
        T = len(self.cfg.tasks)
        flags = b["hist_labels"] + 2 * torch.arange(T, device=b["hist_labels"].device)
        return (self.embed_items(b["hist_item"]) + self.action_emb(b["hist_action"])
                + self.flag_emb(flags).sum(-2) + self.scenario_emb(b["hist_scenario"]))

    def embed_candidates(self, b: dict) -> torch.Tensor:  # -> (B, M, d)
        return self.embed_items(b["cand_item"]) + self.target_emb + self.scenario_emb(b["req_scenario"])[:, None]

    def user_fields(self, user: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, F_u, d): one embedding per user side feature."""
        feats = self.user_features[user]
        d = self.cfg.d_model
        fields = [emb(feats[:, f]) for f, emb in enumerate(self.user_feat_emb)]
        return torch.stack(fields, 1) if fields else feats.new_zeros(len(user), 0, d, dtype=self.item_emb.weight.dtype)

    def with_user(self, y: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """Append the summed user side-feature vector to every candidate's (B, M, n) head input."""
        if not self.cfg.user_feature_cards:
            return y
        u = self.user_fields(user).sum(1)  # (B, d)
        return torch.cat([y, u[:, None].expand(*y.shape[:2], -1)], dim=-1)

    # ---- the model reports itself --------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        emb = sum(p.numel() for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"embedding": emb, "dense": total - emb, "total": total}
