"""HTTP service around the KV-cached serving engine (docs/paper.md section 3.2), and `climber serve`.

Endpoints (JSON in and out; every error body is {"error": message[, "detail": [...]]}):

* POST /score   {"user": 17, "scenario": 0, "candidates": [raw item ids], "history": [events]?,
                 "req_time": unix seconds?} -> per-candidate per-task probabilities. The history
                 is the explicit list when given (cold start: []), else the server's store for
                 `user`; unknown item ids are scored as the unknown item (dense id 1) and
                 listed in "unknown_items".
* POST /events  {"user": 17, "events": [{"item", "time", "action", "scenario", "labels"}]}
                 appends to the user's history; cached encodings catch up on the next /score.
* GET /healthz (the process answers), /readyz (the model worker runs and the queue has room),
  /metrics (Prometheus: latency, batch sizes, queue depth, refusals, cache outcomes).

Responses from the app carry `Server-Timing: app;dur=<ms>`, their time in the server since arrival.

Micro-batching: admitted /score requests wait in an asyncio queue; one worker takes up to
`max_batch` of them, waiting at most `max_wait_ms` for more after the first, and runs one
batched model call in a dedicated thread (the event loop keeps accepting requests).
Admission comes before any work (`Gate`): a Host header outside `allowed_hosts` gets 400, a
wrong token 401 and, once `queue_size` requests are admitted, /score gets 429 before its body
is read or parsed; bodies over `max_body_kb` get 413, bodies not received within
`body_timeout_s` 408, and a request not answered within `timeout_s` of its arrival 503. A
request head not received within `header_timeout_s` gets 408 from the HTTP protocol itself
(`http_protocol`). Posted events persist in an `EventStore`.
The model loads before the port opens (a bad checkpoint stops the process); weights come from
safetensors, so loading executes no code. The default bind address is loopback only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from climber.runtime import release_memory
from climber.serve.command import ServeSettings
from climber.serve.engine import Engine, History, ScoreRequest, ScoreResult

log = logging.getLogger("climber.serve")


# ---- request bodies --------------------------------------------------------------------------
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: Int64  # raw item id
    time: Int64  # seconds, in the data's clock
    action: int = 0
    scenario: int = 0
    labels: dict[str, int] = Field(default_factory=dict)  # task -> 0/1; missing tasks are 0


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: list[Int64] = Field(min_length=1)  # raw item ids, at most max_candidates
    scenario: int = 0
    user: Int64 | None = None  # raw user id
    history: list[EventIn] | None = None  # overrides the stored history; [] = cold start
    req_time: Int64 | None = None  # default: now


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: Int64
    events: list[EventIn] = Field(min_length=1)  # at most max_history


# ---- response bodies (documentation: the OpenAPI schema; `score` returns a plain dict) -----------
class ScoreOut(BaseModel):
    user: int | None
    scenario: int
    tasks: list[str]
    items: list[int]  # the raw item ids, as requested, in the request's order
    # task -> one probability per item, in the order of `items`: columns, not one object per
    # item, so that 1,000 candidates cost a few list copies instead of 1,000 dicts
    probs: dict[str, list[float]]
    unknown_items: list[int]  # requested or history items the model does not know (scored as unknown)
    cache: str  # how the history was encoded: hit | miss | extend | recompute | bypass
    history_length: int


class ErrorOut(BaseModel):
    error: str
    detail: list | None = None


def _errors(*codes: int) -> dict:
    """OpenAPI entries for the JSON errors an endpoint answers."""
    return {c: {"model": ErrorOut} for c in codes}


def _error(status: int, message: str, detail: list | None = None, headers: dict | None = None) -> JSONResponse:
    body: dict = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _to_history(engine: Engine, events: list[EventIn]) -> tuple[History, list[int]]:
    """Validated events -> a History of raw item ids, and the raw item ids that are unknown."""
    cfg = engine.cfg
    for i, e in enumerate(events):
        if not 0 <= e.action < cfg.n_actions:
            raise HTTPException(422, f"event {i}: action {e.action} not in [0, {cfg.n_actions})")
        if not 0 <= e.scenario < cfg.n_scenarios:
            raise HTTPException(422, f"event {i}: scenario {e.scenario} not in [0, {cfg.n_scenarios})")
        bad = {k: v for k, v in e.labels.items() if k not in cfg.tasks or v not in (0, 1)}
        if bad:
            raise HTTPException(422, f"event {i}: labels {bad}: tasks are {list(cfg.tasks)}, values 0 or 1")
    raw = np.array([e.item for e in events], np.int64)
    unknown = engine.item_ids(raw)[1]
    labels = np.array([[e.labels.get(t, 0) for t in cfg.tasks] for e in events], np.int64).reshape(-1, len(cfg.tasks))
    h = History(raw, np.array([e.time for e in events], np.int64), np.array([e.action for e in events], np.int64),
                np.array([e.scenario for e in events], np.int64), labels)
    if (np.diff(h.time) < 0).any():
        raise HTTPException(422, "events must be in time order (oldest first)")
    return h, sorted(set(raw[unknown].tolist()))


# ---- metrics ----------------------------------------------------------------------------------
class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.latency = Histogram("climber_http_request_seconds", "HTTP request latency", ["path", "status"],
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10),
                                 registry=registry)
        self.batch_requests = Histogram("climber_batch_requests", "requests per model call",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.batch_candidates = Histogram("climber_batch_candidates", "candidates per model call",
                                          buckets=(1, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000), registry=registry)
        self.model_seconds = Histogram("climber_model_call_seconds", "duration of one batched model call",
                                       buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2),
                                       registry=registry)
        self.rejected = Counter("climber_rejected_requests", "score requests refused", ["reason"], registry=registry)
        self.queue_depth = Gauge("climber_queue_depth", "score requests admitted: waiting for or in a model call",
                                 registry=registry)


class EngineCollector(Collector):
    """Reads the engine's cache counters at scrape time (the engine itself knows no Prometheus)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        c = CounterMetricFamily("climber_cache_events", "user KV-cache outcomes: hit, miss, extend (new events "
                                "appended incrementally), recompute (a block window overflowed and that block was "
                                "prefilled again), bypass (explicit or anonymous history), evict", labels=["kind"])
        for kind in ("hit", "miss", "extend", "recompute", "bypass", "evict"):
            c.add_metric([kind], self.engine.stats[kind])
        yield c
        yield CounterMetricFamily("climber_cache_recomputed_blocks", "blocks prefilled again after a window overflow",
                                  value=self.engine.stats["recompute_blocks"])
        yield GaugeMetricFamily("climber_cache_bytes", "bytes of cached history tensors", value=self.engine.cache.bytes)
        yield GaugeMetricFamily("climber_cache_entries", "cached (user, scenario) histories",
                                value=len(self.engine.cache))


