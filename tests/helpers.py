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


def perturb(model) -> None:
    """O(1) activations and non-trivial bias tables and temperatures, so that properties are
    tested where they could fail (the N(0, 0.02) init makes every output nearly equal)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
        model.pos_bias.normal_(0, 0.5)
        model.time_bias.normal_(0, 0.5)
        model.log_tau.add_(torch.randn_like(model.log_tau) * 0.3)


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


def synthetic_log(n_users: int = 30, n_items: int = 60, per_user: int = 40, seed: int = 0):
    """A small seeded log where a user's likes follow a hidden taste for half of the items."""
    import numpy as np

    from climber.data.events import EventLog, SideFeatures

    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(n_users), per_user)
    item = rng.integers(0, n_items, len(user))
    taste = rng.integers(0, 2, n_users)
    cat = np.arange(n_items) % 2
    like = (rng.random(len(user)) < np.where(cat[item] == taste[user], 0.8, 0.2)).astype(int)
    click = (rng.random(len(user)) < 0.5 + 0.3 * like).astype(int)
    time = np.tile(np.arange(per_user) // 3 * 100, n_users) + rng.integers(0, 5, len(user))  # ~3 per request
    return EventLog("synthetic", user=user, item=item, time=time, labels=np.stack([click, like], 1),
                    tasks=("click", "like"), action=rng.integers(0, 3, len(user)),
                    scenario=rng.integers(0, 2, len(user)),
                    item_features=SideFeatures(np.arange(n_items), cat[:, None] + 1, ("cat",)))
