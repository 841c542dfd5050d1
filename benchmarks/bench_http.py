"""Load generator for the HTTP service (docs/paper.md section 3.2), on loopback.

Starts `python -m climber.serve` in a subprocess on a checkpoint (given, or a random model on a
synthetic prepared data set it builds), scores every user once (so each has a cache), then for
each event rate and concurrency level runs that many asyncio clients (httpx) for a fixed time:
each picks a random user, with that probability first posts a new event for it (so the next
score extends the cached history, or recomputes a full window), then asks /score for M random
raw item ids. Reports throughput, p50/p99 latency through HTTP (client) and in the server (its
`Server-Timing` header: arrival to response head), status codes, the server's mean batch size,
model call time and cache outcomes (from /metrics). Client and server share the machine's
cores. Then, with the server stopped, it times in process what one new event costs against a
prefill (`bench_serving.history_costs`), with the server's CUDA graphs and without.

    python -m benchmarks.bench_http --device cpu --quick
    python -m benchmarks.bench_http --device cuda --out $OUT --name gpu_http   # paper size, bf16, CUDA graphs

The headline `server_p99_ms` is the server-side p99 of one client scoring cached users (no new
events); `server_p99_ms_events` the same with the highest event rate. Prints a table, then one
JSON line; writes <out>/<name>.json (default: benchmarks/results/serving/http_<device>[_quick].json).
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

from benchmarks.bench_serving import history_costs
from benchmarks.common import RESULTS, environment, freeze_heap, percentiles, table, write_results
from climber import checkpoint
from climber.config import ModelConfig
from climber.data.events import EventLog
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.model import Climber
from climber.serve.engine import Engine


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
    """Counters of interest from /metrics: batch count and sum, model call time, cache outcomes."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name in ("climber_batch_requests_count", "climber_batch_requests_sum",
                          "climber_model_call_seconds_sum"):
                out[s.name] = s.value
            elif s.name == "climber_cache_events_total":
                out[s.labels["kind"]] = s.value
    return out


def server_ms(r: httpx.Response) -> float:
    """The server's own time for a request, from its `Server-Timing: app;dur=<ms>` header."""
    return float(r.headers["server-timing"].partition("dur=")[2])


async def load(url: str, args: argparse.Namespace, concurrency: int, seconds: float, event_rate: float,
               items: np.ndarray, users: np.ndarray, clock: dict[int, int]) -> tuple[list[float], list[float], Counter]:
    """`concurrency` clients for `seconds`: (score latencies in ms at the client, the same in the
    server, status codes)."""
    lat: list[float] = []
    server: list[float] = []
    codes: Counter = Counter()
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(seed: int, c: httpx.AsyncClient) -> None:
        g = np.random.default_rng(seed)
        while time.perf_counter() < stop:
            u = int(users[g.integers(len(users))])
            if g.random() < event_rate:  # one new event: the next score extends the cache
                clock[u] += 1
                ev = {"item": int(g.choice(items)), "time": clock[u], "labels": {"like": int(g.random() < .5)}}
                r = await c.post("/events", json={"user": u, "events": [ev]})
                if r.status_code != 200:
                    codes[f"events {r.status_code}"] += 1
            body = {"user": u, "candidates": g.choice(items, args.candidates).tolist(), "req_time": clock[u] + 60}
            t0 = time.perf_counter()
            r = await c.post("/score", json=body)
            lat.append((time.perf_counter() - t0) * 1e3)
            server.append(server_ms(r))
            codes[r.status_code] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        await asyncio.gather(*(client(i + 1000 * concurrency, c) for i in range(concurrency)))
    return lat, server, codes


def prime(url: str, args: argparse.Namespace, items: np.ndarray, users: np.ndarray) -> None:
    """Score every user once, so each has a cache (a miss each) before anything is measured."""
    with httpx.Client(base_url=url, timeout=60) as c:
        for u in users:
            r = c.post("/score", json={"user": int(u), "candidates": items[:args.candidates].tolist()})
            r.raise_for_status()


