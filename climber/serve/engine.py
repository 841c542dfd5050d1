"""The KV-cached "single user, multiple items" serving engine (docs/paper.md sections 3.1 and 3.2).

A request is one user, one scenario and up to M candidates. The engine

1. extracts the user's multi-scale sub-sequences (MSE, section 2.1) from its history (the
   prepared data's events, then those posted while serving, kept in an `EventStore`) exactly
   as `SumiData.batch` does for training: per block, the last
   min(seq_len, '@n' cap) events its strategy selects, left-padded, latest event last;
2. prefills them once with `Climber.prefill` (every layer's history keys/values, all K blocks
   in one batched pass) and keeps the result in a byte-bounded LRU keyed by (user, scenario):
   the request scenario selects the temperature and bias tables, so a cache only holds for
   the scenario it was computed under;
3. scores all candidates against the cache in one `Climber.score` pass. Requests of several
   users are stacked into one batch, each cache left-padded to the longest; padding changes
   no score, since attention sees only relative positions, time gaps and the mask.

Incremental extension. History attention is causal and a token's keys/values do not depend
on its absolute position (positions enter only through the relative bias, computed at
attention time). So when events arrive, only the new tokens are computed: they run through
every layer attending to the cached keys/values, to the new tokens before them and to
themselves (`Climber.fold`), and their keys/values are appended to the blocks whose strategy
selects them ('recent' takes every event, 'pos:like' only liked ones). Blocks stay
right-aligned, so the relative distance between two real tokens, and from each token to the
candidate slot, equals that of a prefill from scratch. Events are not folded when posted: the
user's next request folds them in its candidate pass (one pass, new tokens and candidates
together; the candidates see the new tokens), so an event costs a few more rows in a pass that
runs anyway, not a pass of its own (docs/serving.md).

Exact extension is impossible once a block's window is full: the oldest event must leave,
and every later token's state depended on it. Blocks never interact before fusion, so only
the overflowing blocks are rebuilt, the others extended; a request that needed it counts as
`recompute`. A short window ('recent@16', full for any user with 16 events) is rebuilt by the
same fold, its whole window as the new tokens; a longer one (a full 'recent' block, a user with
seq_len events or more) by a prefill of the overflowing blocks alone, at full length for every
new event. On a GPU these calls are launch-bound (a prefill of 16 tokens launches as many
kernels as one of 800), so `use_cuda_graphs` replays the model calls from CUDA graphs
(`climber/serve/graphs.py`).

Users are keyed by raw id (users unknown to the training data get a history too); items are
mapped raw -> dense with the prepared data's `item_vocab` (dense = position + 2), unknown
items to the unknown id 1. A stored history is used whole, whatever the request time.

Bounded history. An event that no block window holds (per block, the last `caps[k]` events its
strategy selects) can never enter a window again, since windows only move forward; the store
forgets it, so a user keeps at most sum(caps) posted events and no score changes. Extension
stays exact: a forgotten new event implies a full window of later events in each block that
selects it, so that block overflows and is rebuilt from the events that are kept.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from climber import ops
from climber.checkpoint import check_vocabulary, load_model
from climber.config import parse_strategy
from climber.data.sumi import FIRST_ITEM, PAD_ITEM, UNKNOWN_ITEM, SumiData, strategy_selects
from climber.model import Climber, HistoryCache
from climber.serve.graphs import FOLD, Bucketed
from climber.serve.store import EventStore, History, SQLiteStore


def dense_ids(vocab: np.ndarray, raw: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids -> (dense ids = first + position in the sorted `vocab`, 0 where unknown; known mask)."""
    raw = np.asarray(raw, np.int64)
    if len(vocab) == 0:
        return np.zeros(raw.shape, np.int64), np.zeros(raw.shape, bool)
    pos = np.searchsorted(vocab, raw)
    known = vocab[np.minimum(pos, len(vocab) - 1)] == raw
    return np.where(known, pos + first, 0), known


