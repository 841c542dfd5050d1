"""Data-side speed at scale, CPU: GAUC (vectorised vs the per-user loop, `climber/metrics.py`) and
`prepare`'s negative sampling on a synthetic implicit log (docs/paper.md section 3.1: each positive
plus sampled unseen items). Prints a table, then one JSON line.

    python -m benchmarks.bench_data [--events 1000000] [--users 100000] [--items 50000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from benchmarks.common import table
from climber.data.sumi import FIRST_ITEM, PrepareConfig, _sample_negatives
from climber.metrics import gauc, gauc_reference


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="implicit events (each one request, 4 negatives)")
    ap.add_argument("--users", type=int, default=100_000, help="users, for both")
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--per-user", type=int, default=20, help="GAUC samples per user")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []

    users = rng.permutation(np.repeat(np.arange(args.users), args.per_user))
    labels = rng.integers(0, 2, len(users))
    scores = np.round(rng.random(len(users)), 3)  # ties
    fast, t_fast = timed(gauc, users, labels, scores)
    ref, t_ref = timed(gauc_reference, users, labels, scores)
    rows.append({"what": f"GAUC, {args.users} users x {args.per_user}", "loop_s": t_ref, "vectorised_s": t_fast,
                 "same": abs(fast - ref) < 1e-12})

    # prepare's inputs for a LastFM-like log: events sorted by user, every event its own request
    user = np.sort(rng.integers(1, args.users + 1, args.events))
    item = rng.integers(FIRST_ITEM, args.items + FIRST_ITEM, args.events)
    starts = np.arange(args.events)
    cfg = PrepareConfig(request_gap=0, max_candidates=1, negatives=4)
    (cand, labels, count), t = timed(_sample_negatives, item, user, user, starts, starts + 1, cfg,
                                     args.items + FIRST_ITEM, 1)
    neg = labels[:, 0] == 0
    key = np.repeat(user, count)[neg] * (args.items + FIRST_ITEM) + cand[neg]
    seen = np.unique(user * (args.items + FIRST_ITEM) + item)
    rows.append({"what": f"prepare's negatives, {args.events} events", "vectorised_s": t,
                 "same": not np.isin(key, seen).any()})  # "same": every negative is unseen by its user

    print(table(rows, [("what", "what", ""), ("loop_s", "loop s", ".2f"), ("vectorised_s", "vectorised s", ".2f"),
                       ("same", "checked", "")]))
    print(json.dumps({"rows": rows, "cpu": platform.processor() or platform.machine(), "numpy": np.__version__}))


if __name__ == "__main__":
    main()
