"""Load generator for the HTTP service (docs/paper.md section 3.2), on loopback.

Starts `python -m climber.serve` in a subprocess on a checkpoint (given, or a random model on a
synthetic prepared data set it builds), then for each concurrency level runs that many asyncio
clients (httpx) for a fixed time: each picks a random user, sometimes first posts a new event
for it (so the next score extends the cached history), then asks /score for M random raw item
ids. Reports throughput, p50/p99 latency through HTTP, status codes, the server's mean batch
size and cache outcomes (from /metrics). Client and server share the machine's cores.

    python -m benchmarks.bench_http --device cpu --quick

Prints a table, then one JSON line; writes benchmarks/results/http_<device>[_quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import environment, percentiles, table, write_results
from climber import checkpoint
from climber.config import ModelConfig
from climber.data.events import EventLog
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.model import Climber


def synthetic_checkpoint(root: Path, args: argparse.Namespace) -> Path:
    """A prepared synthetic log (users with about `seq_len` events each) and a random model on it."""
    g = np.random.default_rng(0)
    n = g.poisson(args.seq_len, args.users).clip(1)
    user = np.repeat(np.arange(args.users), n)
    time_ = np.concatenate([1_700_000_000 + np.cumsum(g.integers(1, 3600, k)) for k in n])
    log = EventLog("synthetic", user=user, item=g.integers(0, args.items, len(user)), time=time_,
                   labels=g.integers(0, 2, (len(user), 2)), tasks=("click", "like"),
                   action=g.integers(0, 3, len(user)), scenario=g.integers(0, 2, len(user)))
    prepare(log, root / "data", PrepareConfig(), ("recent", "pos:like", "recent@16"))
    data = SumiData(root / "data")
    torch.manual_seed(0)
    cfg = ModelConfig(**data.vocab, strategies=("recent", "pos:like", "recent@16"), seq_len=args.seq_len,
                      d_model=args.d_model, n_heads=args.heads, n_layers=args.layers, dropout=0.0)
    checkpoint.save(root / "ckpt", Climber(cfg), {"model": asdict(cfg), "data": str((root / "data").resolve())})
    return root / "ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_path: Path, threads: int = 0) -> tuple[subprocess.Popen, str]:
    """`climber.serve` with `args` (after --port) on a free loopback port, its output in `log_path`,
    `threads` torch threads if given -> (the process, its URL) once /readyz answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "climber.serve", "--port", str(port), *args], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.2)


def scrape(url: str) -> dict[str, float]:
    """Counters of interest from /metrics: batch count and sum, cache outcomes."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name in ("climber_batch_requests_count", "climber_batch_requests_sum"):
                out[s.name] = s.value
            elif s.name == "climber_cache_events_total":
                out[s.labels["kind"]] = s.value
    return out


async def load(url: str, args: argparse.Namespace, concurrency: int, seconds: float, items: np.ndarray,
               users: np.ndarray, clock: dict[int, int]) -> tuple[list[float], Counter]:
    """`concurrency` clients for `seconds`: (score latencies in ms, status codes)."""
    lat: list[float] = []
    codes: Counter = Counter()
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(seed: int, c: httpx.AsyncClient) -> None:
        g = np.random.default_rng(seed)
        while time.perf_counter() < stop:
            u = int(users[g.integers(len(users))])
            if g.random() < args.event_rate:  # one new event: the next score extends the cache
                clock[u] += 1
                ev = {"item": int(g.choice(items)), "time": clock[u], "labels": {"like": int(g.random() < .5)}}
                r = await c.post("/events", json={"user": u, "events": [ev]})
                if r.status_code != 200:
                    codes[f"events {r.status_code}"] += 1
            body = {"user": u, "candidates": g.choice(items, args.candidates).tolist(), "req_time": clock[u] + 60}
            t0 = time.perf_counter()
            r = await c.post("/score", json=body)
            lat.append((time.perf_counter() - t0) * 1e3)
            codes[r.status_code] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        await asyncio.gather(*(client(i + 1000 * concurrency, c) for i in range(concurrency)))
    return lat, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="small model, two load levels, about 30 s")
    ap.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead of a synthetic one")
    ap.add_argument("--concurrency", type=int, nargs="+")
    ap.add_argument("--seconds", type=float, help="measured time per concurrency level")
    ap.add_argument("--candidates", type=int, help="candidates per /score request")
    ap.add_argument("--event-rate", type=float, default=0.1, help="share of requests preceded by a new event")
    ap.add_argument("--users", type=int)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, help="torch threads in the server (CPU)")
    args = ap.parse_args()
    defaults = {"concurrency": ([1, 8], [1, 8, 32, 64]), "seconds": (6.0, 20.0), "candidates": (100, 500),
                "users": (50, 2000), "seq_len": (200, 800), "d_model": (64, 256), "heads": (2, 4), "layers": (2, 12)}
    for k, (quick, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or synthetic_checkpoint(Path(tmp), args)
        config = checkpoint.read_config(ckpt)
        data = SumiData(Path(config["data"]))
        items, users = np.asarray(data.a["item_vocab"]), np.asarray(data.a["user_vocab"])
        clock = {int(u): int(data.a["ev_time"].max()) + 1 for u in users}  # events after everything stored
        server, url = start_server(["--checkpoint", str(ckpt), "--store", ":memory:", "--device", args.device,
                                    "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                                    "--max-candidates", str(max(1000, args.candidates))],
                                   Path(tmp) / "server.log", args.threads)
        try:
            rows = []
            for conc in args.concurrency:
                asyncio.run(load(url, args, conc, 1.0, items, users, clock))  # warm-up, not recorded
                before = scrape(url)
                lat, codes = asyncio.run(load(url, args, conc, args.seconds, items, users, clock))
                after = scrape(url)
                delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                calls = max(delta["climber_batch_requests_count"], 1)
                rows.append({"concurrency": conc, "requests": len(lat), "req_per_s": len(lat) / args.seconds,
                             "cand_per_s": len(lat) * args.candidates / args.seconds, **percentiles(lat),
                             "status": {str(k): v for k, v in codes.items()},
                             "mean_batch": delta["climber_batch_requests_sum"] / calls,
                             "cache": {k: delta.get(k, 0.0) for k in ("hit", "miss", "extend", "recompute")}})
                print(f"  concurrency {conc}: {rows[-1]['req_per_s']:.0f} req/s, p99 {rows[-1]['p99_ms']:.1f} ms",
                      flush=True)
        finally:
            server.terminate()
            server.wait(30)

    print(table(rows, [("concurrency", "clients", "d"), ("req_per_s", "req/s", ".1f"),
                       ("cand_per_s", "cand/s", ".0f"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
                       ("mean_batch", "batch", ".2f")]))
    print(f"M={args.candidates} candidates per request; {args.event_rate:.0%} of requests follow a new event")
    summary = {"benchmark": "http", "env": environment(args.device), "candidates": args.candidates,
               "model": {k: config["model"][k] for k in ("seq_len", "d_model", "n_heads", "n_layers", "strategies")},
               "checkpoint": str(args.checkpoint) if args.checkpoint else "synthetic",
               "server": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "threads": args.threads},
               "rows": rows}
    path = write_results(f"http_{args.device}{'_quick' if args.quick else ''}", "benchmarks.bench_http", summary)
    print(json.dumps(summary))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
