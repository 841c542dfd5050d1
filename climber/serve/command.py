"""`climber serve`: its settings and command line (docs/paper.md section 3.2).

Kept apart from `app.py` so that every other `climber` command runs without importing the
web stack (FastAPI, uvicorn), e.g. on a GPU box that has only torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from climber.config import add_dataclass_flags, pick_fields
from climber.extras import require

# the [serve] extra (pyproject.toml): what climber/serve/app.py imports
WEB_STACK = ("fastapi", "uvicorn", "pydantic", "starlette", "prometheus_client")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the HTTP service (the model's own shape comes from the checkpoint)."""

    max_candidates: int = 1000  # per /score request
    max_history: int = 10_000  # events in an explicit history or in one /events post
    max_batch: int = 32  # requests per model call
    max_wait_ms: float = 2.0  # how long the worker waits for more requests after the first
    queue_size: int = 256  # /score requests admitted (waiting or being scored); beyond: 429 before parsing
    timeout_s: float = 5.0  # a /score request not answered this long after it arrived: 503
    max_body_kb: int = 1024  # larger request bodies: 413
    body_timeout_s: float = 10.0  # a request body not received by then: 408
    header_timeout_s: float = 10.0  # a request head not in by then (from connecting or the last reply): 408, closed
    allowed_hosts: tuple[str, ...] = ()  # Host names served (else 400); none given: loopback names if bound to loopback
    max_connections: int = 1000  # open connections; beyond: 503 (and the open-file limit is raised to fit)
    auth_reads: bool = False  # with a token (CLIMBER_TOKEN), /score and /metrics need it too, not only /events
    cache_mb: float = 1024.0  # user KV-cache budget, bytes of cached tensors
    max_users: int = 1_000_000  # users with posted events in the store; beyond: the least recently written goes
    max_future_s: float = 300.0  # posted events later than the server's clock + this: 422
    cuda_graphs: bool = False  # on a GPU, replay the model calls from CUDA graphs captured at start-up (opt-in)

    def __post_init__(self) -> None:
        if min(self.max_candidates, self.max_history, self.max_batch, self.queue_size, self.max_body_kb,
               self.max_users, self.max_connections) < 1:
            raise ValueError("serve limits must be positive")
        if min(self.max_wait_ms, self.cache_mb, self.max_future_s) < 0 or min(
                self.timeout_s, self.body_timeout_s, self.header_timeout_s) <= 0:
            raise ValueError("max_wait_ms, cache_mb and max_future_s must be >= 0, the timeouts > 0")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))  # argparse: a list


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return host == "localhost"


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token: anyone who reaches the port could
    rewrite any user's history."""
    if token is not None and len(token) < 16:
        raise ValueError("CLIMBER_TOKEN must be at least 16 characters (e.g. python -c 'import secrets; "
                         "print(secrets.token_urlsafe())')")
    if not is_loopback(host) and token is None:
        raise ValueError(f"--host {host} is reachable from other machines: set CLIMBER_TOKEN to a secret "
                         "(clients then send 'Authorization: Bearer <token>'), or bind 127.0.0.1")


def raise_open_files(connections: int) -> None:
    """Lift the soft open-file limit to fit `connections` sockets plus the process's own files, so a
    flood of connections gets 503s (uvicorn's limit_concurrency) instead of accept() failing with EMFILE."""
    need = connections + 128
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ValueError(f"--max-connections {connections} needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory, e.g. runs/x/best")
    p.add_argument("--data", type=Path, help="prepared data (default: the one the checkpoint was trained on)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--store", default="climber-events.sqlite",
                   help="SQLite file of the events posted to /events, kept across restarts (:memory: keeps none)")
    add_dataclass_flags(p, ServeSettings)
    p.set_defaults(fn=cmd_serve)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """`climber serve`: call with the CLI's subparsers object."""
    add_serve_arguments(subparsers.add_parser("serve", help="serve a checkpoint over HTTP (KV-cached SUMI scoring)"))


def cmd_serve(ns: argparse.Namespace) -> None:
    # the web stack is imported only here, so the rest of the CLI runs without it
    for module in WEB_STACK:
        require(module, "serve", "climber serve", package=module.replace("_", "-"))
    import torch
    import uvicorn

    from climber.runtime import resolve_device
    from climber.serve.app import build_app, http_protocol
    from climber.serve.engine import Engine

    settings = ServeSettings(**pick_fields(ns, ServeSettings))
    if not settings.allowed_hosts and is_loopback(ns.host):
        settings = dataclasses.replace(settings, allowed_hosts=LOOPBACK_NAMES)
    token = os.environ.get("CLIMBER_TOKEN")  # not a flag: command lines are visible to every local user
    check_bind(ns.host, token)
    raise_open_files(settings.max_connections)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ns.dtype]
    device = resolve_device(ns.device)

    # loaded before the server starts, so a bad checkpoint or data path is a one-line error
    engine = Engine.from_checkpoint(ns.checkpoint, ns.data, device, dtype, int(settings.cache_mb * 2**20),
                                    ns.store, settings.max_users)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if device.type == "cuda" and settings.cuda_graphs:  # captured here, so no request waits for a capture
        engine.use_cuda_graphs(settings.max_batch, settings.max_candidates)
    # no access log: one line per request costs more than scoring a small request
    uvicorn.run(build_app(lambda: engine, settings, token), host=ns.host, port=ns.port, access_log=False,
                limit_concurrency=settings.max_connections, http=http_protocol(settings.header_timeout_s))