# ---- micro-batching ---------------------------------------------------------------------------
class Admission:
    """How many /score requests are admitted (queued or being scored), against `capacity`."""

    def __init__(self, capacity: int):
        self.capacity, self.admitted = capacity, 0

    def full(self) -> bool:
        return self.admitted >= self.capacity


class MicroBatcher:
    """A queue of score requests (bounded by admission), drained by one worker into batched model calls."""

    def __init__(self, run: Callable[[list[ScoreRequest]], list[ScoreResult]], executor: ThreadPoolExecutor,
                 settings: ServeSettings, metrics: Metrics):
        self.run, self.executor, self.settings, self.metrics = run, executor, settings, metrics
        self.queue: asyncio.Queue[tuple[ScoreRequest, asyncio.Future]] = asyncio.Queue()
        self.worked = False  # a model call ran since memory was last released

    async def submit(self, req: ScoreRequest, deadline: float) -> ScoreResult:
        """The request's result; raises TimeoutError at `deadline` (event loop clock)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put_nowait((req, fut))
        return await asyncio.wait_for(fut, deadline - loop.time())  # cancels fut on timeout

    async def _collect(self) -> list[tuple[ScoreRequest, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        try:  # after work, an idle second gives the memory of the last batches back to the OS
            first = await asyncio.wait_for(self.queue.get(), 1.0 if self.worked else None)
        except asyncio.TimeoutError:
            self.worked = False
            await loop.run_in_executor(self.executor, release_memory)
            first = await self.queue.get()
        batch = [first]
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(r, f) for r, f in batch if not f.done()]  # skip requests whose client timed out

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            reqs = [r for r, _ in batch]
            self.metrics.batch_requests.observe(len(reqs))
            self.metrics.batch_candidates.observe(sum(len(r.candidates) for r in reqs))
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run, reqs)
            except Exception as e:  # a failed model call fails its requests, not the worker
                log.exception("model call failed")
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.metrics.model_seconds.observe(time.perf_counter() - t0)
            self.worked = True
            for (_, f), res in zip(batch, results, strict=True):
                if not f.done():
                    f.set_result(res)


class Gate:
    """ASGI middleware that decides before any work is done: a Host header not in
    `allowed_hosts` (when any are given) gets 400, a missing or wrong bearer token 401, and /score
    is refused with 429 while `queue_size` requests are admitted, checked before the body is read
    (nothing is parsed) and again after. The body is then read whole: over `max_body_kb` it gets
    413, not received within `body_timeout_s` 408. An admitted request gets a deadline
    (`scope["state"]["deadline"]`, loop clock) of `timeout_s` from its arrival. Records every
    request's latency by path and status (499: the client left first), and tells the client its
    own in a `Server-Timing: app;dur=<ms>` header (arrival to response head: what a load
    generator cannot see, the server's share of its latency)."""

    PATHS = ("/score", "/events", "/healthz", "/readyz", "/metrics")

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics, admission: Admission,
                 token: str | None):
        self.app, self.settings, self.metrics, self.admission = app, settings, metrics, admission
        self.token = token.encode() if token else None
        self.guarded = {"/events"} | ({"/score", "/metrics"} if settings.auth_reads else set())
        self.hosts = frozenset(settings.allowed_hosts)

    def host_allowed(self, scope: Scope) -> bool:
        if not self.hosts:
            return True
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]  # [::1]:80, a:80
        return name in self.hosts

    def authorized(self, scope: Scope) -> bool:
        if self.token is None or scope["path"] not in self.guarded:
            return True
        scheme, _, credential = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(credential, self.token)

    async def read_body(self, receive: Receive) -> bytes | JSONResponse | None:
        """The whole body, a 413/408 reply, or None when the client left."""
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.settings.max_body_kb * 1024:
                return _error(413, f"request body larger than {self.settings.max_body_kb} KiB")
            more = msg.get("more_body", False)
        return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrival, t0 = asyncio.get_running_loop().time(), time.perf_counter()
        path, status, admitted = scope["path"], 499, False

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                took = f"app;dur={(time.perf_counter() - t0) * 1e3:.3f}".encode()
                msg = {**msg, "headers": [*msg.get("headers", []), (b"server-timing", took)]}
            await send(msg)

        async def reply(response: Response) -> None:
            await response(scope, receive, send_status)

        try:
            if not self.host_allowed(scope):
                self.metrics.rejected.labels("host").inc()
                return await reply(_error(400, "Host header not allowed (see --allowed-hosts)"))
            if not self.authorized(scope):
                self.metrics.rejected.labels("unauthorized").inc()
                return await reply(_error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}))
            if path == "/score" and self.admission.full():
                return await reply(self.overloaded())
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.settings.max_body_kb * 1024):
                return await reply(_error(413, f"request body larger than {self.settings.max_body_kb} KiB"))
            try:
                body = await asyncio.wait_for(self.read_body(receive), self.settings.body_timeout_s)
            except asyncio.TimeoutError:
                self.metrics.rejected.labels("body_timeout").inc()
                return await reply(_error(408, f"request body not received within {self.settings.body_timeout_s} s",
                                          headers={"Connection": "close"}))
            if body is None:
                return
            if isinstance(body, Response):
                return await reply(body)
            if path == "/score":
                if self.admission.full():
                    return await reply(self.overloaded())
                self.admission.admitted += 1
                admitted = True
            scope.setdefault("state", {})["deadline"] = arrival + self.settings.timeout_s
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # later calls wait for the client's disconnect

            await self.app(scope, replay, send_status)
        finally:
            self.admission.admitted -= admitted
            self.metrics.latency.labels(path if path in self.PATHS else "other", str(status)).observe(
                time.perf_counter() - t0)

    def overloaded(self) -> JSONResponse:
        self.metrics.rejected.labels("queue_full").inc()
        return _error(429, "overloaded: too many requests in progress, retry later", headers={"Retry-After": "1"})


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools if installed, else h11) with a deadline on request heads:
    a connection whose request line and headers are not complete `header_timeout_s` after it
    opened, or after its previous response, gets 408 and is closed. uvicorn closes idle keep-alive
    connections (no byte for 5 s) but waits forever on a head sent a byte at a time (slowloris),
    or on a connection that sends nothing at all, and such connections would use up
    `max_connections`. (Bodies are timed by the Gate.)"""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%s")
    body = b'{"error": "request head not received within %g s"}' % header_timeout_s
    reply = reply % (len(body), body)

    class HeadTimeout(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self.head_timer.cancel()
            super().connection_lost(exc)

        def arm_head_timer(self) -> None:
            # uvicorn sets self.cycle when a request head is complete, so an unchanged cycle at the
            # deadline means no new head arrived since the timer was armed
            if getattr(self, "head_timer", None):
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(header_timeout_s, self.head_timeout, self.cycle)

        def head_timeout(self, cycle: object) -> None:
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()

    return HeadTimeout


# ---- the app ----------------------------------------------------------------------------------
def build_app(load_engine: Callable[[], Engine], settings: ServeSettings | None = None,
              token: str | None = None) -> FastAPI:
    """The FastAPI app; `load_engine` runs at startup, in the model thread. With `token`, /events
    (and with `settings.auth_reads` also /score and /metrics) need `Authorization: Bearer <token>`."""
    settings = settings or ServeSettings()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    admission = Admission(settings.queue_size)
    metrics.queue_depth.set_function(lambda: admission.admitted)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="climber-model")
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await asyncio.get_running_loop().run_in_executor(executor, load_engine)
        registry.register(EngineCollector(engine))
        batcher = MicroBatcher(engine.score_requests, executor, settings, metrics)
        state.update(engine=engine, batcher=batcher, worker=asyncio.create_task(batcher.work()))
        # everything alive now (torch, the web stack, the engine: some 300k objects) lives as long
        # as the server: out of the collector's sight, a full collection walks only what requests
        # left behind (it took 90-190 ms with them, stalling the event loop and the model thread)
        gc.collect()
        gc.freeze()
        log.info("ready: %d blocks %s, %d layers, d=%d, seq_len=%d on %s", engine.cfg.n_blocks,
                 engine.cfg.strategies, engine.cfg.n_layers, engine.cfg.d_model, engine.cfg.seq_len, engine.device)
        yield
        gc.unfreeze()  # an app stopped in a process that goes on (tests, an embedding program)
        state["worker"].cancel()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Climber", summary="KV-cached SUMI ranking service", lifespan=lifespan)
    app.add_middleware(Gate, settings=settings, metrics=metrics, admission=admission, token=token)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _error(415, "send a JSON body with content-type: application/json", errors)
        if any(e["type"] == "json_invalid" for e in errors):
            return _error(400, "malformed JSON", errors)
        return _error(422, "invalid request body", errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    def check_scenario(scenario: int) -> None:
        n = state["engine"].cfg.n_scenarios
        if not 0 <= scenario < n:
            raise HTTPException(422, f"scenario {scenario} not in [0, {n})")

    common = (400, 408, 413, 415, 422) + ((401,) if token else ())

    @app.post("/score", responses={200: {"model": ScoreOut}, **_errors(*common, 429, 503)})
    async def score(body: ScoreIn, request: Request) -> dict:
        # returned as a dict, which FastAPI serialises in pydantic's core; validating it through
        # ScoreOut (response_model) would build 1,000 models a request: ScoreOut only documents it
        engine: Engine = state["engine"]
        if not 1 <= len(body.candidates) <= settings.max_candidates:
            raise HTTPException(422, f"need 1 to {settings.max_candidates} candidates, got {len(body.candidates)}")
        check_scenario(body.scenario)
        history, unknown = None, []
        if body.history is not None:
            if len(body.history) > settings.max_history:
                raise HTTPException(422, f"history longer than {settings.max_history} events")
            history, unknown = _to_history(engine, body.history)
            history = dataclasses.replace(history, item=engine.item_ids(history.item)[0])
        raw = np.array(body.candidates, np.int64)
        cand, cand_unknown = engine.item_ids(raw)
        req_time = body.req_time if body.req_time is not None else int(time.time())
        try:
            res = await state["batcher"].submit(ScoreRequest(cand, body.scenario, req_time, body.user, history),
                                                request.state.deadline)
        except asyncio.TimeoutError:
            metrics.rejected.labels("timeout").inc()
            raise HTTPException(503, f"not scored within {settings.timeout_s} s", {"Retry-After": "1"}) from None
        tasks = engine.cfg.tasks
        return {
            "user": body.user, "scenario": body.scenario, "tasks": list(tasks), "items": body.candidates,
            "probs": dict(zip(tasks, res.probs.T.tolist(), strict=True)),
            "unknown_items": sorted(set(unknown) | set(raw[cand_unknown].tolist())),
            "cache": res.cache, "history_length": res.history_length,
        }

    @app.post("/events", responses=_errors(*common, 409))
    async def events(body: EventsIn) -> dict:
        engine: Engine = state["engine"]
        if not 1 <= len(body.events) <= settings.max_history:
            raise HTTPException(422, f"need 1 to {settings.max_history} events, got {len(body.events)}")
        h, unknown = _to_history(engine, body.events)
        now = time.time()
        if h.time[-1] > now + settings.max_future_s:  # one such event would refuse the user's later ones (409)
            raise HTTPException(422, f"event time {int(h.time[-1])} is more than {settings.max_future_s} s after "
                                f"the server's clock ({int(now)})")
        try:
            n = engine.append_events(body.user, h)
        except ValueError as e:  # older than the stored history: appending would reorder it
            raise HTTPException(409, str(e)) from None
        return {"user": body.user, "appended": len(h), "history_length": n, "unknown_items": unknown}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses=_errors(503))
    async def readyz() -> JSONResponse:
        if state["worker"].done():
            return _error(503, "model worker stopped")
        if admission.full():
            return _error(503, "request queue full")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", response_class=PlainTextResponse, responses=_errors(401) if token else None)
    async def prometheus() -> Response:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ---- command line -----------------------------------------------------------------------------
