"""Scaling-law fits, plots and report (docs/paper.md section 4: Fig. 1, Fig. 3, Table 3).

From the rows of a sweep (`sweep.py`):
- AUC against FLOPs per request, per model family, fitted as AUC = a + b log10(FLOPs) by least
  squares, with a 95% band from a residual bootstrap (the grid is a fixed design, so the
  residuals are resampled, not the runs; they are inflated by sqrt(n / (n - p)) to undo the
  shrinkage of in-sample residuals). A family whose FLOPs take one value (e.g. DLRM, whose
  compute does not grow with history length) gets a constant, its mean AUC. Where a family has
  at least 5 distinct FLOPs values, a saturating power law AUC = A - B (F / F_ref)^-alpha is
  fitted as well (F_ref = the geometric mean FLOPs, for conditioning).
- The paper's Fig. 3 panels: AUC against layers per length, and against length per layers.
- The equal-FLOPs allocation table (Table 3): runs grouped by length x layers (the paper's
  FLOPs form, C ~ length x layers) at one width; which (length, layers) wins each level.
- Crossovers: where one family's line overtakes another's (Climber vs DLRM, as in Fig. 1), with
  a bootstrap interval, or which side stays ahead over the FLOPs range of the data.
Outputs: PNGs (matplotlib, Agg), `report.md` and `fit.json` in one directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit

from climber.extras import pyplot

Z = 0.95  # confidence level of every band and interval


def residual_bootstrap(X: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y ~ X and (n_boot, p) coefficients refitted to fitted + resampled residuals.

    With no residual degrees of freedom (n <= p) the bootstrap is empty: no band is claimed."""
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    n, p = X.shape
    if n <= p:
        return coef, np.empty((0, p))
    fitted = X @ coef
    resid = (y - fitted) * math.sqrt(n / (n - p))
    rng = np.random.default_rng(seed)
    ys = fitted + resid[rng.integers(0, n, (n_boot, n))]  # (n_boot, n)
    return coef, np.linalg.lstsq(X, ys.T, rcond=None)[0].T


def interval(samples: np.ndarray) -> tuple[float, float]:
    if len(samples) == 0:
        return (math.nan, math.nan)
    lo, hi = np.quantile(samples, [(1 - Z) / 2, (1 + Z) / 2])
    return float(lo), float(hi)


@dataclass
class LineFit:
    """AUC = a + b x, x = log10 FLOPs; b = 0 (a constant) when x takes one value."""

    a: float
    b: float
    boot: np.ndarray  # (n_boot, 2) coefficients (a, b)
    x: np.ndarray
    y: np.ndarray

    def predict(self, x) -> np.ndarray:
        return self.a + self.b * np.asarray(x, dtype=float)

    def band(self, x) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=float)
        if not len(self.boot):
            return np.full_like(x, np.nan), np.full_like(x, np.nan)
        curves = self.boot[:, :1] + self.boot[:, 1:] * x[None]
        return np.quantile(curves, (1 - Z) / 2, axis=0), np.quantile(curves, (1 + Z) / 2, axis=0)

    @property
    def constant(self) -> bool:
        return len(np.unique(self.x)) < 2

    def summary(self) -> dict:
        b_ci = (math.nan, math.nan) if self.constant else interval(self.boot[:, 1])
        return {"a": self.a, "b": self.b, "a_ci": interval(self.boot[:, 0]), "b_ci": b_ci,
                "n": len(self.x), "distinct_flops": len(np.unique(self.x)), "constant": self.constant,
                "log10_flops_range": [self.x.min(), self.x.max()],
                "bootstrap": len(self.boot)}


def fit_line(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0) -> LineFit:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(x)) >= 2:
        coef, boot = residual_bootstrap(np.stack([np.ones_like(x), x], 1), y, n_boot, seed)
        return LineFit(float(coef[0]), float(coef[1]), boot, x, y)
    coef, boot = residual_bootstrap(np.ones((len(x), 1)), y, n_boot, seed)
    return LineFit(float(coef[0]), 0.0, np.concatenate([boot, np.zeros_like(boot)], 1), x, y)


