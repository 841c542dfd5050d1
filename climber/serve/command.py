"""`climber serve`: its settings and command line (docs/paper.md section 3.2).

Kept apart from `app.py` so that every other `climber` command runs without importing the
web stack (FastAPI, uvicorn), e.g. on a GPU box that has only torch.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from climber.config import add_dataclass_flags, pick_fields


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the HTTP service (the model's own shape comes from the checkpoint)."""

    max_candidates: int = 1000  # per /score request
    max_history: int = 10_000  # events in an explicit history or in one /events post
    max_batch: int = 32  # requests per model call
    max_wait_ms: float = 2.0  # how long the worker waits for more requests after the first
    queue_size: int = 256  # waiting /score requests; beyond it: 429
    timeout_s: float = 5.0  # a /score request not answered by then: 503
    max_body_kb: int = 1024  # larger request bodies: 413
    cache_mb: float = 1024.0  # user KV-cache budget, bytes of cached tensors
    max_users: int = 1_000_000  # users with posted events in the store; beyond: the least recently written goes
    max_future_s: float = 300.0  # posted events later than the server's clock + this: 422

    def __post_init__(self) -> None:
        if min(self.max_candidates, self.max_history, self.max_batch, self.queue_size, self.max_body_kb,
               self.max_users) < 1:
            raise ValueError("serve limits must be positive")
        if min(self.max_wait_ms, self.cache_mb, self.max_future_s) < 0 or self.timeout_s <= 0:
            raise ValueError("max_wait_ms, cache_mb and max_future_s must be >= 0, timeout_s > 0")


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
    import uvicorn

    from climber.runtime import resolve_device
    from climber.serve.app import build_app
    from climber.serve.engine import Engine

    settings = ServeSettings(**pick_fields(ns, ServeSettings))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ns.dtype]
    device = resolve_device(ns.device)

    # loaded before the server starts, so a bad checkpoint or data path is a one-line error
    engine = Engine.from_checkpoint(ns.checkpoint, ns.data, device, dtype, int(settings.cache_mb * 2**20),
                                    ns.store, settings.max_users)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # no access log: one line per request costs more than scoring a small request
    uvicorn.run(build_app(lambda: engine, settings), host=ns.host, port=ns.port, access_log=False)
