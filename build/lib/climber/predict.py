"""Batch prediction (`climber predict`): score a file of (user, item[, time, scenario]) rows with a
checkpoint, through the serving engine (`climber/serve/engine.py`, docs/paper.md section 3.2),
so a file and an HTTP /score request give the same probabilities.

Rows that share (user, time, scenario) form one request: the user's history is prefilled once
(the prepared data's events for that user, used whole, as the engine does) and all its items are
scored against it; `batch_size` requests of several users go through the model at once. Ids are
raw; unknown items are scored as the unknown item (dense id 1) and unknown users get an empty
history and no user features, exactly as /score. A missing `time` is now (as /score), a missing
`scenario` is 0. Output rows keep the input's order: user, item, the time and scenario columns
if given, then one probability column per task.
"""

from __future__ import annotations

import os
import time as clock
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from climber.data.readers import read_requests
from climber.serve.engine import Engine, ScoreRequest

OUTPUT_SUFFIXES = (".csv", ".parquet")


def predict_file(ckpt_dir: Path, requests: Path, out: Path, data_dir: Path | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 256) -> dict:
    """Score every row of `requests` and write `out` (.csv or .parquet); returns counts."""
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{out}: the output must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    engine = Engine.from_checkpoint(ckpt_dir, data_dir, device, dtype)
    r = read_requests(requests, engine.cfg.n_scenarios)
    n = len(r["user"])
    when = r["time"] if r["time"] is not None else np.full(n, int(clock.time()), np.int64)
    scenario = r["scenario"] if r["scenario"] is not None else np.zeros(n, np.int64)
    items, unknown = engine.item_ids(r["item"])

    # one request per distinct (user, time, scenario); its rows in file order
    _, group = np.unique(np.stack([r["user"], when, scenario], 1), axis=0, return_inverse=True)
    rows = np.argsort(group.reshape(-1), kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group.reshape(-1)[rows]) != 0])
    per_request = np.split(rows, starts[1:])
    probs = np.empty((n, len(engine.cfg.tasks)), np.float32)
    for i in range(0, len(per_request), batch_size):
        chunk = per_request[i:i + batch_size]
        batch = [ScoreRequest(items[j], int(scenario[j[0]]), int(when[j[0]]), int(r["user"][j[0]])) for j in chunk]
        for j, res in zip(chunk, engine.score_requests(batch), strict=True):
            probs[j] = res.probs

    cols = {"user": r["user"], "item": r["item"]}
    cols |= {c: r[c] for c in ("time", "scenario") if r[c] is not None}
    clash = set(cols) & set(engine.cfg.tasks)
    if clash:
        raise ValueError(f"task name(s) {sorted(clash)} clash with the output's id columns")
    table = pa.table(cols | {t: probs[:, k] for k, t in enumerate(engine.cfg.tasks)})
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        pacsv.write_csv(table, tmp)
    else:
        pq.write_table(table, tmp)
    os.replace(tmp, out)  # a killed run never leaves half an output file
    return {"rows": n, "requests": len(per_request), "unknown_items": int(unknown.sum()),
            "unknown_users": int(len(np.setdiff1d(r["user"], engine.user_vocab))), "cache": dict(engine.stats)}
