"""The HTTP service through real sockets (uvicorn in a thread, httpx clients), tiny checkpoint on
CPU: scoring and caching, events, every bad-input case answered with a JSON 4xx while the server
keeps serving, micro-batching of concurrent users, and 429 / 503 under overload (docs/paper.md 3.2)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn

from climber.serve.app import ServeSettings, build_app, http_protocol
from climber.serve.command import check_bind
from climber.serve.engine import Engine, ScoreRequest
from tests.serve_helpers import make_checkpoint

JSON = {"content-type": "application/json"}
SETTINGS = ServeSettings(max_candidates=50, max_history=100, max_body_kb=8, max_wait_ms=1.0)


@contextmanager
def serving(engine: Engine, settings: ServeSettings = SETTINGS, token: str | None = None) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # log_config=None: uvicorn's loggers propagate to the root, so caplog sees every record
    server = uvicorn.Server(uvicorn.Config(build_app(lambda: engine, settings, token), log_config=None,
                                           http=http_protocol(settings.header_timeout_s)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def server_process(ckpt, *args: str, env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m climber.serve` in a subprocess on a free loopback port; yields (its URL, the process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "climber.serve", "--checkpoint", str(ckpt), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, f"server did not start:\n{proc.stdout.read()}"
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def client(ckpt) -> Iterator[httpx.Client]:
    with serving(Engine.from_checkpoint(ckpt)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(ckpt) -> Engine:
    """A second engine on the same checkpoint, called in-process."""
    return Engine.from_checkpoint(ckpt)


def known_items(engine: Engine, n: int) -> list[int]:
    return engine.item_vocab[:n].tolist()


def probs(body: dict) -> np.ndarray:
    return np.array([body["probs"][t] for t in body["tasks"]]).T


def test_score_roundtrip_is_cached_and_equals_the_engine(client, reference):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    items = known_items(reference, 6)
    req = {"user": 104, "scenario": 1, "candidates": items, "req_time": 1_010_000}
    first, second = client.post("/score", json=req), client.post("/score", json=req)
    assert first.status_code == 200, first.text
    a, b = first.json(), second.json()
    assert (a["cache"], b["cache"]) == ("miss", "hit") and a["history_length"] == 12
    assert a["tasks"] == ["click", "like"] and a["items"] == items and set(a["probs"]) == {"click", "like"}
    assert a["unknown_items"] == []
    assert gc.get_freeze_count() > 0  # startup's objects are out of the collector's full passes
    dense, _ = reference.item_ids(np.array(items))
    want = reference.score_requests([ScoreRequest(dense, 1, 1_010_000, user=104)])[0].probs
    np.testing.assert_allclose(probs(a), want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(probs(b), probs(a))
    for r in (first, second, client.get("/healthz")):  # the server's own time, for load generators
        name, _, dur = r.headers["server-timing"].partition(";dur=")
        assert name == "app" and 0 < float(dur) < 30_000


def test_events_extend_the_cached_history(client, reference):
    items = known_items(reference, 5)
    events = [{"item": items[i], "time": 3_000_000 + 10 * i, "action": i % 3, "scenario": i % 2,
               "labels": {"click": 1, "like": i % 2}} for i in range(3)]
    r = client.post("/events", json={"user": 555, "events": events[:2]})
    assert r.status_code == 200 and r.json()["history_length"] == 2
    req = {"user": 555, "scenario": 0, "candidates": items, "req_time": 3_000_100}
    assert client.post("/score", json=req).json()["cache"] == "miss"
    assert client.post("/events", json={"user": 555, "events": events[2:]}).json()["history_length"] == 3
    extended = client.post("/score", json=req).json()
    assert extended["cache"] == "extend" and extended["history_length"] == 3
    scratch = client.post("/score", json={**req, "history": events}).json()
    assert scratch["cache"] == "bypass"
    np.testing.assert_allclose(probs(extended), probs(scratch), atol=1e-5, rtol=0)


def test_unknown_items_cold_start_and_anonymous_requests(client, reference):
    items = known_items(reference, 2)
    r = client.post("/score", json={"user": 101, "candidates": [items[0], 1001, 1003, items[1]]}).json()
    assert r["unknown_items"] == [1001, 1003]
    p = probs(r)
    np.testing.assert_array_equal(p[1], p[2])  # both scored as the unknown item
    cold = client.post("/score", json={"user": 101, "candidates": items, "history": []}).json()
    assert cold["cache"] == "bypass" and cold["history_length"] == 0
    new_user = client.post("/score", json={"user": 424242, "candidates": items}).json()
    assert new_user["cache"] == "miss" and new_user["history_length"] == 0
    anonymous = client.post("/score", json={"candidates": items}).json()
    assert anonymous["cache"] == "bypass" and np.isfinite(probs(anonymous)).all()
    ev = {"item": 1001, "time": 5, "labels": {"like": 1}}
    assert client.post("/events", json={"user": 9001, "events": [ev]}).json()["unknown_items"] == [1001]


def chunks(data: bytes, size: int = 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("case, status", [
    ("malformed_json", 400), ("no_content_type", 415), ("not_an_object", 422), ("missing_candidates", 422),
    ("wrong_type", 422), ("unknown_field", 422), ("id_beyond_int64", 422), ("no_candidates", 422),
    ("too_many_candidates", 422), ("scenario_too_big", 422), ("scenario_negative", 422), ("history_too_long", 422),
    ("history_out_of_order", 422), ("oversized_body", 413), ("oversized_chunked_body", 413),
    ("event_unknown_task", 422), ("event_bad_label", 422), ("event_bad_action", 422), ("events_empty", 422),
    ("events_out_of_order", 422), ("event_older_than_stored", 409), ("event_far_future", 422),
])
def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(client, case, status):
    ok = {"user": 102, "scenario": 0, "candidates": [1000, 1002]}
    ev = {"item": 1000, "time": 10}
    big = b'{"candidates": [' + b"1000, " * 3000 + b"1000]}"
    requests = {
        "malformed_json": ("/score", {"content": b'{"candidates": [1000,', "headers": JSON}),
        "no_content_type": ("/score", {"content": b'{"candidates": [1000]}'}),
        "not_an_object": ("/score", {"json": [1000, 1002]}),
        "missing_candidates": ("/score", {"json": {"user": 102}}),
        "wrong_type": ("/score", {"json": {**ok, "candidates": ["abc"]}}),
        "unknown_field": ("/score", {"json": {**ok, "colour": "red"}}),
        "id_beyond_int64": ("/score", {"json": {**ok, "candidates": [2**64]}}),
        "no_candidates": ("/score", {"json": {**ok, "candidates": []}}),
        "too_many_candidates": ("/score", {"json": {**ok, "candidates": [1000] * 51}}),
        "scenario_too_big": ("/score", {"json": {**ok, "scenario": 2}}),
        "scenario_negative": ("/score", {"json": {**ok, "scenario": -1}}),
        "history_too_long": ("/score", {"json": {**ok, "history": [ev] * 101}}),
        "history_out_of_order": ("/score", {"json": {**ok, "history": [{**ev, "time": 9}, {**ev, "time": 8}]}}),
        "oversized_body": ("/score", {"content": big, "headers": JSON}),
        "oversized_chunked_body": ("/score", {"content": chunks(big), "headers": JSON}),
        "event_unknown_task": ("/events", {"json": {"user": 7, "events": [{**ev, "labels": {"share": 1}}]}}),
        "event_bad_label": ("/events", {"json": {"user": 7, "events": [{**ev, "labels": {"like": 2}}]}}),
        "event_bad_action": ("/events", {"json": {"user": 7, "events": [{**ev, "action": 3}]}}),
        "events_empty": ("/events", {"json": {"user": 7, "events": []}}),
        "events_out_of_order": ("/events", {"json": {"user": 7, "events": [{**ev, "time": 9}, {**ev, "time": 8}]}}),
        "event_older_than_stored": ("/events", {"json": {"user": 102, "events": [{**ev, "time": 5}]}}),
        "event_far_future": ("/events", {"json": {"user": 7, "events": [{**ev, "time": int(time.time()) + 3600}]}}),
    }
    path, kw = requests[case]
    r = client.post(path, **kw)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    good = client.post("/score", json=ok)
    assert good.status_code == 200 and [len(p) for p in good.json()["probs"].values()] == [2, 2]


def test_concurrent_users_are_micro_batched_with_unchanged_scores(ckpt, reference):
    engine = Engine.from_checkpoint(ckpt)
    items = known_items(reference, 4)
    users = (101, 102, 103, 104, 105, 106)
    settings = ServeSettings(max_batch=8, max_wait_ms=200.0)

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/score", json={"user": u, "candidates": items, "req_time": 10**6})
                                          for u in users))

    with serving(engine, settings) as url:
        responses = asyncio.run(fire(url))
        metrics = httpx.get(f"{url}/metrics").text
    dense, _ = reference.item_ids(np.array(items))
    for u, r in zip(users, responses, strict=True):
        assert r.status_code == 200
        alone = reference.score_requests([ScoreRequest(dense, 0, 10**6, user=u)])[0].probs
        np.testing.assert_allclose(probs(r.json()), alone, atol=1e-5, rtol=0)
    calls = float(metrics.split("climber_batch_requests_count ")[1].split()[0])
    assert calls < len(users)  # several users shared a model call
    for name in ('climber_http_request_seconds_bucket{le="0.005",path="/score",status="200"}',
                 "climber_batch_candidates_bucket", 'climber_cache_events_total{kind="miss"} 6.0',
                 "climber_cache_bytes", "climber_queue_depth", "climber_model_call_seconds_count"):
        assert name in metrics, name


def slow(engine: Engine, seconds: float) -> Engine:
    """The engine, with every model call taking `seconds` longer."""
    run = engine.score_requests

    def delayed(requests):
        time.sleep(seconds)
        return run(requests)

    engine.score_requests = delayed
    return engine


def test_overload_answers_429_at_once_then_recovers(ckpt):
    engine = slow(Engine.from_checkpoint(ckpt), 0.3)
    settings = ServeSettings(queue_size=1, max_batch=1, max_wait_ms=0.0)

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/score", json={"user": 101, "candidates": [1000]})
                                          for _ in range(8)))

    with serving(engine, settings) as url:
        t0 = time.monotonic()
        codes = [r.status_code for r in asyncio.run(burst(url))]
        assert time.monotonic() - t0 < 5
        assert codes.count(429) >= 5 and codes.count(200) >= 1 and set(codes) <= {200, 429}
        assert httpx.post(f"{url}/score", json={"user": 101, "candidates": [1000]}, timeout=30).status_code == 200
        assert 'climber_rejected_requests_total{reason="queue_full"}' in httpx.get(f"{url}/metrics").text


def blocked(engine: Engine) -> tuple[Engine, threading.Event, threading.Event, list[int]]:
    """The engine, with every model call waiting for `release` once `entered` is set; `calls`
    counts the requests each call scored."""
    run, entered, release, calls = engine.score_requests, threading.Event(), threading.Event(), []

    def gated(requests):
        calls.append(len(requests))
        entered.set()
        assert release.wait(60), "never released"
        return run(requests)

    engine.score_requests = gated
    return engine, entered, release, calls


def test_full_queue_answers_429_while_the_admitted_work_is_blocked(ckpt):
    """With the admitted requests stuck in a model call that cannot finish until the test says so,
    more requests get 429, even a malformed body (which parsing would answer with 400): the
    refusal waits for no work and reads no body. A refusal that waited for the queue would never
    come (the client's 10 s timeout fails the test); latency is measured in bench_overload.py."""
    engine, entered, release, calls = blocked(Engine.from_checkpoint(ckpt))
    settings = ServeSettings(queue_size=2, max_batch=1, max_wait_ms=0.0)
    ok = {"user": 101, "candidates": [1000]}

    async def run(url: str) -> tuple[list[int], list[int], list[int]]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            admitted = [asyncio.create_task(c.post("/score", json=ok)) for _ in range(2)]
            while "climber_queue_depth 2.0" not in (await c.get("/metrics")).text or not entered.is_set():
                await asyncio.sleep(0.01)
            codes = []
            for i in range(30):
                kw = {"content": b'{"candidates": [1000,', "headers": JSON} if i % 2 else {"json": ok}
                codes.append((await c.post("/score", **kw)).status_code)
            scored_while_blocked = list(calls)
            release.set()
            return codes, scored_while_blocked, [(await t).status_code for t in admitted]

    with serving(engine, settings) as url:
        codes, scored_while_blocked, first = asyncio.run(run(url))
    assert codes == [429] * 30 and scored_while_blocked == [1] and first == [200, 200]


def test_clients_that_leave_while_admitted_log_nothing(ckpt, caplog):
    """A client that disconnects while its request waits for the model: its slot is freed once
    the model call ends, and nothing is logged above INFO (no traceback)."""
    engine, entered, release, _ = blocked(Engine.from_checkpoint(ckpt))
    settings = ServeSettings(queue_size=1, max_batch=1, max_wait_ms=0.0)
    body = b'{"user": 101, "candidates": [1000]}'
    head = b"POST /score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    with serving(engine, settings) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head % len(body) + body)
            assert entered.wait(30)
        assert httpx.post(f"{url}/score", json={"user": 101, "candidates": [1000]}).status_code == 429
        release.set()
        deadline = time.monotonic() + 30
        while httpx.post(f"{url}/score", json={"user": 101, "candidates": [1000]}).status_code != 200:
            assert time.monotonic() < deadline, "the slot of the client that left was never freed"
            time.sleep(0.05)
    bad = [r for r in caplog.records if r.levelno > 20 or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


def test_request_past_its_deadline_gets_503_at_its_deadline(ckpt):
    """Requests whose model call cannot finish (blocked until the test releases it) get 503 once
    their deadline has passed, while the call is still blocked: not when the work is done."""
    engine, entered, release, _ = blocked(Engine.from_checkpoint(ckpt))
    settings = ServeSettings(timeout_s=0.3, max_batch=1, max_wait_ms=0.0)

    async def burst(url: str) -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            async def one() -> tuple[int, float]:
                t0 = time.perf_counter()
                r = await c.post("/score", json={"user": 101, "candidates": [1000]})
                return r.status_code, time.perf_counter() - t0
            return await asyncio.gather(*(one() for _ in range(6)))

    with serving(engine, settings) as url:
        got = asyncio.run(burst(url))
        still_blocked = not release.is_set()
        release.set()
        assert httpx.get(f"{url}/healthz").status_code == 200
    assert entered.is_set() and still_blocked
    assert [code for code, _ in got] == [503] * 6 and all(t >= 0.3 for _, t in got), got


def test_client_aborts_are_quiet_and_slow_bodies_time_out(ckpt):
    """Clients that leave mid-body log nothing; a body that trickles in gets 408 at body_timeout_s."""
    head = b"POST /score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{"
    with server_process(ckpt, "--store", ":memory:", "--body-timeout-s", "0.5") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(head)
                time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head)
            t0 = time.perf_counter()
            reply = s.recv(1000)
            took = time.perf_counter() - t0
        assert httpx.post(f"{url}/score", json={"user": 101, "candidates": [1000]}).status_code == 200
        proc.terminate()
        log = proc.communicate(timeout=10)[0]
    assert reply.startswith(b"HTTP/1.1 408") and 0.5 <= took < 10, (reply, took)  # not held until the 30 s recv timeout
    assert "Traceback" not in log and "ERROR" not in log, log


def test_slow_request_heads_get_408_and_foreign_hosts_400(ckpt):
    """Slowloris on the request head: a connection whose head is not complete within
    --header-timeout-s of opening (or of its last response) gets 408 and is closed, whether it
    sent part of a head or nothing. On loopback the Host header must name this machine, so a
    page under another name (DNS rebinding) cannot reach the server through a browser."""
    request = b"GET /healthz HTTP/1.1\r\nhost: %s\r\n\r\n"
    with server_process(ckpt, "--store", ":memory:", "--header-timeout-s", "0.5") as (url, proc):
        port = int(url.rsplit(":", 1)[1])

        def reply(*sends: bytes) -> bytes:
            """What the server sends until it closes the connection (30 s at most)."""
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                for data in sends:
                    s.sendall(data)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
                return out

        assert reply(b"GET /healthz HTTP/1.1\r\nhost: 127.0").startswith(b"HTTP/1.1 408")
        assert reply().startswith(b"HTTP/1.1 408")
        kept_alive = reply(request % b"127.0.0.1", b"GET /hea")  # one whole request, then part of a head
        assert kept_alive.startswith(b"HTTP/1.1 200") and kept_alive.count(b"HTTP/1.1 408") == 1
        for host in (b"localhost:8000", b"[::1]:80", b"127.0.0.1"):
            assert reply(request % host).startswith(b"HTTP/1.1 200"), host
        foreign = httpx.get(f"{url}/healthz", headers={"host": f"attacker.example:{port}"})
        assert foreign.status_code == 400 and "Host" in foreign.json()["error"]
        proc.terminate()
        log = proc.communicate(timeout=10)[0]
    assert "Traceback" not in log and "ERROR" not in log, log


def test_no_single_event_locks_a_user(client):
    """Times past the server's clock + max_future_s are refused, so an event at 2^63 - 1 cannot
    make every later event of its user 'older than the stored history' (409)."""
    now = int(time.time())
    for t in (2**63 - 1, now + SETTINGS.max_future_s + 60):
        r = client.post("/events", json={"user": 8080, "events": [{"item": 1000, "time": t}]})
        assert r.status_code == 422 and "after the server's clock" in r.json()["error"], r.text
    r = client.post("/events", json={"user": 8080, "events": [{"item": 1000, "time": now}]})
    assert r.status_code == 200 and r.json()["history_length"] == 1


def test_posted_events_survive_kill_9_and_restart(ckpt, tmp_path):
    store = str(tmp_path / "events.sqlite")
    events = [{"item": 1000 + 2 * i, "time": 1_500_000 + i, "labels": {"like": i % 2}} for i in range(3)]
    req = {"user": 777, "scenario": 1, "candidates": [1000, 1002, 1004], "req_time": 1_600_000}
    with server_process(ckpt, "--store", store) as (url, proc):
        assert httpx.post(f"{url}/events", json={"user": 777, "events": events}).status_code == 200
        before = httpx.post(f"{url}/score", json=req).json()
        proc.send_signal(signal.SIGKILL)  # no shutdown of any kind
        proc.wait(10)
    with server_process(ckpt, "--store", store) as (url, _):
        after = httpx.post(f"{url}/score", json=req).json()
        assert httpx.post(f"{url}/events", json={"user": 777, "events": events[:1]}).status_code == 409
    assert before["history_length"] == after["history_length"] == 3 and after["cache"] == "miss"
    np.testing.assert_allclose(probs(after), probs(before), atol=1e-6, rtol=0)


TOKEN = "s3cret-token-0123456789"


@pytest.mark.parametrize("auth_reads", [False, True])
def test_bearer_token_guards_writes_and_optionally_reads(ckpt, auth_reads):
    score, event = {"user": 101, "candidates": [1000]}, {"user": 31, "events": [{"item": 1000, "time": 10}]}
    good = {"authorization": f"Bearer {TOKEN}"}
    with serving(Engine.from_checkpoint(ckpt), ServeSettings(auth_reads=auth_reads), token=TOKEN) as url:
        for headers in ({}, {"authorization": f"Bearer {TOKEN[:-1]}x"}, {"authorization": TOKEN}):
            r = httpx.post(f"{url}/events", json=event, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and r.json()["error"]
        assert httpx.post(f"{url}/events", json=event, headers=good).status_code == 200
        assert httpx.post(f"{url}/score", json=score).status_code == (401 if auth_reads else 200)
        assert httpx.get(f"{url}/metrics").status_code == (401 if auth_reads else 200)
        assert httpx.post(f"{url}/score", json=score, headers=good).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no token


def test_non_loopback_bind_needs_a_token(ckpt):
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(ValueError, match="16 characters"):
        check_bind("127.0.0.1", "short")
    cmd = [sys.executable, "-m", "climber.serve", "--checkpoint", str(ckpt), "--host", "0.0.0.0", "--port", "1"]
    env = {k: v for k, v in os.environ.items() if k != "CLIMBER_TOKEN"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "set CLIMBER_TOKEN" in done.stderr, done.stderr
