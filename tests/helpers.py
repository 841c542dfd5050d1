"""Shared test fixtures: a tiny config and random SUMI batches (CPU, seconds)."""

from __future__ import annotations

import torch

from climber.config import ModelConfig


def tiny_config(**kw) -> ModelConfig:
    base = dict(n_items=50, n_users=12, tasks=("click", "like"), n_actions=3, n_scenarios=3,
                item_feature_cards=(5,), user_feature_cards=(4, 3), strategies=("recent", "pos:like", "recent@3"),
                seq_len=8, d_model=16, n_heads=2, n_layers=2, dropout=0.0, head_hidden=(16,), pos_buckets=8,
                time_buckets=8)
    base.update(kw)
    return ModelConfig(**base)


def random_batch(cfg: ModelConfig, B: int = 3, L: int = 8, M: int = 5, seed: int = 0, full: bool = False) -> dict:
    """Left-padded random histories with random lengths (some empty) and random candidate counts."""
    g = torch.Generator().manual_seed(seed)
    K, T = cfg.n_blocks, len(cfg.tasks)
    lengths = torch.randint(0, L + 1, (B, K), generator=g)
    if full:
        lengths[:] = L
    hist_mask = torch.arange(L)[None, None, :] >= (L - lengths)[..., None]
    times = torch.sort(torch.randint(0, 10**6, (B, K, L), generator=g), dim=-1).values
    n_cand = torch.randint(1, M + 1, (B,), generator=g)
    if full:
        n_cand[:] = M
    cand_mask = torch.arange(M)[None, :] < n_cand[:, None]
    return {
        "user": torch.randint(0, cfg.n_users, (B,), generator=g),
        "req_time": times[:, :, -1].max(-1).values + torch.randint(0, 1000, (B,), generator=g),
        "req_scenario": torch.randint(0, cfg.n_scenarios, (B,), generator=g),
        "hist_item": torch.where(hist_mask, torch.randint(2, cfg.n_items, (B, K, L), generator=g), 0),
        "hist_time": times,
        "hist_action": torch.randint(0, cfg.n_actions, (B, K, L), generator=g) * hist_mask,
        "hist_scenario": torch.randint(0, cfg.n_scenarios, (B, K, L), generator=g) * hist_mask,
        "hist_labels": torch.randint(0, 2, (B, K, L, T), generator=g) * hist_mask[..., None],
        "hist_mask": hist_mask,
        "cand_item": torch.where(cand_mask, torch.randint(2, cfg.n_items, (B, M), generator=g), 0),
        "cand_mask": cand_mask,
        "labels": torch.randint(0, 2, (B, M, T), generator=g).float() * cand_mask[..., None],
    }