def saturating(logf: np.ndarray, A: float, B: float, alpha: float, ref: float) -> np.ndarray:
    """AUC = A - B (F / F_ref)^-alpha, written in x = log10 F."""
    return A - B * 10.0 ** (-alpha * (np.asarray(logf) - ref))


def fit_saturating(x: np.ndarray, y: np.ndarray) -> dict | None:
    """(A, B, alpha, ref) by nonlinear least squares, or None with fewer than 5 distinct FLOPs
    values (3 parameters are not identified on fewer), when the fit does not converge, or when it
    ends on a bound (e.g. A = 1: the points show no saturation)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(x)) < 5:
        return None
    ref = float(x.mean())
    try:
        (A, B, alpha), _ = curve_fit(lambda t, A, B, al: saturating(t, A, B, al, ref), x, y,
                                     p0=(y.max() + 0.01, max(y.max() - y.min(), 1e-3), 0.5),
                                     bounds=([0.0, 0.0, 1e-3], [1.0, 1.0, 5.0]), maxfev=20000)
    except RuntimeError:
        return None
    if A > 0.999 or B < 1e-6 or not 1.1e-3 < alpha < 4.9:
        return None  # a parameter at its bound: the data do not identify the law
    return {"A": float(A), "B": float(B), "alpha": float(alpha), "ref_log10_flops": ref}


def crossover(ab_a: tuple[float, float], ab_b: tuple[float, float], lo: float, hi: float) -> dict:
    """Where line A = a + b x meets line B, and which way, on the range [lo, hi] of x.

    kind: 'overtakes' (A rises above B at x in range), 'falls_below' (A drops below B at x in
    range), 'above' / 'below' (A stays on one side over the whole range; x, if any, is where
    the extrapolated lines would meet), 'parallel'."""
    da, db = ab_a[0] - ab_b[0], ab_a[1] - ab_b[1]  # A - B = da + db x
    if db == 0:
        return {"kind": "parallel" if da == 0 else ("above" if da > 0 else "below"), "x": None}
    x = -da / db
    if lo <= x <= hi:
        return {"kind": "overtakes" if db > 0 else "falls_below", "x": x}
    diff_mid = da + db * (lo + hi) / 2  # the sign is the same all over the range
    return {"kind": "above" if diff_mid > 0 else "below", "x": x}


def crossover_bootstrap(fa: LineFit, fb: LineFit, lo: float, hi: float) -> dict:
    """The crossover of the fitted lines, plus its bootstrap distribution (replicates paired at
    random, the families being independent runs)."""
    point = crossover((fa.a, fa.b), (fb.a, fb.b), lo, hi)
    n = min(len(fa.boot), len(fb.boot))
    kinds, xs = [], []
    for (a1, b1), (a2, b2) in zip(fa.boot[:n], fb.boot[:n]):
        c = crossover((a1, b1), (a2, b2), lo, hi)
        kinds.append(c["kind"])
        if c["kind"] == "overtakes":
            xs.append(c["x"])
    share = {k: kinds.count(k) / n for k in sorted(set(kinds))} if n else {}
    return {**point, "range": [lo, hi], "bootstrap_kinds": share, "x_ci": interval(np.array(xs)),
            "bootstrap": n}


def crossover_text(c: dict, a: str, b: str) -> str:
    lo, hi = c["range"]
    shares = ", ".join(f"{k} {v:.0%}" for k, v in c["bootstrap_kinds"].items()) or "no bootstrap"
    at = f" (the lines would meet at 10^{c['x']:.2f})" if c["x"] is not None else ""
    if c["kind"] == "overtakes":
        lo_x, hi_x = c["x_ci"]
        return (f"{a} overtakes {b} at 10^{c['x']:.2f} FLOPs ({Z:.0%} CI 10^{lo_x:.2f} .. 10^{hi_x:.2f} among "
                f"replicates that cross upwards in range); bootstrap: {shares}")
    if c["kind"] == "falls_below":
        return f"{a} falls below {b} at 10^{c['x']:.2f} FLOPs; bootstrap: {shares}"
    side = {"above": "above", "below": "below", "parallel": "parallel to"}[c["kind"]]
    return (f"no crossover in range 10^{lo:.2f} .. 10^{hi:.2f}: {a} stays {side} {b}{at}; "
            f"bootstrap: {shares}")


# ---- rows -> arrays --------------------------------------------------------------------------------


def metric_of(row: dict, split: str, metric: str = "auc") -> float:
    return float(row[split][metric])


def by_family(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def allocation_table(rows: list[dict], split: str) -> list[dict]:
    """Table 3 form: per (family, width, length x layers) level with at least two (L, N_L)
    configurations, each one's AUC and the winner (selected on validation AUC, as a practitioner
    would; the winner on `split` is given too)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["n_layers"] is not None:
            groups.setdefault((r["model"], r["d_model"], r["seq_len"] * r["n_layers"]), []).append(r)
    table = []
    for (model, d, level), rs in sorted(groups.items()):
        if len({(r["seq_len"], r["n_layers"]) for r in rs}) < 2:
            continue
        rs = sorted(rs, key=lambda r: -r["seq_len"])
        table.append({
            "model": model, "d_model": d, "length_x_layers": level,
            "flops_paper": float(np.median([r["flops"]["paper"] for r in rs])),
            "configs": [{"L": r["seq_len"], "N_L": r["n_layers"], "auc": metric_of(r, split),
                         "valid_auc": metric_of(r, "valid")} for r in rs],
            "best_valid": max(rs, key=lambda r: metric_of(r, "valid"))["key"],
            "best": max(rs, key=lambda r: metric_of(r, split))["key"],
        })
    return table


