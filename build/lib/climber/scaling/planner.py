"""Compute-optimal size planner (docs/paper.md section 4; Table 3's lesson: grow length and depth
together under a FLOPs budget).

For one model family of a sweep, AUC is fitted as a low-degree polynomial in the logs of the
swept dimensions that vary (history length L, layers N_L, width d): constant and linear terms,
then pairwise products (they let the best split of a budget between L and N_L lie inside the
range), then squares of dimensions with at least 3 swept values; squares, then products, are
dropped until 2 residual degrees of freedom remain (the linear terms always stay). Least
squares, with a residual bootstrap for the uncertainty (`fit.residual_bootstrap`).

Candidates are integer lengths on a fine geometric grid, every integer depth and the swept
widths, kept only inside the convex hull of the swept points in log space: the planner never
extrapolates, and says so when the budget reaches past the largest swept size. FLOPs per
request of a candidate come from the model itself (`flops(L, M)`, built on the meta device)
with the sweep's mean candidates per request. The budget is FLOPs only: there is no measured
FLOPs -> latency calibration.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import Delaunay, QhullError

from climber.config import ModelConfig, from_dict
from climber.model import make_model
from climber.scaling.fit import interval, metric_of, residual_bootstrap

DIMS = ("seq_len", "n_layers", "d_model")


@dataclass
class Surface:
    """AUC = sum_j coef_j prod_i log(dim_i)^terms[j][i] over the varying dims."""

    dims: tuple[str, ...]
    terms: list[tuple[int, ...]]
    coef: np.ndarray
    boot: np.ndarray  # (n_boot, n_terms)
    r2: float

    def design(self, logs: np.ndarray) -> np.ndarray:  # (n, len(dims)) -> (n, n_terms)
        return np.stack([np.prod(logs ** np.array(t), axis=1) for t in self.terms], 1)

    def predict(self, logs: np.ndarray) -> np.ndarray:
        return self.design(logs) @ self.coef

    def predict_boot(self, logs: np.ndarray) -> np.ndarray:  # (n_boot, n)
        return self.boot @ self.design(logs).T


def _terms(levels: list[int], n: int) -> list[tuple[int, ...]]:
    k = len(levels)
    unit = [tuple(int(i == j) for i in range(k)) for j in range(k)]
    terms = [(0,) * k] + unit
    terms += [tuple(a + b for a, b in zip(unit[i], unit[j])) for i, j in itertools.combinations(range(k), 2)]
    terms += [tuple(2 * u for u in unit[j]) for j in range(k) if levels[j] >= 3]
    while len(terms) > 1 + k and n - len(terms) < 2:
        terms.pop()
    if n <= len(terms):
        raise ValueError(f"{n} runs cannot fit a surface over {k} swept dimensions: sweep more sizes")
    return terms


def fit_surface(rows: list[dict], split: str = "test", n_boot: int = 2000, seed: int = 0) -> Surface:
    """Fit the AUC surface over the dimensions that vary in `rows` (one family)."""
    dims = tuple(d for d in DIMS if len({r[d] for r in rows}) > 1 and all(r[d] is not None for r in rows))
    logs = np.array([[math.log(r[d]) for d in dims] for r in rows]).reshape(len(rows), len(dims))
    y = np.array([metric_of(r, split) for r in rows])
    surf = Surface(dims, _terms([len({r[d] for r in rows}) for d in dims], len(rows)), np.empty(0), np.empty(0), 0.0)
    surf.coef, surf.boot = residual_bootstrap(surf.design(logs), y, n_boot, seed)
    ss = ((y - y.mean()) ** 2).sum()
    surf.r2 = float(1 - ((y - surf.predict(logs)) ** 2).sum() / ss) if ss > 0 else 1.0
    return surf


def _in_hull(points: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Which rows of `query` lie in the convex hull of `points` (both in log space)."""
    eps = 1e-9
    if points.shape[1] == 1:
        return (query[:, 0] >= points[:, 0].min() - eps) & (query[:, 0] <= points[:, 0].max() + eps)
    try:
        return Delaunay(np.unique(points, axis=0)).find_simplex(query, tol=eps) >= 0
    except QhullError:  # degenerate (e.g. collinear) design: fall back to the bounding box
        return ((query >= points.min(0) - eps) & (query <= points.max(0) + eps)).all(1)


def candidates(rows: list[dict], dims: tuple[str, ...]) -> list[dict]:
    """Integer sizes inside the swept hull: geometric lengths, every depth, the swept widths."""
    values = {}
    for d in DIMS:
        swept = sorted({r[d] for r in rows})
        if d not in dims:
            values[d] = swept[:1]
        elif d == "seq_len":
            values[d] = sorted({int(round(v)) for v in np.geomspace(swept[0], swept[-1], 60)} | set(swept))
        elif d == "n_layers":
            values[d] = list(range(swept[0], swept[-1] + 1))
        else:
            values[d] = swept
    grid = [dict(zip(DIMS, v)) for v in itertools.product(*(values[d] for d in DIMS))]
    pts = np.array([[math.log(r[d]) for d in dims] for r in rows]).reshape(len(rows), len(dims))
    q = np.array([[math.log(c[d]) for d in dims] for c in grid]).reshape(len(grid), len(dims))
    return [c for c, ok in zip(grid, _in_hull(pts, q)) if ok]


