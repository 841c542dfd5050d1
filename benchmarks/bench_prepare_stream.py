"""Out-of-core prepare at scale, CPU (climber/data/stream.py; issue 22 item 3): write a synthetic
day-partitioned log as Parquet in chunks (never whole in memory), then run `climber prepare
--stream` on it in a child process and report events/s and the child's peak RSS. Prints a table,
then one JSON line.

    python -m benchmarks.bench_prepare_stream --events 10000000 --work /tmp/stream-bench

The log: `--days` Parquet files, each a day of events of random users (so every user's events are
spread over every file, as in a production log partitioned by date), Zipf item popularity, two
tasks (click, like), three scenarios, times increasing within a day. SYNTHETIC: it measures the
pipeline's speed and memory, not anything about users. `--in-memory` also runs the plain prepare
on the same files, for its peak RSS (and checks that both fingerprints agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import table

DAY = 86_400
FLAGS = ["--user", "user_id", "--item", "item_id", "--time", "ts", "--labels", "click", "like",
         "--scenario", "tab", "--request-gap", "60"]


def write_log(root: Path, events: int, users: int, items: int, days: int, seed: int = 0) -> None:
    """`days` Parquet files of events // days rows each, written one at a time."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_day = events // days
    for d in range(days):
        user = rng.integers(0, users, per_day) * 7919 % (users * 10)  # sparse raw ids
        item = (rng.zipf(1.2, per_day) - 1) % items
        click = rng.random(per_day) < 0.3
        ts = 1_600_000_000 + d * DAY + np.sort(rng.integers(0, DAY, per_day))
        t = pa.table({"user_id": user, "item_id": item, "ts": ts,
                      "click": click.astype(np.int8), "like": (click & (rng.random(per_day) < 0.3)).astype(np.int8),
                      "tab": rng.integers(0, 3, per_day)})
        pq.write_table(t, root / f"day={d:04d}.parquet", row_group_size=1 << 20)


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in GiB of the child (ru_maxrss of the children waited for so far:
    the benchmark runs one child at a time and this process itself is not counted), its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before and before:
        print("warning: the child's peak did not exceed an earlier child's; RSS below is that earlier maximum")
    return wall, peak / 2**20, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, help="default: events // 100")
    ap.add_argument("--items", type=int, help="default: events // 100")
    ap.add_argument("--days", type=int, help="Parquet files (default: one per 2M events, at least 4)")
    ap.add_argument("--memory-limit", type=float, default=2.0, help="GiB, climber prepare --memory-limit")
    ap.add_argument("--work", type=Path, default=Path("/tmp/climber-stream-bench"))
    ap.add_argument("--in-memory", action="store_true", help="also run the in-memory prepare")
    ap.add_argument("--keep", action="store_true", help="keep the log and the prepared data")
    args = ap.parse_args()
    users, items = args.users or args.events // 100, args.items or args.events // 100
    days = args.days or max(4, args.events // 2_000_000)
    if args.work.exists():
        shutil.rmtree(args.work)
    t0 = time.perf_counter()
    write_log(args.work / "log", args.events, users, items, days)
    t_write = time.perf_counter() - t0
    log_bytes = sum(p.stat().st_size for p in (args.work / "log").iterdir())

    climber = [sys.executable, "-m", "climber", "prepare", str(args.work / "log"), *FLAGS]
    rows = []
    for mode in ("stream", "in-memory") if args.in_memory else ("stream",):
        out_dir = args.work / mode
        extra = ["--stream", "--memory-limit", str(args.memory_limit)] if mode == "stream" else []
        wall, peak, out = run([*climber, "--out", str(out_dir), *extra])
        meta = json.loads((out_dir / "meta.json").read_text())
        n = meta["counts"]["events"]
        rows.append({"mode": mode, "events": n, "seconds": wall, "events_per_s": n / wall, "peak_rss_gib": peak,
                     "bytes_per_event": peak * 2**30 / n, "fingerprint": meta["fingerprint"],
                     "prepared_gib": sum(p.stat().st_size for p in out_dir.iterdir()) / 2**30})
        print(out.strip())
    print(table(rows, [("mode", "prepare", ""), ("events", "events", ","), ("seconds", "s", ".1f"),
                       ("events_per_s", "events/s", ",.0f"), ("peak_rss_gib", "peak RSS GiB", ".2f"),
                       ("bytes_per_event", "B/event", ".0f"), ("fingerprint", "fingerprint", "")]))
    if not args.keep:
        shutil.rmtree(args.work)
    print(json.dumps({"rows": rows, "log": {"events": args.events, "users": users, "items": items, "days": days,
                                            "parquet_gib": log_bytes / 2**30, "write_s": t_write},
                      "memory_limit_gib": args.memory_limit, "cpu": platform.processor() or platform.machine(),
                      "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                      "pyarrow": pa.__version__, "same_fingerprint": len({r["fingerprint"] for r in rows}) == 1}))


if __name__ == "__main__":
    main()
