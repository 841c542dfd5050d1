"""How much can per-scenario adaptation gain on the synthetic scenario set? A bound from the truth.

SYNTHETIC DATA (climber/data/synthetic.py). The generator knows each event's label model, so
instead of training networks this scores the evaluation events with label models that differ
only in how they may depend on the scenario, each fitted by logistic regression on the earlier
events of the same log:

- `truth`: the generator's own logits (the ceiling of any model).
- `per-scenario`: click and like | click refitted with their own weights per scenario on
  (current interest, log1p long memory, log1p short memory, quality) plus a scenario offset:
  what a model with a scenario axis can express (a check: it should sit on the truth).
- `shared`: the same features with ONE set of weights for all scenarios, scenario offsets kept:
  the `climber-shared-tau` analogue, where the history is read the same way in every scenario.
- `no-short-memory`: shared weights without the short memory: blind to recency altogether.

Share keeps its true logit in every model (it does not read the history), and the task scores
are marginal probabilities (click; click * like; click * like * share), ranked by AUC per task
over each user's last `--eval-events` events,
the mean over tasks as `climber compare` reports it. The gap truth - shared bounds what the
scenario axis can add when the history's summary is known exactly; a trained network must also
learn that summary, so its gap can only be smaller or lost in seed noise.

    python -m benchmarks.scenario_truth --out benchmarks/results/scenarios/synthetic-recency3/truth.json
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from climber.data.synthetic import SCENARIOS, TASKS, SyntheticConfig, label_truth, true_logits
from climber.metrics import auc

FEATURES = ("z", "memory", "recent", "quality")


def fit_logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights w (with the last column of x the bias's ones) minimising the mean log loss."""

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        p = 1.0 / (1.0 + np.exp(-z))
        nll = np.mean(np.logaddexp(0.0, z) - y * z)
        return nll, x.T @ (p - y) / len(y)

    return minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x


def design(t: dict, rows: np.ndarray, features: tuple[str, ...], per_scenario: bool) -> np.ndarray:
    """Columns: the features (times one-hot scenario where per_scenario), then one-hot scenario."""
    s = t["scenario"][rows]
    onehot = np.eye(len(SCENARIOS))[s]
    cols = [t[f][rows] for f in features]
    if per_scenario:
        cols = [c * onehot[:, j] for c in cols for j in range(len(SCENARIOS))]
    return np.column_stack(cols + [onehot])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--events-per-user", type=int, default=150)
    ap.add_argument("--scenario-recency", type=float, default=3.0)
    ap.add_argument("--scenario-contrast", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-events", type=int, default=21, help="each user's last events scored (3 requests of ~7)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    cfg = SyntheticConfig(users=a.users, events_per_user=a.events_per_user, scenario_recency=a.scenario_recency,
                          scenario_contrast=a.scenario_contrast, seed=a.seed)
    t = label_truth(cfg)
    user, labels, scen = t["user"], t["labels"].astype(np.float64), t["scenario"]
    n = len(user)
    last = np.r_[np.flatnonzero(np.diff(user)), n - 1]  # each user's last event
    rank_from_end = np.repeat(last, np.bincount(user)) - np.arange(n)
    ev = rank_from_end < a.eval_events
    fits = (~ev, ~ev & (labels[:, 0] == 1))  # click on the earlier events, like | click on their clicks
    logits = true_logits(cfg, t)

    models = {"truth": logits}
    for name, feats, per in (("per-scenario", FEATURES, True), ("shared", FEATURES, False),
                             ("no-short-memory", ("z", "memory", "quality"), False)):
        x = design(t, np.arange(n), feats, per)
        models[name] = logits.copy()
        for task, rows in enumerate(fits):
            models[name][:, task] = x @ fit_logistic(x[rows], labels[rows, task])

    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    report = {"dataset": "synthetic (climber.data.synthetic)", "config": asdict(cfg), "eval_events": int(ev.sum()),
              "fit_events": {"click": int(fits[0].sum()), "like": int(fits[1].sum())}, "models": {}}
    for name, lg in models.items():
        probs = np.cumprod(sig(lg), axis=1)  # click, click * like, click * like * share

        per_task = {task: auc(labels[ev, i], probs[ev, i]) for i, task in enumerate(TASKS)}
        per_scen = {SCENARIOS[j]: float(np.mean([auc(labels[ev & (scen == j), i], probs[ev & (scen == j), i])
                                                 for i in range(len(TASKS))])) for j in range(len(SCENARIOS))}
        report["models"][name] = {"auc": float(np.mean(list(per_task.values()))), "auc_per_task": per_task,
                                  "auc_per_scenario": per_scen}
    m = report["models"]
    report["gap_truth_minus_shared"] = m["truth"]["auc"] - m["shared"]["auc"]
    report["gap_per_scenario_minus_shared"] = m["per-scenario"]["auc"] - m["shared"]["auc"]
    report["gap_shared_minus_no_short_memory"] = m["shared"]["auc"] - m["no-short-memory"]["auc"]
    report["versions"] = {"python": platform.python_version(), "numpy": np.__version__}
    report["command"] = (f"python -m benchmarks.scenario_truth --users {a.users} --events-per-user {a.events_per_user}"
                         f" --scenario-recency {a.scenario_recency:g} --scenario-contrast {a.scenario_contrast:g}"
                         f" --seed {a.seed} --eval-events {a.eval_events}")
    print(f"{'model':<16} {'AUC':>7}  " + "  ".join(f"{s:>9}" for s in SCENARIOS) + "  " +
          "  ".join(f"{x:>7}" for x in TASKS))
    for name, r in m.items():
        print(f"{name:<16} {r['auc']:.4f}  " + "  ".join(f"{r['auc_per_scenario'][s]:9.4f}" for s in SCENARIOS)
              + "  " + "  ".join(f"{r['auc_per_task'][x]:.4f}" for x in TASKS))
    print(f"truth - shared {report['gap_truth_minus_shared']:+.4f}; per-scenario - shared "
          f"{report['gap_per_scenario_minus_shared']:+.4f}; shared - no short memory "
          f"{report['gap_shared_minus_no_short_memory']:+.4f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