class DataHistories:
    """Users' histories from the prepared data (read-only, memory-mapped; None: no data)."""

    def __init__(self, n_tasks: int, data: SumiData | None = None):
        self.n_tasks, self.data = n_tasks, data

    def __call__(self, user: int) -> History:
        lo, hi = self._span(user)
        if lo == hi:
            return History.empty(self.n_tasks)
        return History(*(np.asarray(self.data.a[k][lo:hi], np.int64)
                         for k in ("ev_item", "ev_time", "ev_action", "ev_scenario", "ev_labels")))

    def count(self, user: int) -> int:
        """len(self(user)), without reading the events: every cache hit asks it."""
        lo, hi = self._span(user)
        return int(hi - lo)

    def _span(self, user: int) -> tuple[int, int]:
        """The user's rows in the prepared event arrays (empty for an unknown user or no data)."""
        if self.data is None:
            return 0, 0
        a = self.data.a
        dense = int(dense_ids(np.asarray(a["user_vocab"]), np.array([user]), first=1)[0][0])
        return (0, 0) if dense == 0 else (int(a["user_offsets"][dense]), int(a["user_offsets"][dense + 1]))


@dataclass(frozen=True)
class CacheEntry:
    cache: HistoryCache  # batch of one user
    n_events: int  # the user's events (all ever, not only those kept) folded into `cache`
    nbytes: int


class ByteLRU:
    """Least-recently-used map of cache entries, evicting the oldest until their bytes fit."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[tuple[int, int], CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: tuple[int, int]) -> CacheEntry | None:
        entry = self._d.get(key)
        if entry is not None:
            self._d.move_to_end(key)
        return entry

    def put(self, key: tuple[int, int], entry: CacheEntry) -> int:
        """Insert (replacing) `entry`; returns how many entries were evicted. An entry larger than
        the whole budget is not kept: its request is served, the next one prefills again."""
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        if entry.nbytes > self.max_bytes:
            return 0
        self._d[key] = entry
        self.bytes += entry.nbytes
        evicted = 0
        while self.bytes > self.max_bytes:
            _, gone = self._d.popitem(last=False)
            self.bytes -= gone.nbytes
            evicted += 1
        return evicted


@dataclass(frozen=True)
class ScoreRequest:
    """One request. History: `history` when given, else the store's for `user`, else empty."""

    candidates: np.ndarray  # (M,) dense item ids
    scenario: int
    req_time: int
    user: int | None = None  # raw user id: store key, cache key and (mapped) user features
    history: History | None = None


@dataclass(frozen=True)
class ScoreResult:
    probs: np.ndarray  # (M, T) per-task probabilities
    cache: str  # how the history was encoded: hit | miss | extend | recompute | bypass
    history_length: int  # events in the history used


@dataclass(frozen=True)
class Fold:
    """New history events to fold into a batch's caches (`Climber.fold`): hist_* (B, K, n),
    right-aligned per block; the blocks rebuilt from their whole window (B, K); and the columns
    the result needs (one user's; `HistoryCache.last`)."""

    new: dict[str, torch.Tensor]
    reset: torch.Tensor
    width: int

    @staticmethod
    def stack(folds: list[Fold | None], K: int, device: torch.device) -> Fold:
        """One batch's fold: each request's, left-padded to the widest; None: nothing to fold."""
        real = [f for f in folds if f is not None]
        n = max(f.new["hist_mask"].shape[-1] for f in real)
        new = {}
        for k, v in real[0].new.items():
            rows = []
            for f in folds:
                x = f.new[k] if f is not None else torch.zeros_like(v[:, :, :1]).expand(1, K, 1, *v.shape[3:])
                pad = n - x.shape[2]
                rows.append(torch.cat([x.new_zeros(1, K, pad, *x.shape[3:]), x], 2) if pad else x)
            new[k] = torch.cat(rows)
        reset = torch.cat([f.reset if f is not None else torch.zeros(1, K, dtype=torch.bool, device=device)
                           for f in folds])
        return Fold(new, reset, max(f.width for f in real))


