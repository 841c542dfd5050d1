"""Overload benchmark for the HTTP service (docs/paper.md section 3.2, issue 19), on loopback.

Starts `python -m climber.serve` in a subprocess on a synthetic checkpoint (as bench_http.py),
then measures, with /score requests of M random candidates for random users:

1. unloaded latency: one client, one request at a time;
2. the sustained rate: `--clients` closed-loop clients; the rate of 200 answers;
3. overload: an open-loop generator at `--factor` x that rate (requests start on schedule,
   whatever the answers) for `--seconds`; latency counts from the scheduled start.

The client is a minimal keep-alive HTTP/1.1 client on asyncio streams with request bytes
encoded in advance (about 0.3 ms of CPU a request, against several ms for httpx, whose pool
fell behind its schedule on this machine and so measured its own queue). It records how late
each request reached its socket (`send_lag`), so a generator that falls behind shows.

Reports goodput (200 answers per second) over the sustained rate, p99 of 429 and of accepted
answers, 503s, client transport errors, "Too many open files" in the server log, the server's
RSS at rest (5 s idle) before and after the overload, cores used by client and server, and the load
average (client and server share the machine with whatever else runs on it).

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

import numpy as np

from benchmarks.bench_http import start_server, synthetic_checkpoint
from benchmarks.common import environment, freeze_heap, percentiles, table
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


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for these requests:
    a few syscalls and no parsing beyond the status line and content-length, so that the
    generator's own cost per request (unlike httpx's connection pool) stays small next to the
    server's on a shared machine."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, payload: bytes) -> tuple[int, bool]:
        """Send one pre-encoded request -> (status, whether the connection stays open)."""
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").lower().split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        await self.reader.readexactly(int(headers.get("content-length", 0)))
        return status, headers.get("connection") != "close"

    def close(self) -> None:
        self.writer.close()


def request_bytes(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(data), data))


class Pool:
    """Idle keep-alive connections, opened on demand up to `size`; one request at a time on each."""

    def __init__(self, port: int, size: int):
        self.port, self.idle, self.free = port, [], asyncio.Semaphore(size)

    async def post(self, payload: bytes) -> tuple[int | str, float]:
        """(the reply's status code or the transport error's name, when it was sent: perf_counter)."""
        async with self.free:
            conn = self.idle.pop() if self.idle else None
            sent = time.perf_counter()
            try:
                if conn is not None:
                    try:
                        status, keep = await conn.post(payload)
                    except (ConnectionError, asyncio.IncompleteReadError) as e:
                        # the server closed this idle connection (keep-alive timeout) as we sent: a
                        # new connection, as every HTTP client does; a partial reply is an error
                        conn.close()
                        conn = None
                        if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                            raise
                if conn is None:
                    conn = await Connection.open(self.port)
                    status, keep = await conn.post(payload)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                if conn:
                    conn.close()
                return type(e).__name__, sent
            if keep:
                self.idle.append(conn)
            else:
                conn.close()
            return status, sent

    def close(self) -> None:
        for conn in self.idle:
            conn.close()


async def closed_loop(port: int, clients: int, seconds: float, payloads: list[bytes]) -> tuple[list[float], Counter]:
    """`clients` clients, each sending its next request when the last is answered."""
    lat: list[float] = []
    codes: Counter = Counter()
    stop = time.perf_counter() + seconds
    pool = Pool(port, clients)

    async def client(seed: int) -> None:
        g = np.random.default_rng(seed)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            codes[(await pool.post(payloads[g.integers(len(payloads))]))[0]] += 1
            lat.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(*(client(i) for i in range(clients)))
    pool.close()
    return lat, codes


async def open_loop(port: int, rate: float, seconds: float, payloads: list[bytes],
                    connections: int) -> tuple[dict[str, list[float]], list[float]]:
    """Requests started every 1/rate s for `seconds`, whatever the answers -> latency (ms, from the
    scheduled start) by outcome, and how late each request was handed to the socket (ms): when
    that lag grows, the generator, not the server, is what is being measured."""
    out: dict[str, list[float]] = {}
    lag: list[float] = []
    pool = Pool(port, connections)

    async def one(start: float, payload: bytes) -> None:
        status, sent = await pool.post(payload)
        lag.append((sent - start) * 1e3)
        out.setdefault(str(status), []).append((time.perf_counter() - start) * 1e3)

    tasks, t0, n = [], time.perf_counter(), int(rate * seconds)
    for i in range(n):
        start = t0 + i / rate
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        tasks.append(asyncio.create_task(one(start, payloads[i % len(payloads)])))
    await asyncio.gather(*tasks)
    pool.close()
    return out, lag


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
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = ap.parse_args()
    if args.queue_size and args.clients > args.queue_size:  # the sustained phase would count its own 429s
        ap.error(f"--clients {args.clients} > --queue-size {args.queue_size}: closed-loop clients beyond the queue "
                 "get 429s and measure no sustained rate")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = synthetic_checkpoint(Path(tmp), args)
        data = SumiData(Path(checkpoint.read_config(ckpt)["data"]))
        items, users = np.asarray(data.a["item_vocab"]), np.asarray(data.a["user_vocab"])
        req_time = int(data.a["ev_time"].max()) + 60

        g = np.random.default_rng(0)
        # bodies encoded before the clock starts: one per user (the warm-up fills every user's
        # cache), then random users
        who = np.concatenate([users, users[g.integers(len(users), size=1024)]])
        payloads = [request_bytes({"user": int(u), "candidates": g.choice(items, args.candidates).tolist(),
                                   "req_time": req_time}) for u in who]
        warm, payloads = payloads[:len(users)], payloads[len(users):]

        server_args = ["--checkpoint", str(ckpt), "--device", "cpu", "--store", str(Path(tmp) / "events.sqlite"),
                       "--max-batch", str(args.max_batch)]
        server_args += ["--queue-size", str(args.queue_size)] if args.queue_size else []
        log_path = Path(tmp) / "server.log"
        server, url = start_server(server_args, log_path, args.threads)
        port = int(url.rsplit(":", 1)[1])

        def cpu_now() -> tuple[float, float, float]:
            return time.perf_counter(), time.process_time(), cpu_s(server.pid)

        def cpu_since(c0: tuple[float, float, float]) -> dict[str, float]:
            """Cores busy since `c0`: this process (the client) and the server."""
            c1 = cpu_now()
            return {"client": (c1[1] - c0[1]) / (c1[0] - c0[0]), "server": (c1[2] - c0[2]) / (c1[0] - c0[0])}

        try:
            freeze_heap()
            asyncio.run(closed_loop(port, args.clients, 3.0, warm))  # warm-up
            unloaded, _ = asyncio.run(closed_loop(port, 1, 5.0, payloads))
            c0 = cpu_now()
            lat, codes = asyncio.run(closed_loop(port, args.clients, 8.0, payloads))
            sustained, cpu_sustained = codes[200] / 8.0, cpu_since(c0)
            time.sleep(5)  # at rest, as after the overload: the server releases memory after an idle second
            rss_before = rss_mib(server.pid)
            load_before = os.getloadavg()
            c0 = t0 = cpu_now()
            out, lag = asyncio.run(open_loop(port, args.factor * sustained, args.seconds, payloads, args.connections))
            wall, cpu = time.perf_counter() - t0[0], cpu_since(c0)
            load_after = os.getloadavg()
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
        "accepted_p99_vs_sustained": p.get("200", {}).get("p99_ms", float("nan")) / percentiles(lat)["p99_ms"],
        "p99_503_ms": p.get("503", {}).get("p99_ms"),
        "emfile_in_server_log": server_log.count("Too many open files"),
        "tracebacks_in_server_log": server_log.count("Traceback"),
        "send_lag": percentiles(lag), "cores_busy_sustained": cpu_sustained, "cores_busy_overload": cpu,
        "load_average_1_5_15_before_overload": load_before, "load_average_1_5_15_after_overload": load_after,
        "rss_mib_before": rss_before, "rss_mib_after": rss_after, "rss_change": rss_after / rss_before - 1,
    }
    rows = [{"phase": "unloaded (1 client)", "req_per_s": len(unloaded) / 5.0, **percentiles(unloaded)},
            {"phase": f"sustained ({args.clients} clients)", "req_per_s": sustained, **percentiles(lat)}]
    rows += [{"phase": f"{args.factor:g}x open loop: {k}", "req_per_s": n[k] / wall, **p[k]} for k in sorted(p)]
    print(table(rows, [("phase", "phase", "s"), ("req_per_s", "req/s", ".1f"), ("p50_ms", "p50 ms", ".1f"),
                       ("p99_ms", "p99 ms", ".1f")]))
    print(f"goodput {goodput:.1f} req/s = {summary['goodput_ratio']:.0%} of sustained; RSS {rss_before:.0f} -> "
          f"{rss_after:.0f} MiB; EMFILE {summary['emfile_in_server_log']}; cores busy (client, server): "
          f"sustained {cpu_sustained['client']:.2f}, {cpu_sustained['server']:.2f}; overload {cpu['client']:.2f}, "
          f"{cpu['server']:.2f}; send lag p99 {summary['send_lag']['p99_ms']:.1f} ms; load {load_before[0]:.1f}")
    print(json.dumps(summary))
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
