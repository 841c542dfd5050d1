"""Fixtures for the serving tests: a hand-made event log, prepared into a tiny SUMI data set,
and a tiny random Climber checkpoint that points at it (CPU, well under a second)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from climber import checkpoint
from climber.config import ModelConfig
from climber.data.events import EventLog, SideFeatures
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.train import build_model
from tests.helpers import perturb

STRATEGIES = ("recent", "pos:like", "recent@4")
USERS = (101, 102, 103, 104, 105, 106)
ITEMS = np.arange(1000, 1060, 2)  # raw item ids: even numbers, so odd ones are unknown


def tiny_log(seed: int = 0) -> EventLog:
    """Six users with 3..14 events each, two tasks, three actions, two scenarios, side features."""
    rng = np.random.default_rng(seed)
    user, item, time = [], [], []
    for u, n in zip(USERS, (3, 6, 9, 12, 14, 5), strict=True):
        user += [u] * n
        item += list(rng.choice(ITEMS, n))
        time += list(1_000_000 + np.cumsum(rng.integers(1, 400, n)))
    n = len(user)
    return EventLog(
        name="tiny-serve", user=np.array(user), item=np.array(item), time=np.array(time),
        labels=rng.integers(0, 2, (n, 2)), tasks=("click", "like"), action=rng.integers(0, 3, n),
        scenario=rng.integers(0, 2, n),
        item_features=SideFeatures(ITEMS, rng.integers(0, 4, (len(ITEMS), 1)), ("genre",)),
        user_features=SideFeatures(np.array(USERS), rng.integers(0, 3, (len(USERS), 1)), ("age",)),
    )


def make_checkpoint(root: Path, strategies: tuple[str, ...] = STRATEGIES, seq_len: int = 8, **model) -> Path:
    """Prepare `tiny_log` under root/data and save a random tiny model (ModelConfig fields `model`
    over the defaults) to root/ckpt; returns root/ckpt."""
    data_dir = Path(root) / "data"
    prepare(tiny_log(), data_dir, PrepareConfig(request_gap=100, max_candidates=4), strategies)
    data = SumiData(data_dir)
    cfg = ModelConfig(**data.vocab, strategies=strategies, seq_len=seq_len, d_model=16, n_heads=2, n_layers=2,
                      dropout=0.0, head_hidden=(16,), pos_buckets=8, time_buckets=8, **model)
    model = build_model(cfg, data, seed=0)
    perturb(model)
    ckpt = Path(root) / "ckpt"
    checkpoint.save(ckpt, model, {"model": asdict(cfg), "data": str(data_dir.resolve())})
    return ckpt