class Engine:
    """Model + histories (prepared data, then an event store) + LRU of prefilled histories. Not
    thread-safe: one worker calls `score_requests`; `append_events` may be called from any thread."""

    def __init__(self, model: Climber, store: EventStore, item_vocab: np.ndarray, user_vocab: np.ndarray,
                 cache_bytes: int = 1 << 30, data: SumiData | None = None):
        self.model = model.eval()
        self.calls: Climber | Bucketed = self.model  # prefill, score and fold go through this
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.store, self.base = store, DataHistories(len(self.cfg.tasks), data)
        self._append_lock = threading.Lock()  # check-then-write of one user's events
        self.item_vocab, self.user_vocab = np.asarray(item_vocab), np.asarray(user_vocab)
        self.cache = ByteLRU(cache_bytes)
        # requests by outcome (hit, miss, extend, recompute, bypass), plus evict, recompute_blocks, user_evict
        self.stats: Counter[str] = Counter()
        seq_len = self.cfg.seq_len
        self.caps = np.array([min(seq_len, parse_strategy(s)[2] or seq_len) for s in self.cfg.strategies])

    @classmethod
    def from_checkpoint(cls, ckpt_dir: Path, data_dir: Path | None = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, cache_bytes: int = 1 << 30,
                        store: str | Path = ":memory:", max_users: int = 1_000_000) -> Engine:
        """Weights from `ckpt_dir` (safetensors, no code executed); id maps and histories from the
        prepared data (default: the directory recorded in its config.json), then from the SQLite
        event store at `store` (default: in memory, lost with the process)."""
        model, config = load_model(ckpt_dir)
        if not isinstance(model, Climber):  # baselines have no prefill / score split
            raise ValueError(f"{ckpt_dir}: arch {config['model'].get('arch')!r} cannot be served; only Climber can")
        data = SumiData(Path(data_dir or config["data"]))
        check_vocabulary(config, data.vocab, ckpt_dir, data.root)
        model = model.to(device=device, dtype=dtype)
        model.attention = ops.backend("auto", device)  # the Triton kernels on a GPU
        return cls(model, SQLiteStore(store, tuple(data.tasks), max_users), data.a["item_vocab"],
                   data.a["user_vocab"], cache_bytes, data)

    def use_cuda_graphs(self, max_batch: int, max_candidates: int, cuda_graphs: bool = True) -> int:
        """Run the model calls padded to shape buckets from now on (`climber/serve/graphs.py`), up
        to `max_batch` requests of `max_candidates`: replayed from CUDA graphs, the common buckets
        captured now (`cuda_graphs`, on a GPU), else eagerly, which is how the tests check the
        padding on a CPU. Returns how many graphs were captured."""
        self.calls = Bucketed(self.model, max_batch, max_candidates, cuda_graphs)
        return self.calls.warm() if cuda_graphs else 0

    # ---- ids ----------------------------------------------------------------------------------
    def item_ids(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw item ids -> (dense ids, unknown ones mapped to 1; unknown mask)."""
        dense, known = dense_ids(self.item_vocab, raw, FIRST_ITEM)
        return np.where(known, dense, UNKNOWN_ITEM), ~known

    def user_id(self, raw: int | None) -> int:
        """Raw user id -> dense id for the user-feature table (0 = unknown)."""
        return 0 if raw is None else int(dense_ids(self.user_vocab, np.array([raw]), first=1)[0][0])

    # ---- the three model operations ---------------------------------------------------------
    def _selects(self, h: History) -> np.ndarray:
        """(n, K) bool: which blocks' extraction strategies select each event (as SumiData does)."""
        return np.stack([strategy_selects(s, self.cfg.tasks, h.labels, h.scenario, h.action)
                         for s in self.cfg.strategies], axis=1)

    def windows(self, h: History) -> list[np.ndarray]:
        """Per block, the positions in `h` of the events its window holds: the last `caps[k]` its
        extraction strategy selects."""
        sel = self._selects(h)
        return [np.flatnonzero(sel[:, k])[-cap:] for k, cap in enumerate(self.caps)]

    def history_inputs(self, h: History) -> dict[str, torch.Tensor]:
        """hist_* model inputs (1, K, L): per block its window of `h`, left-padded to L = the
        longest block (at least one column), as `SumiData.batch` builds."""
        return self._inputs(h, self.windows(h))

    def _inputs(self, h: History, windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """hist_* (1, K, L) of the events of `h` at each block's positions, right-aligned."""
        L = max(1, *(len(w) for w in windows))
        idx = np.zeros((len(windows), L), np.int64)
        valid = np.zeros((len(windows), L), bool)
        for k, w in enumerate(windows):
            idx[k, L - len(w):] = w
            valid[k, L - len(w):] = True

        def take(col: np.ndarray) -> torch.Tensor:
            out = np.zeros(idx.shape + col.shape[1:], np.int64)  # 0 = PAD_ITEM, and no action/label
            out[valid] = col[idx[valid]]
            return torch.from_numpy(out)[None].to(self.device)

        return {"hist_item": take(h.item), "hist_time": take(h.time), "hist_action": take(h.action),
                "hist_scenario": take(h.scenario), "hist_labels": take(h.labels),
                "hist_mask": torch.from_numpy(valid)[None].to(self.device)}

    @torch.inference_mode()
    def prefill(self, history: History, scenario: int, user: int = 0) -> HistoryCache:
        """Encode a history once for request scenario `scenario` (`user`: dense id, for features)."""
        b = self.history_inputs(history)
        b["req_scenario"] = torch.tensor([scenario], device=self.device)
        b["user"] = torch.tensor([user], device=self.device)
        return self.calls.prefill(b)

    @torch.inference_mode()
    def score(self, cache: HistoryCache, candidates: torch.Tensor, req_time: torch.Tensor) -> torch.Tensor:
        """Per-task probabilities (B, M, T) for dense candidate ids (B, M) at request times (B,)."""
        return torch.sigmoid(self.calls.score(cache, candidates, req_time).float())

    @torch.inference_mode()
    def extend(self, cache: HistoryCache, history: History, n_new: int) -> tuple[HistoryCache, int]:
        """`cache` (one user), which encodes history[:-n_new], brought up to all of `history` on
        its own (the server folds new events into the next candidate pass instead,
        `score_requests`). Returns (the cache, how many blocks were recomputed)."""
        cache, fold, redone = self.catch_up(cache, history, n_new)
        if fold is not None:
            _, cache = self.calls.fold(cache, fold.new, fold.reset)
            cache = cache.last(fold.width)
        return cache, redone

    def catch_up(self, cache: HistoryCache, history: History, n_new: int) -> tuple[HistoryCache, Fold | None, int]:
        """What brings `cache` (one user), which encodes history[:-n_new], up to all of `history`.

        A block's new events are folded in (`Climber.fold`, a pass over the new tokens only) when
        its window has room for them; a block whose window overflows must be rebuilt (exactness
        needs every later token's state without the events that leave), by the same fold when
        the window is at most `FOLD` events ('recent@16'), else by a prefill of those blocks
        alone, done here, as is a block given more than `FOLD` new events at once. Returns (the
        cache after those prefills, the fold left to run or None, how many blocks overflowed)."""
        new = history[len(history) - n_new:]
        added = self._selects(new).sum(0)  # (K,) new events per block
        counts = cache.hist_mask[0].sum(-1).cpu().numpy()  # (K,) events per block
        overflow = counts + added > self.caps
        reset = overflow & (self.caps <= FOLD)
        prefill = (overflow & ~reset) | (~overflow & (added > FOLD))
        windows = self.windows(history)
        if prefill.any():
            b = self._inputs(history, [w if p else w[:0] for w, p in zip(windows, prefill, strict=True)])
            b["req_scenario"], b["user"] = cache.scenario, cache.user
            fresh = self.calls.prefill(b)  # the other blocks are empty, their rows padding
            cache = cache.replace_blocks(fresh, torch.from_numpy(prefill).to(self.device)[None])
        # what the fold carries per block: nothing for a block just prefilled, the whole window of
        # a block rebuilt, the new events of a block with room
        rows = [w[:0] if p else w if r else w[len(w) - a:]
                for w, a, r, p in zip(windows, added, reset, prefill, strict=True)]
        if not any(len(w) for w in rows):
            return cache, None, int(overflow.sum())
        fold = Fold(self._inputs(history, rows), torch.from_numpy(reset).to(self.device)[None],
                    max(1, *(len(w) for w in windows)))  # then each block holds its window of `history`
        return cache, fold, int(overflow.sum())

    # ---- histories --------------------------------------------------------------------------
    def in_windows(self, h: History) -> np.ndarray:
        """(n,) bool: the events of `h` that some block window holds (the only ones a score reads)."""
        sel = self._selects(h)
        keep = np.zeros(len(h), bool)
        for k, cap in enumerate(self.caps):
            keep[np.flatnonzero(sel[:, k])[-cap:]] = True
        return keep

    def history(self, user: int) -> tuple[History, np.ndarray, int]:
        """The user's events that some block window holds (prepared data, then posted; dense item
        ids), their positions among all the user's events, and how many events it has had."""
        base, stored = self.base(user), self.store.load(user)
        h = History.concat([base, dataclasses.replace(stored.events, item=self.item_ids(stored.events.item)[0])])
        seq = np.concatenate([np.arange(len(base)), len(base) + stored.seq])
        keep = self.in_windows(h)
        return h[keep], seq[keep], len(base) + stored.count

    def count(self, user: int) -> int:
        """How many events the user has had (prepared data and posted)."""
        return self.base.count(user) + self.store.count(user)

    def append_events(self, user: int, events: History) -> int:
        """Append time-ordered events (raw item ids), none older than the user's last, and forget
        the user's events that no block window holds any more. Caches catch up on the user's next
        request. Returns the user's event count."""
        if (np.diff(events.time) < 0).any():
            raise ValueError("events are not in time order")
        with self._append_lock:
            base, stored = self.base(user), self.store.load(user)
            last = stored.last_time if stored.last_time is not None else base.time[-1] if len(base) else None
            if last is not None and len(events) and events.time[0] < last:
                raise ValueError(f"event time {int(events.time[0])} is before user {user}'s last event ({int(last)})")
            if not len(events):
                return len(base) + stored.count
            # windows depend on labels, scenarios and actions only, so raw and dense items mix here
            keep = self.in_windows(History.concat([base, stored.events, events]))[len(base):]
            seq = np.concatenate([stored.seq, stored.count + np.arange(len(events))])
            self.stats["user_evict"] += self.store.append(user, events, drop=seq[~keep])
            return len(base) + stored.count + len(events)

    # ---- requests -----------------------------------------------------------------------------

    def _user_cache(self, r: ScoreRequest) -> tuple[HistoryCache, str, int, tuple | None]:
        """The request's prefilled history: from the LRU (hit), built (miss), or to be brought up
        to date with the user's new events (extend, or recompute when a block window overflowed):
        then the returned cache is the cached one and the fold that updates it, with the key and
        event count to store the result under, runs with the candidate pass."""
        user = self.user_id(r.user)
        if r.history is not None or r.user is None:  # explicit or anonymous history: not cached
            h = r.history if r.history is not None else History.empty(len(self.cfg.tasks))
            self.stats["bypass"] += 1
            return self.prefill(h, r.scenario, user), "bypass", len(h), None
        # a prefill depends on the request scenario only through the ATL's per-scenario temperature
        # and bias; a model without them (climber-shared-tau, the MSE-only ablation) keeps one cache
        # per user, which the request's scenario is then set on (its candidates' embedding)
        shared = not (self.cfg.adaptive and self.cfg.scenario_adaptive)
        key = (r.user, None if shared else r.scenario)
        entry = self.cache.get(key)
        if entry is not None and shared:
            entry = dataclasses.replace(entry, cache=dataclasses.replace(
                entry.cache, scenario=torch.full_like(entry.cache.scenario, r.scenario)))
        if entry is not None and self.count(r.user) == entry.n_events:
            self.stats["hit"] += 1
            return entry.cache, "hit", entry.n_events, None
        h, seq, n = self.history(r.user)
        pending = None
        if entry is None:
            status, cache = "miss", self.prefill(h, r.scenario, user)
        else:
            cache, fold, redone = self.catch_up(entry.cache, h, int((seq >= entry.n_events).sum()))
            status = "recompute" if redone else "extend"
            self.stats["recompute_blocks"] += redone
            if fold is not None:
                pending = (fold, key, n)
        self.stats[status] += 1
        if pending is None:
            self._store(key, cache, n)
        return cache, status, n, pending

    def _store(self, key: tuple, cache: HistoryCache, n: int) -> None:
        self.stats["evict"] += self.cache.put(key, CacheEntry(cache, n, cache.nbytes))

    @torch.inference_mode()
    def score_requests(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Score several users' requests in one batched candidate pass."""
        got = [self._user_cache(r) for r in requests]
        M = max(len(r.candidates) for r in requests)
        cand = np.full((len(requests), M), PAD_ITEM, np.int64)  # padding slots are scored and dropped
        for i, r in enumerate(requests):
            cand[i, :len(r.candidates)] = r.candidates
        req_time = torch.tensor([r.req_time for r in requests], device=self.device)
        cache, cand_t = HistoryCache.stack([c for c, _, _, _ in got]), torch.from_numpy(cand).to(self.device)
        pending = [(i, p) for i, (_, _, _, p) in enumerate(got) if p is not None]
        if not pending:
            logits = self.calls.score(cache, cand_t, req_time)
        else:  # new events folded into the candidate pass: one pass, and the caches brought up to date
            fold = Fold.stack([p[0] if p is not None else None for _, _, _, p in got], self.cfg.n_blocks, self.device)
            logits, folded = self.calls.fold(cache, fold.new, fold.reset, cand_t, req_time)
            for i, (f, key, n) in pending:  # a row is copied out: the entry holds only its own columns
                c = folded.last(f.width)
                self._store(key, c if len(got) == 1 else c.row(i), n)
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        return [ScoreResult(probs[i, :len(r.candidates)], status, n)
                for i, (r, (_, status, n, _)) in enumerate(zip(requests, got, strict=True))]
