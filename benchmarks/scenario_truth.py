"""How much can per-scenario adaptation gain on the synthetic scenario sets? A bound from the truth.

SYNTHETIC DATA (climber/data/synthetic.py). The generator knows each event's label model, so
instead of training networks this scores the test requests with label models that differ only
in how they may depend on the scenario, each fitted by logistic regression on the earlier
requests of the same log. Requests are grouped as `climber prepare synthetic` groups them (a
user's events in one scenario at most 60 s apart, at most 20 a request); the test requests are
each user's last `--eval-requests`, as in the prepared data.

A ranking model scores a request's candidates together, from the history before the request
(SUMI): likes among the request's own earlier candidates are not known to it. So the features
come in two versions: as the label model read them (`truth`), and as known when the request is
scored (`at request time`: the long and short topic memories from the events before the
request, decayed to the candidate's position, so the likes inside the request are missing).
The current interest z, which a model must infer from the history, is given to every label
model: the bound isolates how the history is read, not how hard z is to learn.

- `truth`: the generator's own logits (the ceiling of any model, with information no ranking
  model has).
- `per-scenario`: click and like | click refitted at request time with their own weights per
  scenario on (z, log1p long memory, log1p short memory, quality) plus a scenario offset: what
  a model with a scenario axis can express.
- `shared`: the same features with ONE set of weights for all scenarios, scenario offsets kept:
  the `climber-shared-tau` analogue, where the history is read the same way in every scenario.
- `no-short-memory`: shared weights without the short memory: blind to recency altogether.

Share keeps its true logit in every model (it does not read the history). Task scores are
marginal probabilities (click; click * like; click * like * share), ranked by AUC per task, the
mean over tasks as `climber compare` reports it. per-scenario - shared bounds what the scenario
axis can add to a model that reads the history at request time perfectly.

    python -m benchmarks.scenario_truth --out benchmarks/results/scenarios/synthetic-recency3/truth.json

With `--data` (the prepared set of the same log) and `--checkpoints`, it also asks what trained
Climbers read: each checkpoint scores the test requests through the serving engine (history: the
user's events before the request, as in testing), and its click logit is regressed per scenario
on the label model's inputs at request time (z, long memory, short memory, quality). The short
memory's coefficient is what the model learned of it: the truth is 0 / +c / -c (feed, search,
daily mix) times `--scenario-contrast` c, plus the like label's share.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from climber.data.sumi import SumiData, _group_requests
from climber.data.synthetic import PREPARE, SCENARIOS, TASKS, SyntheticConfig, label_truth, true_logits
from climber.metrics import auc

FEATURES = ("z", "memory", "recent", "quality")


def fit_logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights w minimising the mean log loss of sigmoid(x @ w) (x holds its own bias columns)."""

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        p = 1.0 / (1.0 + np.exp(-z))
        return float(np.mean(np.logaddexp(0.0, z) - y * z)), x.T @ (p - y) / len(y)

    return minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x


def memory_at_request(t: dict, start: np.ndarray, half_life: float) -> np.ndarray:
    """log1p of each event's same-topic memory of likes as known when its request is scored: the
    generator's recursion (at each event the memory decays by 2^(-1/half_life) and is read, then a
    like adds 1) over the events before the request, decayed on to the event's position in it.
    At a request's first event it is the generator's own value."""
    user, topic, like = t["user"], t["topic"], t["labels"][:, 1].astype(bool)
    d = 2.0 ** (-1.0 / half_life)
    out = np.empty(len(user))
    K = int(topic.max()) + 1
    for first, last in zip(*_user_bounds(user)):
        mem, snap, offset = np.zeros(K), None, 0
        for i in range(first, last):
            if start[i]:
                snap, offset = mem.copy(), 0
            out[i] = snap[topic[i]] * d ** (offset + 1)
            mem *= d
            mem[topic[i]] += like[i]
            offset += 1
    return np.log1p(out)