# ---- plots and report ------------------------------------------------------------------------------

COLORS = {"climber": "C3", "transformer": "C0", "dlrm": "C2", "hstu": "C1", "din": "C4", "twin": "C5"}


def _plot_flops(fits: dict[str, LineFit], sat: dict, rows: dict, split: str, form: str, title: str, path: Path):
    plt = pyplot("climber scale fit's figures")

    xs = np.concatenate([f.x for f in fits.values()])
    grid = np.linspace(xs.min() - 0.1, xs.max() + 0.1, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, f in fits.items():
        c = COLORS.get(name, None)
        ax.scatter(f.x, f.y, color=c, s=22, zorder=3)
        lo, hi = f.band(grid)
        label = f"{name}: {f.a:.4f} + {f.b:.4f} log10 F" if not f.constant else f"{name}: {f.a:.4f} (one FLOPs value)"
        ax.plot(grid, f.predict(grid), color=c, label=label)
        if not np.isnan(lo).all():
            ax.fill_between(grid, lo, hi, color=c, alpha=0.15, lw=0)
        if sat.get(name):  # only over the family's own range: a saturating law extrapolates badly
            s, own = sat[name], np.linspace(f.x.min(), f.x.max(), 50)
            ax.plot(own, saturating(own, s["A"], s["B"], s["alpha"], s["ref_log10_flops"]), color=c, ls="--", lw=1)
        for r in rows[name]:
            tag = f"{r['seq_len']}x{r['n_layers']}" if r["n_layers"] is not None else f"{r['seq_len']}"
            ax.annotate(tag, (math.log10(r["flops"][form]), metric_of(r, split)), fontsize=6, alpha=0.7,
                        xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(f"log10 FLOPs per request ({form})")
    ax.set_ylabel(f"{split} AUC")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _plot_fig3(rows: list[dict], split: str, title: str, path: Path) -> None:
    """AUC vs layers, one line per length; AUC vs length, one line per layers (Fig. 3)."""
    plt = pyplot("climber scale fit's figures")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, other, ax, xlabel in (("seq_len", "n_layers", a1, "layers"), ("n_layers", "seq_len", a2, "length")):
        for v in sorted({r[key] for r in rows}):
            pts = sorted((r[other], metric_of(r, split)) for r in rows if r[key] == v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"length {v}" if key == "seq_len" else f"{v} layers")
        ax.set_xscale("log", base=2)
        xt = sorted({r[other] for r in rows})
        ax.set_xticks(xt, [str(t) for t in xt])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{split} AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _fmt_ci(ci: tuple[float, float], digits: int = 4) -> str:
    return "n/a" if math.isnan(ci[0]) else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fit_report(rows: list[dict], out_dir: Path, split: str = "test", form: str = "exact", n_boot: int = 2000,
               seed: int = 0) -> dict:
    """Fit, plot and write `report.md` + `fit.json` into `out_dir`; returns the fit summary."""
    pyplot("climber scale fit's figures")  # without matplotlib: say so before the bootstrap, not after
    datasets = {r["dataset"] for r in rows}
    if len(datasets) != 1:
        raise ValueError(f"rows must come from one data set, got {sorted(datasets)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = datasets.pop()
    dropped = [r["key"] for r in rows if r["flops"][form] <= 0]  # e.g. DLRM in the paper's form: 0
    fam = by_family([r for r in rows if r["flops"][form] > 0])
    fits = {m: fit_line([math.log10(r["flops"][form]) for r in rs], [metric_of(r, split) for r in rs], n_boot,
                        seed + i) for i, (m, rs) in enumerate(sorted(fam.items()))}
    sat = {m: fit_saturating(f.x, f.y) for m, f in fits.items()}
    crossings = {}
    for a in fits:
        for b in fits:
            if a != b and (a == "climber" or (a == "transformer" and b != "climber")):
                lo = min(fits[a].x.min(), fits[b].x.min())  # the union of the two families' ranges
                hi = max(fits[a].x.max(), fits[b].x.max())
                crossings[f"{a} vs {b}"] = crossover_bootstrap(fits[a], fits[b], lo, hi)
    comparison = None
    if "climber" in fits and "transformer" in fits:
        fc, ft = fits["climber"], fits["transformer"]
        n = min(len(fc.boot), len(ft.boot))
        ref = float(np.median(np.concatenate([fc.x, ft.x])))
        comparison = {"slope_diff": fc.b - ft.b, "slope_diff_ci": interval(fc.boot[:n, 1] - ft.boot[:n, 1]),
                      "ref_log10_flops": ref, "auc_diff_at_ref": float(fc.predict(ref) - ft.predict(ref)),
                      "auc_diff_at_ref_ci": interval((fc.boot[:n, 0] - ft.boot[:n, 0])
                                                     + (fc.boot[:n, 1] - ft.boot[:n, 1]) * ref)}
    alloc = allocation_table(rows, split)

    title = f"{dataset}: {split} AUC vs FLOPs per request ({len(rows)} runs)"
    _plot_flops(fits, sat, fam, split, form, title, out_dir / "auc_vs_flops.png")
    figs = ["auc_vs_flops.png"]
    for m, rs in sorted(by_family(rows).items()):
        if any(r["n_layers"] is not None for r in rs) and len({r["seq_len"] for r in rs}) > 1:
            for d in sorted({r["d_model"] for r in rs}):
                sub = [r for r in rs if r["d_model"] == d]
                name = f"{m}_d{d}_length_layers.png"
                _plot_fig3(sub, split, f"{dataset}: {m} (d={d}), {split} AUC vs layers and vs length", out_dir / name)
                figs.append(name)
    summary = {"dataset": dataset, "split": split, "flops_form": form, "runs": len(rows), "dropped": dropped,
               "fits": {m: f.summary() for m, f in fits.items()}, "saturating": sat, "crossovers": crossings,
               "climber_vs_transformer": comparison, "allocation": alloc, "figures": figs}
    (out_dir / "fit.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out_dir / "report.md").write_text(_markdown(rows, summary))
    return summary


def _markdown(rows: list[dict], s: dict) -> str:
    split, form = s["split"], s["flops_form"]
    out = [f"# Scaling fit: {s['dataset']} ({s['runs']} runs, {split} AUC, FLOPs per request in the {form} form)",
           "", "Generated by `climber scale fit`; bands and intervals are 95% residual-bootstrap intervals.", ""]
    if s["dropped"]:
        out += [f"Left out of the FLOPs fits (zero FLOPs in the {form} form): {', '.join(s['dropped'])}.", ""]
    out += ["## AUC = a + b log10(FLOPs)", "",
            "| model | runs | log10 FLOPs range | a | b (per decade) | b 95% CI | saturating A - B (F/F_ref)^-alpha |",
            "|---|---|---|---|---|---|---|"]
    for m, f in s["fits"].items():
        sat = s["saturating"].get(m)
        sat_s = (f"A={sat['A']:.4f}, B={sat['B']:.4f}, alpha={sat['alpha']:.3f}" if sat
                 else "not fitted (< 5 FLOPs values)" if f["distinct_flops"] < 5
                 else "not identified (no convergence, or a parameter at its bound)")
        b = "0 (one FLOPs value: constant)" if f["constant"] else f"{f['b']:.4f}"
        out.append(f"| {m} | {f['n']} | {f['log10_flops_range'][0]:.2f} .. {f['log10_flops_range'][1]:.2f} | "
                   f"{f['a']:.4f} | {b} | {_fmt_ci(f['b_ci'])} | {sat_s} |")
    c = s["climber_vs_transformer"]
    if c:
        out += ["", f"Climber minus Transformer: slope {c['slope_diff']:+.4f} per decade "
                f"(95% CI {_fmt_ci(c['slope_diff_ci'])}); AUC at 10^{c['ref_log10_flops']:.2f} FLOPs "
                f"{c['auc_diff_at_ref']:+.4f} (95% CI {_fmt_ci(c['auc_diff_at_ref_ci'])})."]
    if s["crossovers"]:
        out += ["", "## Crossovers", "", "Lines are compared over the union of the two families' FLOPs ranges; "
                "outside a family's own range (see the table above) its line is extrapolated.", ""]
        for name, cr in s["crossovers"].items():
            a, b = name.split(" vs ")
            out.append(f"- {crossover_text(cr, a, b)}")
    out += ["", "## Equal FLOPs: which (length x layers) wins (Table 3 form)", ""]
    if s["allocation"]:
        out += ["| model | d | length x layers | paper FLOPs | configs (L x N_L: " + split + " AUC / valid AUC) |"
                " best on valid | best on " + split + " |", "|---|---|---|---|---|---|---|"]
        for t in s["allocation"]:
            cfgs = "; ".join(f"{c['L']}x{c['N_L']}: {c['auc']:.4f} / {c['valid_auc']:.4f}" for c in t["configs"])
            out.append(f"| {t['model']} | {t['d_model']} | {t['length_x_layers']} | {t['flops_paper']:.3g} | {cfgs} | "
                       f"{t['best_valid']} | {t['best']} |")
    else:
        out.append("No FLOPs level has two (length, layers) configurations in this grid.")
    out += ["", "## Runs", "", "| run | params dense / embedding | FLOPs paper / exact | train FLOPs | epochs | "
            "wall s | valid AUC | test AUC | test LogLoss | popularity test AUC |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["flops"]["exact"])):
        p = r["params"]
        out.append(f"| {r['key']} | {p['dense']:,} / {p['embedding']:,} | {r['flops']['paper']:.3g} / "
                   f"{r['flops']['exact']:.3g} | {r['train_flops']:.3g} | {r['epochs_run']:.2f} | {r['wall_s']:.0f} | "
                   f"{r['valid']['auc']:.4f} | {r['test']['auc']:.4f} | {r['test']['logloss']:.4f} | "
                   f"{r['test_popularity']['auc']:.4f} |")
    out += ["", "## Figures", ""] + [f"![{f}]({f})" for f in s["figures"]]
    return "\n".join(out) + "\n"
