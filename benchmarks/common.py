"""Shared by the benchmarks (docs/paper.md section 3.2): percentiles, the environment record and the
results file that README numbers are quoted from."""

from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def freeze_heap() -> None:
    """A load generator's own full garbage collections would stall its clients (as the server's
    did): what is alive once it is set up goes out of the collector's sight."""
    gc.collect()
    gc.freeze()


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(ms)}


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write_results(name: str, module: str, payload: dict, directory: Path = RESULTS) -> Path:
    """<directory>/<name>.json (default benchmarks/results/) with the exact command (`python -m <module> ...`)
    that produced it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"command": " ".join(shlex.quote(a) for a in ["python", "-m", module, *sys.argv[1:]]), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table; cols are (key, header, format), missing values print as '-'."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for k, _, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
