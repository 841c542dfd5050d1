"""Padding in training batches, with and without length bucketing. CPU only; no model runs.

For each prepared data set, the first `--batches` training batches of epoch 0 are built the
way `climber train` builds them (`SumiData.batch`: histories trimmed to the batch's longest,
candidates padded to its largest request), once from the shuffled order and once after
`SumiData.bucket_by_length` (`--bucket-window`). A batch costs, per block, B x (L + M) token
slots in the joint training pass: its matmuls scale with that count. We
report slots per request and the share of them that are real events or candidates.

    python benchmarks/bench_padding.py --data data/ml-100k data/lastfm ... [--seq-len 200]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from climber.data.sumi import SumiData


def measure(data: SumiData, order: np.ndarray, strategies: tuple[str, ...], seq_len: int, batch: int,
            n_batches: int) -> dict:
    slots = hist_valid = cand_valid = requests = 0
    for i in range(0, min(len(order), batch * n_batches), batch):
        b = data.batch(order[i : i + batch], strategies, seq_len)
        B, K, L = b["hist_mask"].shape
        M = b["cand_mask"].shape[1]
        slots += B * K * (L + M)
        hist_valid += int(b["hist_mask"].sum())
        cand_valid += K * int(b["cand_mask"].sum())  # every block sees each candidate
        requests += B
    return {"slots_per_request": slots / requests, "valid_share": (hist_valid + cand_valid) / slots}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="prepared data directories")
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=200, help="batches measured per data set")
    ap.add_argument("--bucket-window", type=int, default=50)
    ap.add_argument("--out", type=Path, help="write the JSON result here too")
    args = ap.parse_args()
    rows = []
    for path in args.data:
        data = SumiData(path)
        strategies = tuple(data.meta["strategies"])
        order = np.random.default_rng([0, 0]).permutation(data.requests("train"))
        bucketed = data.bucket_by_length(order, args.batch, args.bucket_window, args.seq_len,
                                         np.random.default_rng([0, 0, 1]))
        plain = measure(data, order, strategies, args.seq_len, args.batch, args.batches)
        buck = measure(data, bucketed, strategies, args.seq_len, args.batch, args.batches)
        rows.append({"data": data.meta["name"], "strategies": strategies, "plain": plain, "bucketed": buck,
                     "slot_ratio": buck["slots_per_request"] / plain["slots_per_request"]})
    print(f"{'data':10} {'slots/req plain':>16} {'valid':>6} {'slots/req bucketed':>19} {'valid':>6} {'ratio':>6}  "
          "strategies")
    for r in rows:
        p, b = r["plain"], r["bucketed"]
        print(f"{r['data']:10} {p['slots_per_request']:16.0f} {p['valid_share']:6.1%} {b['slots_per_request']:19.0f} "
              f"{b['valid_share']:6.1%} {r['slot_ratio']:6.2f}  {','.join(r['strategies'])}")
    result = {"name": "bench_padding", "command": "python " + " ".join(sys.argv), "seq_len": args.seq_len,
              "batch": args.batch, "batches": args.batches, "bucket_window": args.bucket_window, "results": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
