"""Ranking metrics computed the standard way: AUC, GAUC and LogLoss (docs/paper.md section 1).

AUC is the Mann-Whitney statistic with tied scores sharing their average rank (identical to
scikit-learn's roc_auc_score). GAUC is the impression-weighted mean of per-user AUC over users
whose samples hold both classes (the DIN paper's definition; users with one class are
skipped). LogLoss is the mean binary cross-entropy with probabilities clipped to [eps, 1-eps].
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC averaged with weights = the user's number of samples.

    Vectorised: one sort by (user, score) gives every sample its rank within its user, tied
    scores sharing their average rank (as `auc`); per-user sums of positives' ranks then give each
    user's Mann-Whitney AUC. The same value as `gauc_reference`, the loop over users (tested),
    about 10x faster on 100k users."""
    users, labels, scores = np.asarray(users), np.asarray(labels).astype(bool), np.asarray(scores)
    order = np.lexsort((scores, users))
    u, y, s = users[order], labels[order], scores[order]
    n = len(u)
    if n == 0:
        return float("nan")
    new_user = np.r_[True, u[1:] != u[:-1]]
    uid = np.cumsum(new_user) - 1
    pos = np.arange(n) - np.flatnonzero(new_user)[uid] + 1  # 1-based rank within the user
    new_tie = new_user | np.r_[True, s[1:] != s[:-1]]
    first = np.flatnonzero(new_tie)
    last = np.r_[first[1:], n] - 1
    rank = ((pos[first] + pos[last]) / 2)[np.cumsum(new_tie) - 1]  # average rank of each tie group
    count = np.bincount(uid).astype(np.float64)
    n_pos = np.bincount(uid, weights=y)
    n_neg = count - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    rank_sum = np.bincount(uid, weights=rank * y)[ok]
    per_user = (rank_sum - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float((per_user * count[ok]).sum() / count[ok].sum())


def gauc_reference(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """`gauc` as its definition reads, a loop over users calling `auc`: the reference the
    vectorised version is tested against (and timed against, benchmarks/bench_data.py)."""
    users, labels, scores = np.asarray(users), np.asarray(labels).astype(bool), np.asarray(scores)
    order = np.argsort(users, kind="stable")
    users, labels, scores = users[order], labels[order], scores[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    total, weight = 0.0, 0
    for lab, sc in zip(np.split(labels, bounds), np.split(scores, bounds)):
        if 0 < lab.sum() < len(lab):
            total += auc(lab, sc) * len(lab)
            weight += len(lab)
    return total / weight if weight else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def evaluate_predictions(users: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                         tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """labels, probs (N, T); users (N,) -> {task: {auc, gauc, logloss}, 'mean': {...}}."""
    out = {}
    for t, name in enumerate(tasks):
        out[name] = {
            "auc": auc(labels[:, t], probs[:, t]),
            "gauc": gauc(users, labels[:, t], probs[:, t]),
            "logloss": logloss(labels[:, t], probs[:, t]),
        }
    out["mean"] = {k: _mean([out[n][k] for n in tasks]) for k in ("auc", "gauc", "logloss")}
    return out


def _mean(values: list[float]) -> float:
    """Mean over tasks, skipping tasks where a metric is undefined (NaN)."""
    ok = [v for v in values if not np.isnan(v)]
    return float(np.mean(ok)) if ok else float("nan")


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    rows = [f"{'task':<14}{'AUC':>9}{'GAUC':>9}{'LogLoss':>10}"]
    for name, r in results.items():
        rows.append(f"{name:<14}{r['auc']:>9.4f}{r['gauc']:>9.4f}{r['logloss']:>10.4f}")
    rule = "-" * len(rows[0])
    return "\n".join(([title] if title else []) + [rule, rows[0], rule, *rows[1:], rule])
