"""Overload benchmark for the HTTP service (docs/paper.md section 3.2, issue 19), on loopback.

Starts `python -m climber.serve` in a subprocess on a synthetic checkpoint (as bench_http.py),
then measures, with /score requests of M random candidates for random users:

1. unloaded latency: one client, one request at a time;
2. the sustained rate: `--clients` closed-loop clients; the rate of 200 answers;
3. overload: an open-loop generator at `--factor` x that rate (requests start on schedule,
   whatever the answers) for `--seconds`; latency counts from the scheduled start.

Reports goodput (200 answers per second) over the sustained rate, p99 of 429 and of accepted
answers, 503s, client transport errors, "Too many open files" in the server log, and the
server's RSS before the overload and after a pause. Client and server share the machine.

    python -m benchmarks.bench_overload --threads 1

Prints a table, then one JSON line; writes benchmarks/results/serving/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from benchmarks.bench_http import start_server, synthetic_checkpoint
from benchmarks.common import environment, percentiles, table
from climber import checkpoint
from climber.data.sumi import SumiData

RESULTS = Path(__file__).parent / "results" / "serving" / "overload.json"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def closed_loop(url: str, clients: int, seconds: float, body) -> tuple[list[float], Counter]:
    """`clients` clients, each sending its next request when the last is answered."""
    lat: list[float] = []
    codes: Counter = Counter()
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def client(seed: int) -> None:
            g = np.random.default_rng(seed)
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await c.post("/score", json=body(g))
                lat.append((time.perf_counter() - t0) * 1e3)
                codes[r.status_code] += 1
        await asyncio.gather(*(client(i) for i in range(clients)))
    return lat, codes


async def open_loop(url: str, rate: float, seconds: float, body, connections: int) -> dict[str, list[float]]:
    """Requests started every 1/rate s for `seconds`: latency (ms, from the scheduled start) by outcome."""
    out: dict[str, list[float]] = {}
    g = np.random.default_rng(1)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        async def one(start: float) -> None:
            try:
                key = str((await c.post("/score", json=body(g))).status_code)
            except httpx.HTTPError as e:
                key = type(e).__name__
            out.setdefault(key, []).append((time.perf_counter() - start) * 1e3)

        tasks, t0, n = [], time.perf_counter(), int(rate * seconds)
        for i in range(n):
            start = t0 + i / rate
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            tasks.append(asyncio.create_task(one(start)))
        await asyncio.gather(*tasks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="overload duration")
    ap.add_argument("--factor", type=float, default=2.0, help="overload rate / sustained rate")
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients that measure the sustained rate")
    ap.add_argument("--connections", type=int, default=512, help="the overload generator's connection pool")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--queue-size", type=int, help="server --queue-size (default: the server's)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch threads in the server (CPU)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = synthetic_checkpoint(Path(tmp), args)
        data = SumiData(Path(checkpoint.read_config(ckpt)["data"]))
        items, users = np.asarray(data.a["item_vocab"]), np.asarray(data.a["user_vocab"])
        req_time = int(data.a["ev_time"].max()) + 60

        def body(g: np.random.Generator) -> dict:
            return {"user": int(users[g.integers(len(users))]), "candidates": g.choice(items, args.candidates).tolist(),
                    "req_time": req_time}

        server_args = ["--checkpoint", str(ckpt), "--device", "cpu", "--store", str(Path(tmp) / "events.sqlite"),
                       "--max-batch", str(args.max_batch)]
        server_args += ["--queue-size", str(args.queue_size)] if args.queue_size else []
        log_path = Path(tmp) / "server.log"
        server, url = start_server(server_args, log_path, args.threads)
        try:
            asyncio.run(closed_loop(url, args.clients, 3.0, body))  # warm-up: every user's cache
            unloaded, _ = asyncio.run(closed_loop(url, 1, 5.0, body))
            lat, codes = asyncio.run(closed_loop(url, args.clients, 8.0, body))
            sustained = codes[200] / 8.0
            rss_before = rss_mib(server.pid)
            t0, cpu0 = time.perf_counter(), (time.process_time(), cpu_s(server.pid))
            out = asyncio.run(open_loop(url, args.factor * sustained, args.seconds, body, args.connections))
            wall = time.perf_counter() - t0
            cpu = {"client_cpu_per_s": (time.process_time() - cpu0[0]) / wall,
                   "server_cpu_per_s": (cpu_s(server.pid) - cpu0[1]) / wall}
            time.sleep(5)
            rss_after = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(30)
        server_log = log_path.read_text()

    n = {k: len(v) for k, v in out.items()}
    goodput = n.get("200", 0) / wall  # wall: from the first start until the last answer
    p = {k: percentiles(v) for k, v in out.items()}
    summary = {
        "benchmark": "overload", "env": environment("cpu"), "command": "python -m " + " ".join(
            ["benchmarks.bench_overload", *sys.argv[1:]]),
        "model": {"seq_len": args.seq_len, "d_model": args.d_model, "n_heads": args.heads, "n_layers": args.layers,
                  "strategies": ["recent", "pos:like", "recent@16"]},
        "candidates": args.candidates, "server": {"max_batch": args.max_batch, "queue_size": args.queue_size,
                                                   "threads": args.threads},
        "unloaded": percentiles(unloaded), "sustained_req_per_s": sustained, "sustained": percentiles(lat),
        "sustained_status": {str(k): v for k, v in codes.items()},
        "overload_req_per_s": args.factor * sustained, "overload_seconds": args.seconds,
        "overload_wall_s": wall, "overload_status": n, "goodput_req_per_s": goodput,
        "goodput_ratio": goodput / sustained,
        "p99_429_ms": p.get("429", {}).get("p99_ms"), "p50_429_ms": p.get("429", {}).get("p50_ms"),
        "accepted_p99_ms": p.get("200", {}).get("p99_ms"), "unloaded_p99_ms": percentiles(unloaded)["p99_ms"],
        "accepted_p99_vs_unloaded": p.get("200", {}).get("p99_ms", float("nan")) / percentiles(unloaded)["p99_ms"],
        "p99_503_ms": p.get("503", {}).get("p99_ms"),
        "emfile_in_server_log": server_log.count("Too many open files"),
        "tracebacks_in_server_log": server_log.count("Traceback"),
        **cpu, "rss_mib_before": rss_before, "rss_mib_after": rss_after, "rss_change": rss_after / rss_before - 1,
    }
    rows = [{"phase": "unloaded (1 client)", "req_per_s": len(unloaded) / 5.0, **percentiles(unloaded)},
            {"phase": f"sustained ({args.clients} clients)", "req_per_s": sustained, **percentiles(lat)}]
    rows += [{"phase": f"{args.factor:g}x open loop: {k}", "req_per_s": n[k] / wall, **p[k]} for k in sorted(p)]
    print(table(rows, [("phase", "phase", "s"), ("req_per_s", "req/s", ".1f"), ("p50_ms", "p50 ms", ".1f"),
                       ("p99_ms", "p99 ms", ".1f")]))
    print(f"goodput {goodput:.1f} req/s = {summary['goodput_ratio']:.0%} of sustained; RSS {rss_before:.0f} -> "
          f"{rss_after:.0f} MiB; EMFILE {summary['emfile_in_server_log']}; CPU cores busy during overload: client "
          f"{cpu['client_cpu_per_s']:.2f}, server {cpu['server_cpu_per_s']:.2f}")
    print(json.dumps(summary))
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