def _user_bounds(user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = np.flatnonzero(np.diff(user)) + 1
    return np.r_[0, edges], np.r_[edges, len(user)]


def design(t: dict, features: tuple[str, ...], per_scenario: bool) -> np.ndarray:
    """Columns: the features (times one-hot scenario where per_scenario), then one-hot scenario."""
    onehot = np.eye(len(SCENARIOS))[t["scenario"]]
    cols = [t[f] for f in features]
    if per_scenario:
        cols = [c * onehot[:, j] for c in cols for j in range(len(SCENARIOS))]
    return np.column_stack(cols + [onehot])


def read_by_checkpoint(ckpt: Path, data_dir: Path, known: dict, rows: np.ndarray) -> dict[str, dict[str, float]]:
    """Per scenario, least-squares coefficients of the checkpoint's click logit on the known
    inputs over the test candidates `rows` (indices into the log, which the prepared data keeps
    in the same order)."""
    from climber.data.sumi import SPLITS
    from climber.serve.engine import Engine, ScoreRequest
    from climber.serve.store import History

    data, engine = SumiData(data_dir), Engine.from_checkpoint(ckpt, device="cpu")
    a = data.a
    test = np.flatnonzero(np.asarray(a["req_split"]) == SPLITS["test"])
    starts, offsets = np.asarray(a["req_cand_start"]), np.asarray(a["user_offsets"])
    logit = np.full(len(known["z"]), np.nan)
    for r in test:
        u, lo, hi = int(a["req_user"][r]), int(starts[r]), int(starts[r + 1])
        ev = slice(int(offsets[u]), int(a["req_hist_end"][r]))
        hist = History(*(np.asarray(a[k][ev], np.int64) for k in ("ev_item", "ev_time", "ev_action",
                                                                   "ev_scenario", "ev_labels")))
        res = engine.score_requests([ScoreRequest(np.asarray(a["cand_item"][lo:hi], np.int64),
                                                  int(a["req_scenario"][r]), int(a["req_time"][r]), None, hist)])
        p = np.clip(res[0].probs[:, 0], 1e-6, 1 - 1e-6)
        logit[lo:hi] = np.log(p / (1 - p))
    return reads(logit, known, rows & np.isfinite(logit))


def reads(logit: np.ndarray, known: dict, rows: np.ndarray) -> dict[str, dict[str, float]]:
    """Per scenario, the least-squares coefficients of `logit` on the known inputs (`FEATURES` and
    a constant) over `rows`: what a click logit reads of each input."""
    out = {}
    for j, name in enumerate(SCENARIOS):
        m = rows & (known["scenario"] == j)
        x = np.column_stack([known[f][m] for f in FEATURES] + [np.ones(m.sum())])
        out[name] = dict(zip(FEATURES, map(float, np.linalg.lstsq(x, logit[m], rcond=None)[0])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--events-per-user", type=int, default=150)
    ap.add_argument("--scenario-recency", type=float, default=3.0)
    ap.add_argument("--scenario-contrast", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-requests", type=int, default=3, help="each user's last requests are the test requests")
    ap.add_argument("--data", type=Path, help="the prepared data of this log (for --checkpoints)")
    ap.add_argument("--checkpoints", type=Path, nargs="*", default=[],
                    help="Climber checkpoints trained on --data: what their click logit reads")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    cfg = SyntheticConfig(users=a.users, events_per_user=a.events_per_user, scenario_recency=a.scenario_recency,
                          scenario_contrast=a.scenario_contrast, seed=a.seed)
    t = label_truth(cfg)
    user, labels, scen = t["user"], t["labels"].astype(np.float64), t["scenario"]
    start = _group_requests(user, t["time"], scen, PREPARE)
    req = np.cumsum(start) - 1
    last_req = np.maximum.reduceat(req, _user_bounds(user)[0])  # each user's last request
    ev = req > np.repeat(last_req, np.bincount(user)) - a.eval_requests
    logits = true_logits(cfg, t)
    known = {**t, "recent": memory_at_request(t, start, cfg.short_half_life),
             "memory": memory_at_request(t, start, cfg.memory_half_life)}
    for name in ("recent", "memory"):  # the recursion is the generator's: equal where nothing is missing yet
        if not np.allclose(known[name][start], t[name][start], atol=1e-9):
            raise AssertionError(f"memory_at_request disagrees with the generator's {name} at request starts")
    fits = (~ev, ~ev & (labels[:, 0] == 1))  # click on the earlier requests, like | click on their clicks

    models = {"truth": logits}
    for name, feats, per in (("per-scenario", FEATURES, True), ("shared", FEATURES, False),
                             ("no-short-memory", ("z", "memory", "quality"), False)):
        x = design(known, feats, per)
        models[name] = logits.copy()
        for task, rows in enumerate(fits):
            models[name][:, task] = x @ fit_logistic(x[rows], labels[rows, task])

    report = {"dataset": "synthetic (climber.data.synthetic)", "config": asdict(cfg),
              "eval": {"requests_per_user": a.eval_requests, "events": int(ev.sum())},
              "fit_events": {"click": int(fits[0].sum()), "like": int(fits[1].sum())},
              "short_memory_known_at_request_time": float(np.mean(np.expm1(known["recent"][ev]))
                                                          / max(np.mean(np.expm1(t["recent"][ev])), 1e-12)),
              "models": {}}
    for name, lg in models.items():
        probs = np.cumprod(1.0 / (1.0 + np.exp(-lg)), axis=1)  # click, click * like, click * like * share
        per_task = {task: auc(labels[ev, i], probs[ev, i]) for i, task in enumerate(TASKS)}
        per_scen = {SCENARIOS[j]: float(np.mean([auc(labels[ev & (scen == j), i], probs[ev & (scen == j), i])
                                                 for i in range(len(TASKS))])) for j in range(len(SCENARIOS))}
        report["models"][name] = {"auc": float(np.mean(list(per_task.values()))), "auc_per_task": per_task,
                                  "auc_per_scenario": per_scen}
    m = report["models"]
    report["gap_per_scenario_minus_shared"] = m["per-scenario"]["auc"] - m["shared"]["auc"]
    report["gap_shared_minus_no_short_memory"] = m["shared"]["auc"] - m["no-short-memory"]["auc"]
    report["gap_truth_minus_per_scenario"] = m["truth"]["auc"] - m["per-scenario"]["auc"]
    report["click_logit_reads"] = {"truth": reads(logits[:, 0], known, ev)}  # the label model's own, at request time
    if a.checkpoints:
        if a.data is None:
            ap.error("--checkpoints needs --data")
        if not np.array_equal(np.asarray(SumiData(a.data).a["cand_labels"]), t["labels"]):
            raise SystemExit(f"{a.data}: not the prepared data of this log (its candidates differ)")
        for ckpt in a.checkpoints:
            report["click_logit_reads"][str(ckpt)] = read_by_checkpoint(ckpt, a.data, known, ev)
        for who, per in report["click_logit_reads"].items():
            print("click logit per unit of log1p short memory (feed / search / daily mix): "
                  + " / ".join(f"{per[s]['recent']:+.2f}" for s in SCENARIOS) + f"  {who}")
    report["versions"] = {"python": platform.python_version(), "numpy": np.__version__}
    report["command"] = (f"python -m benchmarks.scenario_truth --users {a.users} --events-per-user {a.events_per_user}"
                         f" --scenario-recency {a.scenario_recency:g} --scenario-contrast {a.scenario_contrast:g}"
                         f" --seed {a.seed} --eval-requests {a.eval_requests}"
                         + (f" --data {a.data} --checkpoints {' '.join(map(str, a.checkpoints))}"
                            if a.checkpoints else ""))
    print(f"{'model':<16} {'AUC':>7}  " + "  ".join(f"{s:>9}" for s in SCENARIOS) + "  " +
          "  ".join(f"{x:>7}" for x in TASKS))
    for name, r in m.items():
        print(f"{name:<16} {r['auc']:.4f}  " + "  ".join(f"{r['auc_per_scenario'][s]:9.4f}" for s in SCENARIOS)
              + "  " + "  ".join(f"{r['auc_per_task'][x]:.4f}" for x in TASKS))
    print(f"per-scenario - shared {report['gap_per_scenario_minus_shared']:+.4f}; shared - no short memory "
          f"{report['gap_shared_minus_no_short_memory']:+.4f}; truth - per-scenario "
          f"{report['gap_truth_minus_per_scenario']:+.4f} (the request's own likes); short memory known at "
          f"request time: {report['short_memory_known_at_request_time']:.0%}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