def candidate_flops(ref: dict, cands: list[dict], form: str) -> np.ndarray:
    """FLOPs per request of each candidate, from the model built like the reference row's."""
    base: ModelConfig = from_dict(ModelConfig, ref["config"]["model"])
    m = ref["candidates_per_request"]
    models: dict[tuple, torch.nn.Module] = {}
    out = []
    for c in cands:
        shape = (c["n_layers"] or base.n_layers, c["d_model"])
        if shape not in models:
            with torch.device("meta"):
                models[shape] = make_model(dataclasses.replace(base, n_layers=shape[0], d_model=shape[1]))
        out.append(models[shape].flops(c["seq_len"], m)[form])
    return np.array(out)


def plan(rows: list[dict], budget: float, model: str = "climber", form: str = "exact", split: str = "test",
         n_boot: int = 2000, seed: int = 0) -> dict:
    """Recommend (length, layers, width) with the highest fitted AUC within `budget` FLOPs per request."""
    rows = [r for r in rows if r["model"] == model]
    if len(rows) < 3:
        raise ValueError(f"need at least 3 runs of {model!r} to fit a surface, have {len(rows)}")
    surf = fit_surface(rows, split, n_boot, seed)
    cands = candidates(rows, surf.dims)
    flops = candidate_flops(rows[0], cands, form)
    logs = np.array([[math.log(c[d]) for d in surf.dims] for c in cands]).reshape(len(cands), len(surf.dims))
    pred, boot = surf.predict(logs), surf.predict_boot(logs)
    ok = flops <= budget
    dof = len(rows) - len(surf.terms)
    out = {"model": model, "budget_flops": budget, "flops_form": form, "split": split, "runs": len(rows),
           "surface": {"dims": list(surf.dims), "terms": [list(t) for t in surf.terms], "coef": surf.coef.tolist(),
                       "r2": surf.r2},
           "swept_flops_range": [float(flops.min()), float(flops.max())],
           "latency": "not calibrated: the budget is FLOPs per request only",
           "notes": [] if dof >= 2 else [f"only {dof} residual degree of freedom: the bootstrap interval "
                                          f"understates the uncertainty"]}
    measured = [r for r in rows if r["flops"][form] <= budget]
    out["best_measured"] = (max(({"key": r["key"], "flops": r["flops"][form], "auc": metric_of(r, split)}
                                 for r in measured), key=lambda r: r["auc"]) if measured else None)
    if not ok.any():
        out["recommendation"] = None
        out["notes"].append(f"budget {budget:.3g} is below the smallest size in the swept range "
                            f"({flops.min():.3g} FLOPs): a recommendation would extrapolate; sweep smaller sizes")
        return out
    if flops.max() <= budget:
        out["notes"].append(f"the budget is not binding: every size in the swept range fits (largest "
                            f"{flops.max():.3g} FLOPs); larger models would be extrapolation, which the planner "
                            f"refuses: sweep larger sizes")
    idx = np.flatnonzero(ok)
    best = idx[np.argmax(pred[idx])]
    picks = idx[np.argmax(boot[:, idx], axis=1)] if len(boot) else np.array([best])
    rec = dict(cands[best])
    if "n_layers" not in surf.dims and rows[0]["n_layers"] is None:
        rec["n_layers"] = None
    out["recommendation"] = {**rec, "flops": float(flops[best]), "predicted_auc": float(pred[best]),
                             "predicted_auc_ci": interval(boot[:, best]) if len(boot) else (math.nan, math.nan)}
    out["bootstrap_picks"] = {d: interval(np.array([cands[i][d] for i in picks], dtype=float))
                              for d in surf.dims}
    out["bootstrap_same_pick"] = float(np.mean(picks == best))
    return out


def plan_text(p: dict) -> str:
    dims = ", ".join(p["surface"]["dims"]) or "nothing"
    lines = [f"{p['model']}: budget {p['budget_flops']:.3g} FLOPs per request ({p['flops_form']} form); surface "
             f"over {dims} from {p['runs']} runs (R^2 {p['surface']['r2']:.3f}); "
             f"swept sizes span {p['swept_flops_range'][0]:.3g} .. {p['swept_flops_range'][1]:.3g} FLOPs"]
    r = p["recommendation"]
    if r:
        lo, hi = r["predicted_auc_ci"]
        depth = f", {r['n_layers']} layers" if r["n_layers"] is not None else ""
        lines.append(f"recommend length {r['seq_len']}{depth}, width {r['d_model']}: {r['flops']:.3g} FLOPs, "
                     f"predicted {p['split']} AUC {r['predicted_auc']:.4f} (95% CI {lo:.4f} .. {hi:.4f})")
        picks = "; ".join(f"{d} {a:g} .. {b:g}" for d, (a, b) in p["bootstrap_picks"].items())
        lines.append(f"bootstrap: same pick in {p['bootstrap_same_pick']:.0%} of replicates; 95% of picks in {picks}")
    b = p["best_measured"]
    if b:
        lines.append(f"best swept run within budget: {b['key']} ({b['flops']:.3g} FLOPs, {p['split']} AUC "
                     f"{b['auc']:.4f})")
    lines += [f"note: {n}" for n in p["notes"]] + [f"note: latency {p['latency']}"]
    return "\n".join(lines)
