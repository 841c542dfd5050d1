"""The serving engine's model calls padded to shape buckets and replayed from CUDA graphs
(docs/paper.md section 3.2; docs/serving.md says why).

At serving sizes a model call is launch-bound on a GPU: a candidate pass of 12 layers is a few
hundred small kernels, and at L = 800, d = 256 and 1,000 candidates the host takes longer to
launch them than the GPU to run them (7.9 ms eager, 2.6 ms as one graph on an H200). A CUDA graph
replays a captured call's kernels with one launch, but only at the shapes and addresses it was
captured with. So `Bucketed` pads each call up to a bucket, copies its inputs into that bucket's
static buffers, replays the bucket's graph and slices the output back:

* `score`: batch B, candidates M and cached history length L, each to the next power of two
  (at least `FLOOR` for M and L), capped at the server's max batch, its max candidates and the
  model's longest block window (seq_len; no cache is wider);
* `fold` (new history events, `FOLD` rows per block, with a candidate pass or alone): as `score`,
  with no candidates for a fold alone;
* `prefill` (one user, as the engine calls it): history length L.

Padding changes no score. Histories are left-padded and attention sees only relative positions,
time gaps and the mask, so masked columns before a history change nothing (`HistoryCache.stack`
pads the same way); batch rows and candidates never see each other, so padding rows and columns
(left holding whatever an earlier call put there, always finite: each buffer only ever holds
one field's values) touch no real row, and none of them is NaN (a candidate always sees itself,
and the match and pooled readouts define an empty history as 0).

The same padded calls run without graphs (`cuda_graphs=False`), which is how the CPU tests check
the padding. Graphs are captured on first use of a bucket; `warm` captures the common ones (every
batch and length bucket at the largest candidate bucket, every prefill bucket, and one user's
fold at every length bucket, with the largest candidate bucket and alone) before
the server opens its port, so only unusual shapes pay a capture (a few eager calls) when they
first come. The buckets of one call share their input buffers (views of one buffer sized for the
largest), and all graphs share one memory pool; that is safe because calls run one at a time on
one stream and each output is copied out before the next replay.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from climber.model import Climber, HistoryCache

log = logging.getLogger("climber.serve")

FLOOR = 16  # smallest candidate and history bucket: below it padding costs a GPU nothing
FOLD = 16  # new history tokens per block one fold carries (more, or a longer window to rebuild: a prefill)
WARMUP = 2  # eager calls on a side stream before a capture (lazy initialisation, Triton's compiles)


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The smallest power of two >= n and >= floor, at most `cap` (n <= cap)."""
    return min(cap, max(floor, 1 << (n - 1).bit_length()))


def buckets(cap: int, floor: int = 1) -> list[int]:
    """Every bucket up to `cap`, largest first."""
    return sorted({bucket(n, cap, floor) for n in (1 << i for i in range(cap.bit_length() + 1)) if n <= cap} | {cap},
                  reverse=True)


def _put(dst: HistoryCache, src: HistoryCache) -> None:
    """Copy `src` (b rows, L columns) into the first b rows of `dst` (L or more columns), right-aligned:
    the columns before it become padding."""
    b, L = src.hist_mask.shape[0], src.hist_mask.shape[-1]
    dst.hist_mask[:b, :, :-L] = False
    dst.hist_mask[:b, :, -L:] = src.hist_mask
    dst.hist_time[:b, :, -L:] = src.hist_time
    dst.kv[:, :, :b, :, :, -L:] = src.kv
    dst.scenario[:b], dst.user[:b], dst.hist_sum[:b] = src.scenario, src.user, src.hist_sum


def _cut(c: HistoryCache, L: int, B: int = 1) -> HistoryCache:
    """A fresh copy of the first B rows and last L columns of a graph's output cache (its memory is
    reused by the next replay)."""
    c = c.last(L)
    return HistoryCache(c.kv[:, :, :B].clone(), c.hist_mask[:B].clone(), c.hist_time[:B].clone(),
                        c.scenario[:B].clone(), c.user[:B].clone(), c.hist_sum[:B].clone())