def append_costs(args: argparse.Namespace, ckpt: Path) -> dict:
    """`bench_serving.history_costs` on the served checkpoint, in this process: with the server's
    CUDA graphs (when it used them) and eager."""
    timing = argparse.Namespace(warmup=3, iters=50, max_seconds=2.0, device=args.device)
    engine = Engine.from_checkpoint(ckpt, device=args.device, dtype=args.torch_dtype)
    out = {"eager": history_costs(timing, engine, args.candidates)}
    if args.device == "cuda" and args.cuda_graphs:
        engine.use_cuda_graphs(1, args.candidates)
        out["cuda_graphs"] = history_costs(timing, engine, args.candidates)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--quick", action="store_true", help="small model, two load levels, about a minute")
    ap.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead of a synthetic one")
    ap.add_argument("--concurrency", type=int, nargs="+")
    ap.add_argument("--seconds", type=float, help="measured time per load phase")
    ap.add_argument("--candidates", type=int, help="candidates per /score request")
    ap.add_argument("--event-rate", type=float, nargs="+", default=[0.0, 0.1],
                    help="shares of requests preceded by a new event, one load phase per rate and concurrency")
    ap.add_argument("--users", type=int)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float,
                    help="server --max-wait-ms (default: 0 on cuda, where a graphed call is about as short as the "
                         "wait, so waiting would only add to every request at low load; 2 on cpu)")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="server --cuda-graphs (on cuda)")
    ap.add_argument("--cache-mb", type=float, help="server --cache-mb (default: every user's cache fits)")
    ap.add_argument("--threads", type=int, help="torch threads in the server (CPU)")
    ap.add_argument("--out", type=Path, default=RESULTS / "serving", help="directory of the results JSON")
    ap.add_argument("--name", help="results file name (default http_<device>[_quick])")
    args = ap.parse_args()
    defaults = {"concurrency": ([1, 8], [1, 8]), "seconds": (6.0, 15.0), "candidates": (100, 1000),
                "users": (50, 200), "seq_len": (200, 800), "d_model": (64, 256), "heads": (2, 4), "layers": (2, 12)}
    for k, (quick, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.max_wait_ms is None:
        args.max_wait_ms = 0.0 if args.device == "cuda" else 2.0

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or synthetic_checkpoint(Path(tmp), args)
        config = checkpoint.read_config(ckpt)
        m = config["model"]
        data = SumiData(Path(config["data"]))
        items, users = np.asarray(data.a["item_vocab"]), np.asarray(data.a["user_vocab"])
        if args.cache_mb is None:  # per user: keys and values of every layer and block, at most seq_len tokens
            entry = 2 * m["n_layers"] * len(m["strategies"]) * m["seq_len"] * m["d_model"] * args.torch_dtype.itemsize
            args.cache_mb = max(64.0, 1.5 * len(users) * entry / 2**20)
        clock = {int(u): int(data.a["ev_time"].max()) + 1 for u in users}  # events after everything stored
        server_args = ["--checkpoint", str(ckpt), "--store", ":memory:", "--device", args.device, "--dtype",
                       args.dtype, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                       "--max-candidates", str(max(1000, args.candidates)), "--cache-mb", str(args.cache_mb),
                       "--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs"]
        t0 = time.perf_counter()
        server, url = start_server(server_args, Path(tmp) / "server.log", args.threads)
        started_s = time.perf_counter() - t0
        try:
            prime(url, args, items, users)
            freeze_heap()
            rows = []
            for rate in args.event_rate:
                for conc in args.concurrency:
                    asyncio.run(load(url, args, conc, 1.0, rate, items, users, clock))  # warm-up, not recorded
                    before = scrape(url)
                    lat, server_lat, codes = asyncio.run(load(url, args, conc, args.seconds, rate, items, users, clock))
                    after = scrape(url)
                    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                    calls = max(delta["climber_batch_requests_count"], 1)
                    srv = percentiles(server_lat)
                    rows.append({"event_rate": rate, "concurrency": conc, "requests": len(lat),
                                 "req_per_s": len(lat) / args.seconds,
                                 "cand_per_s": len(lat) * args.candidates / args.seconds, **percentiles(lat),
                                 "server_p50_ms": srv["p50_ms"], "server_p99_ms": srv["p99_ms"],
                                 "status": {str(k): v for k, v in codes.items()},
                                 "mean_batch": delta["climber_batch_requests_sum"] / calls,
                                 "model_call_mean_ms": delta["climber_model_call_seconds_sum"] / calls * 1e3,
                                 # the server's own work beside the model: what batching cannot share
                                 "server_mean_ms": (server_mean := float(np.mean(server_lat))),
                                 "host_mean_ms": server_mean - delta["climber_model_call_seconds_sum"]
                                 / max(len(server_lat), 1) * 1e3,
                                 "cache": {k: delta.get(k, 0.0) for k in ("hit", "miss", "extend", "recompute")}})
                    print(f"  events {rate:.0%}, concurrency {conc}: {rows[-1]['req_per_s']:.0f} req/s, p99 "
                          f"{rows[-1]['p99_ms']:.1f} ms (server {srv['p99_ms']:.2f} ms)", flush=True)
        finally:
            server.terminate()
            server.wait(30)
        costs = append_costs(args, ckpt)

    print(table(rows, [("event_rate", "events", ".2f"), ("concurrency", "clients", "d"), ("req_per_s", "req/s", ".1f"),
                       ("cand_per_s", "cand/s", ".0f"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
                       ("server_p50_ms", "server p50", ".2f"), ("server_p99_ms", "server p99", ".2f"),
                       ("model_call_mean_ms", "model call", ".2f"), ("host_mean_ms", "host", ".2f"),
                       ("mean_batch", "batch", ".2f")]))
    print(f"M={args.candidates} candidates per request; events: share of requests that follow a new event; "
          "server: arrival to response head (Server-Timing); model call: mean batched call (/metrics); "
          "host: mean server time less the model time per request")
    for name, c in costs.items():
        print(f"{name}: prefill p50 {c['prefill_p50_ms']:.2f} ms; one event into room {c['event_room_p50_ms']:.2f} ms "
              f"({c['event_room_vs_prefill']:.2f}x), into a full 'recent' window {c['event_full_p50_ms']:.2f} ms "
              f"({c['event_full_vs_prefill']:.2f}x); in a candidate pass +{c['event_in_pass_ms']:.2f} ms "
              f"({c['event_in_pass_vs_prefill']:.3f}x)")
    one = min(args.concurrency)
    head = [r for r in rows if r["concurrency"] == one]
    quiet, busy = min(head, key=lambda r: r["event_rate"]), max(head, key=lambda r: r["event_rate"])
    served = costs.get("cuda_graphs", costs["eager"])  # what the server ran
    summary = {"benchmark": "http", "env": environment(args.device), "candidates": args.candidates,
               "model": {k: m[k] for k in ("seq_len", "d_model", "n_heads", "n_layers", "strategies")},
               "dtype": args.dtype, "checkpoint": str(args.checkpoint) if args.checkpoint else "synthetic",
               "server": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
                          "cuda_graphs": args.cuda_graphs and args.device == "cuda", "cache_mb": args.cache_mb,
                          "start_s": started_s},
               "server_p99_ms": quiet["server_p99_ms"], "server_p50_ms": quiet["server_p50_ms"],
               "client_p50_ms": quiet["p50_ms"], "client_p99_ms": quiet["p99_ms"],
               "headline": f"{one} client(s), event rate {quiet['event_rate']}",
               "server_p99_ms_events": busy["server_p99_ms"],
               "append_vs_prefill": {"in_pass": served["event_in_pass_vs_prefill"],
                                     "room": served["event_room_vs_prefill"],
                                     "full": served["event_full_vs_prefill"]},
               "history_costs": costs, "rows": rows}
    name = args.name or f"http_{args.device}{'_quick' if args.quick else ''}"
    path = write_results(name, "benchmarks.bench_http", summary, args.out)
    print(json.dumps(summary))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
