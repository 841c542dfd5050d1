"""Merge `climber compare` reports of one protocol into one table (`climber.compare.merge`): rows
trained in separate calls, e.g. the attention models on a GPU and the cheap baselines on a CPU.

    python -m benchmarks.merge_compare A/compare.json B/compare.json ... --out DIR

writes DIR/compare.{json,md} (DIR may be one of the inputs' folders) and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from climber.compare import merge, to_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", type=Path, nargs="+", help="compare.json files of one protocol")
    ap.add_argument("--out", type=Path, required=True, help="directory for the merged compare.{json,md}")
    args = ap.parse_args()
    report = merge([json.loads(p.read_text()) for p in args.reports])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    md = to_markdown(report)
    (args.out / "compare.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
