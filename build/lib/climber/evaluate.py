"""Evaluation: AUC, GAUC and LogLoss per task and averaged, for a checkpoint on a split, next to
a popularity baseline (each item's smoothed positive rate among training candidates), so a
results table always says how much the model adds over "show what is popular".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from climber import checkpoint
from climber.data.events import DataError
from climber.data.sumi import SPLITS, SumiData
from climber.metrics import evaluate_predictions, format_table
from climber.runtime import Runtime, apply
from climber.train import predict


def popularity_scores(data: SumiData, split: str, smoothing: float = 10.0) -> tuple[np.ndarray, ...]:
    """(users, labels, probs) for the popularity baseline on `split`, fitted on train only."""
    a = data.a
    per_req = np.diff(a["req_cand_start"])
    cand_split = np.repeat(a["req_split"], per_req)
    cand_user = np.repeat(a["req_user"], per_req)

    def candidates(name: str):
        sel = cand_split == SPLITS[name]
        return cand_user[sel], a["cand_item"][sel], a["cand_labels"][sel].astype(np.float64)

    _, items, labels = candidates("train")
    n_items = data.meta["vocab"]["n_items"]
    prior = labels.mean(0)
    pos = np.zeros((n_items, labels.shape[1]))
    np.add.at(pos, items, labels)
    cnt = np.bincount(items, minlength=n_items)[:, None]
    rate = (pos + smoothing * prior) / (cnt + smoothing)
    users, items, labels = candidates(split)
    return users, labels, rate[items]


def evaluate(ckpt_dir: Path, data_dir: Path | None = None, split: str = "test", batch_size: int = 256,
             runtime: Runtime | None = None) -> dict:
    """Metrics of a checkpoint on `split` (any attention backend: the runtime's)."""
    runtime = runtime or Runtime()
    model, config = checkpoint.load_model(ckpt_dir)
    data = SumiData(Path(data_dir or config["data"]))
    checkpoint.check_vocabulary(config, data.vocab, ckpt_dir, data.root)
    if not len(data.requests(split)):
        raise DataError(f"{data.root}: no {split} requests to evaluate")
    dev = apply(model, runtime)
    users, labels, probs = predict(model, data, split, batch_size, dev)
    results = {
        "model": evaluate_predictions(users, labels, probs, data.tasks),
        "popularity": evaluate_predictions(*popularity_scores(data, split), data.tasks),
        "split": split,
        "dataset": data.meta["name"],
        "checkpoint": str(ckpt_dir),
        "candidates": int(len(users)),
        "params": model.param_counts(),
    }
    return results


def report(results: dict) -> str:
    title = f"{results['dataset']} / {results['split']} ({results['candidates']} candidates)"
    return "\n\n".join([format_table(results["model"], f"Climber: {title}"),
                        format_table(results["popularity"], f"Popularity baseline: {title}")])


def save_results(results: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