class Bucketed:
    """`Climber.prefill`, `score` and `fold` with the same arguments and results (fresh tensors),
    run padded to shape buckets: replayed from CUDA graphs with `cuda_graphs`, else eagerly. Calls
    beyond the caps (or of several users, for prefill) run unpadded on the model."""

    def __init__(self, model: Climber, max_batch: int, max_candidates: int, cuda_graphs: bool):
        p = next(model.parameters())
        if cuda_graphs and p.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {p.device}")
        self.model, self.device, self.dtype = model, p.device, p.dtype
        self.max_batch, self.max_candidates, self.max_len = max_batch, max_candidates, model.cfg.seq_len
        self.cuda_graphs = cuda_graphs
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.side = torch.cuda.Stream(self.device) if cuda_graphs else None  # where captures warm up
        self._buffers: dict[str, torch.Tensor] = {}
        self._calls: dict[tuple, tuple[dict, Callable[[], object]]] = {}  # bucket -> (static inputs, run)

    # ---- the three calls --------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, cache: HistoryCache, cand_item: torch.Tensor, req_time: torch.Tensor) -> torch.Tensor:
        (B, M), L = cand_item.shape, cache.hist_mask.shape[-1]
        if B > self.max_batch or M > self.max_candidates or L > self.max_len:
            return self.model.score(cache, cand_item, req_time)
        x, run = self._call("score", bucket(B, self.max_batch), bucket(M, self.max_candidates, FLOOR),
                            bucket(L, self.max_len, FLOOR))
        _put(x["cache"], cache)
        x["cand_item"][:B, :M] = cand_item
        x["req_time"][:B] = req_time
        return run()[:B, :M].clone()

    @torch.inference_mode()
    def prefill(self, b: dict) -> HistoryCache:
        B, _, L = b["hist_mask"].shape
        if B > 1 or L > self.max_len:
            return self.model.prefill(b)
        x, run = self._call("prefill", 1, 1, bucket(L, self.max_len, FLOOR))
        x["hist_mask"][..., :-L] = False
        for k, v in b.items():
            if k.startswith("hist_"):
                x[k][:, :, -L:] = v
        x["req_scenario"][:], x["user"][:] = b["req_scenario"], b["user"]
        return _cut(run(), L)

    @torch.inference_mode()
    def fold(self, cache: HistoryCache, new: dict, reset: torch.Tensor, cand_item: torch.Tensor | None = None,
             req_time: torch.Tensor | None = None) -> tuple[torch.Tensor | None, HistoryCache]:
        B, _, L = cache.hist_mask.shape
        n = new["hist_mask"].shape[-1]
        M = 0 if cand_item is None else cand_item.shape[1]
        if B > self.max_batch or M > self.max_candidates or L > self.max_len or n > FOLD:
            return self.model.fold(cache, new, reset, cand_item, req_time)
        Bb = bucket(B, self.max_batch)
        x, run = self._call("fold", Bb, bucket(M, self.max_candidates, FLOOR) if M else 0,
                            bucket(L, self.max_len, FLOOR))
        _put(x["cache"], cache)
        x["hist_mask"][:B, :, :-n] = False  # the new tokens right-aligned in FOLD rows
        for k, v in new.items():
            x[k][:B, :, -n:] = v
        x["reset"][:B] = reset
        x["reset"][B:] = False
        if M:
            x["cand_item"][:B, :M] = cand_item
            x["req_time"][:B] = req_time
        logits, folded = run()
        return None if not M else logits[:B, :M].clone(), _cut(folded, L + n, B)

    # ---- buckets ------------------------------------------------------------------------------
    @torch.inference_mode()
    def warm(self) -> int:
        """Capture the common buckets now, largest first; returns how many graphs there are."""
        t0 = time.perf_counter()
        M = bucket(self.max_candidates, self.max_candidates, FLOOR)
        for L in buckets(self.max_len, FLOOR):
            for B in buckets(self.max_batch):
                self._call("score", B, M, L)
            self._call("prefill", 1, 1, L)
            self._call("fold", 1, 0, L)  # new events alone
            self._call("fold", 1, M, L)  # new events in a candidate pass, one user's
        log.info("%d CUDA graphs captured in %.1f s", len(self._calls), time.perf_counter() - t0)
        return len(self._calls)

    def _call(self, kind: str, B: int, M: int, L: int) -> tuple[dict, Callable[[], object]]:
        """The bucket's static inputs and the call that runs the model on them (a graph's replay)."""
        key = (kind, B, M, L)
        if key not in self._calls:
            x = self._inputs(kind, B, M, L)
            m = self.model
            fn = {"score": lambda: m.score(x["cache"], x["cand_item"], x["req_time"]),
                  "prefill": lambda: m.prefill(x),
                  "fold": lambda: m.fold(x["cache"], {k: v for k, v in x.items() if k.startswith("hist_")},
                                         x["reset"], x.get("cand_item"), x.get("req_time"))}[kind]
            self._calls[key] = x, self._capture(fn) if self.cuda_graphs else fn
        return self._calls[key]

    def _capture(self, fn: Callable[[], object]) -> Callable[[], object]:
        """A CUDA graph of `fn`, warmed up on a side stream first (PyTorch's CUDA graphs recipe)."""
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for _ in range(WARMUP):
                fn()
        torch.cuda.current_stream().wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()

        def replay() -> object:
            graph.replay()
            return out

        return replay

    def _inputs(self, kind: str, B: int, M: int, L: int) -> dict:
        """Static inputs of one bucket: views of buffers sized for the kind's largest bucket."""
        cfg, dev = self.model.cfg, self.device
        K, H, T = cfg.n_blocks, cfg.n_heads, len(cfg.tasks)
        Bc, Mc = (self.max_batch, self.max_candidates) if kind in ("score", "fold") else (1, 1)

        def buf(name: str, shape: tuple[int, ...], dtype: torch.dtype, cap: tuple[int, ...]) -> torch.Tensor:
            name = f"{'cache' if kind in ('score', 'fold') else kind}.{name}"  # score and fold share inputs
            if name not in self._buffers:  # zeros: padding never reads uninitialised memory
                self._buffers[name] = torch.zeros(math.prod(cap), dtype=dtype, device=dev)
            return self._buffers[name][:math.prod(shape)].view(shape)

        def per_token(name: str, dtype: torch.dtype, *tail: int) -> torch.Tensor:  # (B, K, L, *tail)
            return buf(name, (B, K, L, *tail), dtype, (Bc, K, self.max_len, *tail))

        x: dict = {}
        if kind in ("score", "fold"):
            nl, dh = cfg.n_layers, cfg.d_model // H
            kv = buf("kv", (nl, 2, B, K, H, L, dh), self.dtype, (nl, 2, Bc, K, H, self.max_len, dh))
            x["cache"] = HistoryCache(kv, per_token("mask", torch.bool),
                                      per_token("time", torch.long), buf("scenario", (B,), torch.long, (Bc,)),
                                      buf("user", (B,), torch.long, (Bc,)),
                                      buf("hist_sum", (B, K, cfg.d_model), self.dtype, (Bc, K, cfg.d_model)))
        if kind == "score" or (kind == "fold" and M):  # a fold alone has no candidates
            x["cand_item"] = buf("cand", (B, M), torch.long, (Bc, Mc))
            x["req_time"] = buf("req_time", (B,), torch.long, (Bc,))
        if kind == "prefill":
            x.update({f"hist_{f}": per_token(f, torch.long) for f in ("item", "time", "action", "scenario")})
            x.update(hist_labels=per_token("labels", torch.long, T), hist_mask=per_token("mask", torch.bool),
                     req_scenario=buf("req_scenario", (1,), torch.long, (1,)), user=buf("user", (1,), torch.long, (1,)))
        if kind == "fold":  # FOLD rows of new events per block, and the blocks rebuilt from them
            x.update({f"hist_{f}": buf(f"new_{f}", (B, K, FOLD), torch.long, (Bc, K, FOLD))
                      for f in ("item", "time", "action", "scenario")})
            x["hist_labels"] = buf("new_labels", (B, K, FOLD, T), torch.long, (Bc, K, FOLD, T))
            x["hist_mask"] = buf("new_mask", (B, K, FOLD), torch.bool, (Bc, K, FOLD))
            x["reset"] = buf("reset", (B, K), torch.bool, (Bc, K))
        return x
