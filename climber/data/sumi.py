"""SUMI samples: "single user, multiple items" (docs/paper.md section 3.1) and multi-scale extraction.

`prepare` turns an `EventLog` into SUMI samples stored as memory-mapped numpy arrays:

* events, sorted by (user, time) stably, with `user_offsets` (CSR by user);
* requests: one per (user, request), where a request groups a user's consecutive events whose
  time gaps are at most `request_gap` (same scenario, at most `max_candidates` each). A
  request's history is every event of that user strictly before the request's time, so no
  sample ever sees the future, and its candidates are the request's own impressions with
  their labels (implicit logs: each positive plus `negatives` sampled unseen items, seeded
  and fixed at preparation, so evaluation is reproducible; training draws its negatives afresh
  every epoch instead, `SumiData.batch(negatives=...)`);
* a per-user time split: each user's last `eval_requests` requests are test, the ones before
  them validation, the rest training (users with too few requests train only);
* with `shards` > 1, a shard index in meta.json (`shard_index`): contiguous ranges of users
  balanced by events, each a contiguous range of every per-event, per-request and per-candidate
  array, so that each rank under `torchrun` trains on its own users: one contiguous block of
  shards (`SumiData.rank_parts`), whose events alone its `SumiData.for_rank` view reads.

`SumiData.batch` builds model inputs for a list of requests, applying the multi-scale
extraction strategies (docs/paper.md section 2.1) with vectorised numpy: for each strategy a
prefix count over the event array gives, in O(1) per request, the positions of the last n
matching history events.

Dense ids: items 0 = padding, 1 = unknown, 2.. real; users 0 = unknown, 1.. real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from climber.config import PrepareConfig, parse_strategy
from climber.data.domains import user_item_ranges
from climber.data.events import DataError, EventLog, SideFeatures, feature_cards
from climber.files import recover_dir, replace_dir

if TYPE_CHECKING:  # torch is imported where batches are built: preparing data does not load it (~240 MB)
    import torch

PAD_ITEM, UNKNOWN_ITEM, FIRST_ITEM = 0, 1, 2
TRAIN, VALID, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "valid": VALID, "test": TEST}
FORMAT_VERSION = 1
SAMPLE_BLOCK = 256  # users whose negatives share one seeded generator (_sample_negatives)


def _dense(raw: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to dense ids starting at `first`; returns (vocabulary of raw ids, dense ids)."""
    vocab, inv = np.unique(raw, return_inverse=True)
    return vocab, inv.astype(np.int64) + first


def _side_table(feats: SideFeatures | None, vocab: np.ndarray, first: int) -> np.ndarray:
    """(first + len(vocab), F) codes aligned with dense ids; rows without features stay 0."""
    if feats is None:
        return np.zeros((first + len(vocab), 0), np.int32)
    table = np.zeros((first + len(vocab), feats.codes.shape[1]), np.int32)
    pos = np.searchsorted(vocab, feats.ids)
    hit = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == feats.ids)
    table[pos[hit] + first] = feats.codes[hit]
    return table


def _cards_widths(kind: str, table: np.ndarray, feats: SideFeatures | None) -> dict[str, list[int]]:
    """The vocabulary entries of an aligned side-feature table: values and columns per feature."""
    widths = feats.widths if feats is not None else ()
    return {f"{kind}_feature_cards": list(feature_cards(table, widths)), f"{kind}_feature_widths": list(widths)}


def _group_requests(user: np.ndarray, time: np.ndarray, scen: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """Request start flags over (user, time)-sorted events."""
    n = len(user)
    new = np.ones(n, bool)
    new[1:] = (user[1:] != user[:-1]) | (time[1:] - time[:-1] > cfg.request_gap) | (scen[1:] != scen[:-1])
    # split runs longer than max_candidates: position within the run, modulo the cap
    run_id = np.cumsum(new) - 1
    run_start = np.flatnonzero(new)
    pos_in_run = np.arange(n) - run_start[run_id]
    return new | (pos_in_run % cfg.max_candidates == 0)


def _split(req_user: np.ndarray, k: int) -> np.ndarray:
    """Per user (requests in time order): last k test, k before valid, others train."""
    n = len(req_user)
    last = np.ones(n, bool)
    last[:-1] = req_user[1:] != req_user[:-1]
    ends = np.flatnonzero(last)  # index of each user's last request
    counts = np.diff(np.concatenate([[-1], ends]))
    rank_from_end = np.repeat(ends, counts) - np.arange(n)  # 0 = user's last request
    enough = np.repeat(counts >= 2 * k + 1, counts)
    split = np.full(n, TRAIN, np.int8)
    split[enough & (rank_from_end < k)] = TEST
    split[enough & (rank_from_end >= k) & (rank_from_end < 2 * k)] = VALID
    return split


def check_strategies(strategies: tuple[str, ...], name: str, tasks: tuple[str, ...], n_scenarios: int,
                     n_actions: int) -> None:
    """Raise DataError for a strategy that names a task, scenario or action the data lacks."""
    for s in strategies:
        kind, arg, _ = parse_strategy(s)
        if kind in ("pos", "neg") and arg not in tasks:
            raise DataError(f"{name}: strategy {s!r} names task {arg!r}; tasks are {tasks}")
        n = {"scenario": n_scenarios, "action": n_actions}.get(kind)
        if n is not None and int(arg) >= n:
            raise DataError(f"{name}: strategy {s!r}: no {kind} {arg}; the data's {kind} ids are 0..{n - 1}")


def _drop_duplicates(log: EventLog) -> tuple[EventLog, int]:
    """`log` without the rows equal to an earlier one in user, item, time, labels, action and
    scenario (the first is kept, file order stays); and how many were dropped."""
    keep = first_rows(log.user, log.item, log.time, log.action, log.scenario, log.labels)
    if len(keep) == len(log):
        return log, 0
    cols = {c: getattr(log, c)[keep] for c in ("user", "item", "time", "labels", "action", "scenario")}
    return dataclasses.replace(log, **cols), len(log) - len(keep)


def first_rows(*cols: np.ndarray) -> np.ndarray:
    """Indices, ascending, of the rows of `cols` (integer, each (N,) or (N, k)) that equal no
    earlier row. The columns are packed into as few int64 sort keys as their value ranges allow
    (narrow ones first: labels, action and scenario share one), stably sorted, and each run of
    equal keys keeps its first row: 4x faster than `np.unique(axis=0)` at 3M rows, which sorts
    whole rows as byte strings."""
    n = len(cols[0])
    if n == 0:
        return np.zeros(0, np.int64)
    keys = [k for c in cols for k in c.reshape(n, -1).T]
    packed, cur, span = [], None, 1
    for r, k in sorted(((int(k.max()) - int(k.min()) + 1, k) for k in keys), key=lambda x: x[0]):
        if r >= 2**63:  # too wide to shift into int64: a key of its own
            packed.append(k)
            continue
        shifted = k.astype(np.int64) - int(k.min())
        if cur is not None and span * r < 2**63:
            cur, span = cur * r + shifted, span * r
        else:
            if cur is not None:
                packed.append(cur)
            cur, span = shifted, r
    if cur is not None:
        packed.append(cur)
    order = np.lexsort(packed) if len(packed) > 1 else np.argsort(packed[0], kind="stable")  # both stable
    new = np.zeros(n, bool)
    new[0] = True
    for k in packed:
        sk = k[order]
        new[1:] |= sk[1:] != sk[:-1]
    return np.sort(order[new])


def prepare(log: EventLog, out_dir: Path, cfg: PrepareConfig, strategies: tuple[str, ...], shards: int = 1) -> dict:
    """Build SUMI samples from `log` and write them to `out_dir` (atomically), with a shard index
    of `shards` user ranges if more than one (`shard_index`). Returns meta.

    The log is held in memory (about 340 bytes an event at peak); `climber.data.stream.prepare_stream`
    builds the same files out of core, calling the same `build_users` on one range of users at a time."""
    check_strategies(strategies, log.name, log.tasks, int(log.scenario.max()) + 1, int(log.action.max()) + 1)
    if not log.implicit:
        check_labels_vary(log.name, log.tasks, log.labels.min(0), log.labels.max(0))
    log, duplicates = _drop_duplicates(log) if cfg.drop_duplicates else (log, 0)
    item_vocab, item = _dense(log.item, FIRST_ITEM)
    user_vocab, user = _dense(log.user, 1)
    check_shards(log.name, shards, len(user_vocab))
    order = np.lexsort((log.time, user))  # stable: ties keep file order
    events = {"user": user[order], "item": item[order], "time": log.time[order], "labels": log.labels[order],
              "action": log.action[order], "scenario": log.scenario[order]}
    n_users = len(user_vocab) + 1
    # a multi-domain log (data/domains.py): each user's negatives come from its domain's items
    ranges = user_item_ranges(log, item_vocab, user_vocab, FIRST_ITEM, 1)
    part = build_users(events, 0, n_users, cfg, log.implicit, len(item_vocab) + FIRST_ITEM, ranges)
    arrays = {
        "user_offsets": np.append(part.pop("user_offsets"), len(user)),
        **part,
        "req_cand_start": np.append(part["req_cand_start"], len(part["cand_item"])),
        "item_features": _side_table(log.item_features, item_vocab, FIRST_ITEM),
        "user_features": _side_table(log.user_features, user_vocab, 1),
        "item_vocab": item_vocab,
        "user_vocab": user_vocab,
        **({} if ranges is None else {"user_item_range": ranges}),
    }
    stats = PrepareStats(len(log.tasks))
    stats.add(arrays)
    meta = build_meta(log, cfg, strategies, arrays, stats, duplicates, int(log.action.max()) + 1,
                      int(log.scenario.max()) + 1, fingerprint(arrays), shards)
    _write_atomic(out_dir, arrays, meta)
    return meta


def check_labels_vary(name: str, tasks: tuple[str, ...], lo: np.ndarray, hi: np.ndarray) -> None:
    """An explicit log's task whose label is the same in every row (min `lo` == max `hi`) has
    nothing to rank: DataError."""
    for t, a, b in zip(tasks, lo, hi, strict=True):
        if a == b:
            raise DataError(f"{name}: task {t!r} is {a} in every row, so there is nothing to rank "
                            "(drop that label column; a log of positives only is implicit: give no labels)")


def build_users(ev: dict[str, np.ndarray], u0: int, u1: int, cfg: PrepareConfig, implicit: bool, n_items: int,
                ranges: np.ndarray | None) -> dict[str, np.ndarray]:
    """The SUMI arrays of the users with dense ids u0..u1-1, from all their events `ev` (user,
    item dense; time, labels (N, T), action, scenario) sorted by (user, time), ties in file order.

    Everything here is per user, so any split of the users into ranges gives the same arrays,
    concatenated: `prepare` calls it once for every user, `stream.prepare_stream` once per
    partition. Positions are local: `user_offsets` (u1 - u0,) and `req_hist_end` count events from
    this range's first, `req_cand_start` (requests,) candidates from its first; the caller shifts
    them and appends the final ends. Implicit logs' negatives are drawn per block of
    `SAMPLE_BLOCK` users (`_sample_negatives`), so the ranges must start on a block boundary."""
    user, item, time, scen = ev["user"], ev["item"], ev["time"], ev["scenario"]
    labels, action = ev["labels"], ev["action"]
    user_offsets = np.searchsorted(user, np.arange(u0, u1)).astype(np.int64)

    new = _group_requests(user, time, scen, cfg)
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(user))
    req_user, req_time, req_scen = user[starts], time[starts], scen[starts]
    # history = the user's events strictly before the request time: the first event of the
    # user that shares the request's timestamp ends it
    run = np.ones(len(user), bool)
    run[1:] = (user[1:] != user[:-1]) | (time[1:] != time[:-1])
    first_same = np.maximum.accumulate(np.where(run, np.arange(len(user)), 0))
    req_hist_end = first_same[starts].astype(np.int64)

    if implicit:
        cand_item, cand_labels, cand_count = _sample_negatives(item, user, req_user, starts, ends, cfg, n_items,
                                                               labels.shape[1], ranges)
    else:
        cand_item, cand_labels, cand_count = item, labels, ends - starts
    return {
        "user_offsets": user_offsets,
        "ev_item": item.astype(np.int32),
        "ev_time": time.astype(np.int64),
        "ev_labels": labels.astype(np.int8),
        "ev_action": action.astype(np.int16),
        "ev_scenario": scen.astype(np.int16),
        "req_user": req_user.astype(np.int32),
        "req_time": req_time.astype(np.int64),
        "req_scenario": req_scen.astype(np.int16),
        "req_hist_end": req_hist_end,
        "req_cand_start": (np.cumsum(cand_count) - cand_count).astype(np.int64),
        "req_split": _split(req_user, cfg.eval_requests),
        "cand_item": cand_item.astype(np.int32),
        "cand_labels": cand_labels.astype(np.int8),
    }


class PrepareStats:
    """The counts meta.json reports, summed over `build_users` results (exact integers, so a
    sum over partitions equals the count over the whole)."""

    def __init__(self, n_tasks: int):
        self.events = 0
        self.requests = np.zeros(len(SPLITS), np.int64)
        self.candidates = np.zeros(len(SPLITS), np.int64)
        self.positives = np.zeros(n_tasks, np.int64)

    def add(self, part: dict[str, np.ndarray]) -> None:
        split = part["req_split"]
        self.events += len(part["ev_item"])
        self.requests += np.bincount(split, minlength=len(SPLITS))
        count = np.diff(np.append(part["req_cand_start"][: len(split)], len(part["cand_item"])))
        self.candidates += np.bincount(split, weights=count, minlength=len(SPLITS)).astype(np.int64)
        self.positives += part["cand_labels"].sum(0, dtype=np.int64)


def build_meta(log: EventLog, cfg: PrepareConfig, strategies: tuple[str, ...], arrays: dict[str, np.ndarray],
               stats: PrepareStats, duplicates: int, n_actions: int, n_scenarios: int, fp: str,
               shards: int = 1) -> dict:
    """meta.json of a prepared data set. `log` gives the name, tasks, side features' names and
    notes (its event columns are not read); `arrays` the vocabularies, side tables and, with
    `shards` > 1, the offsets the shard index is cut from (one shard: no index, meta as without shards)."""
    n_cand = int(stats.candidates.sum())
    return {
        "format_version": FORMAT_VERSION,
        "name": log.name,
        "fingerprint": fp,
        "tasks": list(log.tasks),
        "implicit": log.implicit,
        "strategies": list(strategies),
        "prepare": asdict(cfg),
        "vocab": {
            "n_items": len(arrays["item_vocab"]) + FIRST_ITEM,
            "n_users": len(arrays["user_vocab"]) + 1,
            "tasks": list(log.tasks),
            "n_actions": n_actions,
            "n_scenarios": n_scenarios,
            **_cards_widths("item", arrays["item_features"], log.item_features),
            **_cards_widths("user", arrays["user_features"], log.user_features),
        },
        "item_feature_names": list(log.item_features.names) if log.item_features else [],
        "user_feature_names": list(log.user_features.names) if log.user_features else [],
        "counts": {
            "events": stats.events,
            "duplicates_dropped": duplicates,
            "users": len(arrays["user_vocab"]),
            "items": len(arrays["item_vocab"]),
            **{f"requests_{s}": int(stats.requests[v]) for s, v in SPLITS.items()},
            **{f"candidates_{s}": int(stats.candidates[v]) for s, v in SPLITS.items()},
        },
        # positives / candidates: the float numpy's mean of the 0/1 column gives (exact integer sums)
        "positive_rate": {t: float(stats.positives[i]) / n_cand for i, t in enumerate(log.tasks)},
        "notes": log.notes,
        **({"shards": shard_index(arrays, shards)} if shards > 1 else {}),
    }


def check_shards(name: str, shards: int, users: int) -> None:
    """A shard is a range of whole users: DataError unless 1 <= shards <= users."""
    if not 1 <= shards <= users:
        raise DataError(f"{name}: --shards {shards}: a shard is a range of whole users, so 1 to {users} (the "
                        "data's users)")


def shard_index(arrays: dict[str, np.ndarray], shards: int) -> dict[str, list[int]]:
    """`shards` contiguous ranges of dense users, balanced by events, as boundaries (N + 1 each):
    shard k holds users[k]..users[k+1]-1, and so requests[k]..requests[k+1]-1 (req_* arrays),
    events[k]..events[k+1]-1 (ev_*) and candidates[k]..candidates[k+1]-1 (cand_*).

    Boundary k is the first one between users at or past k/N of the E events, so while no user
    has more than E/N events (m, the most one user has), a shard holds more than E/N - m and
    fewer than E/N + m; each shard keeps at least one user either way."""
    offsets = np.asarray(arrays["user_offsets"])  # (n_users + 1,); user 0, the unknown one, has no events
    n_users, k = len(offsets) - 1, np.arange(shards + 1)
    users = 1 + np.searchsorted(offsets[1:], -(-offsets[-1] * k // shards))
    users = np.minimum(np.maximum.accumulate(users - k) + k, n_users - shards + k)  # a user or more a shard
    requests = np.searchsorted(arrays["req_user"], users)
    return {"users": users.tolist(), "requests": requests.tolist(), "events": offsets[users].tolist(),
            "candidates": np.asarray(arrays["req_cand_start"])[requests].tolist()}


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """A short hash of the arrays' names, types, shapes and bytes: which data a run was trained
    on (hashed once at prepare, at memory speed; never recomputed when loading)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k} {a.dtype.str} {a.shape}\n".encode())
        h.update(a.data)
    return h.hexdigest()[:16]


def _sample_negatives(item, user, req_user, starts, ends, cfg, n_items, n_tasks, ranges=None):
    """Implicit logs: candidates = each request's positives + `negatives` unseen items each, drawn
    for all requests at once (`sample_unseen`; a loop over requests took 30 s for 1M events).

    The draws of the users u with u // SAMPLE_BLOCK == b come from a generator seeded by
    (cfg.seed, b): a block's negatives depend on that block's events alone, so preparing the
    users in any ranges that start on block boundaries (stream.py's partitions) gives the same
    negatives as preparing them all at once."""
    n_pos = ends - starts
    cand_count = n_pos * (1 + cfg.negatives)
    offs = np.concatenate([[0], np.cumsum(cand_count)])
    req = np.repeat(np.arange(len(starts)), cand_count)  # each candidate slot's request
    j = np.arange(int(offs[-1])) - offs[req]  # its place in the request: positives first
    pos = j < n_pos[req]
    cand_item = np.empty(len(req), np.int64)
    cand_item[pos] = item[starts[req[pos]] + j[pos]]
    seen = np.unique(user.astype(np.int64) * n_items + item)
    neg_user = req_user[req[~pos]].astype(np.int64)  # in user order: each block's slots are contiguous
    block = neg_user // SAMPLE_BLOCK
    cut = np.flatnonzero(np.diff(block)) + 1
    neg = np.empty(len(neg_user), np.int64)
    for a, b in zip(np.r_[0, cut], np.r_[cut, len(neg_user)]) if len(neg_user) else ():
        rng = np.random.default_rng([cfg.seed, int(block[a])])
        neg[a:b] = sample_unseen(neg_user[a:b], seen, n_items, rng, ranges)
    cand_item[~pos] = neg
    return cand_item, np.repeat(pos[:, None], n_tasks, 1).astype(np.int8), cand_count


def seen_keys(user_offsets: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """user * n_items + item of every event (CSR by user), sorted and unique: `sample_unseen`'s `seen`."""
    ev_user = np.repeat(np.arange(len(user_offsets) - 1), np.diff(user_offsets))
    return np.unique(ev_user * n_items + item.astype(np.int64))


def sample_unseen(user: np.ndarray, seen: np.ndarray, n_items: int, rng: np.random.Generator,
                  ranges: np.ndarray | None = None) -> np.ndarray:
    """One item per entry of `user` (dense ids), uniform over the items that user never interacted
    with; `seen` holds user * n_items + item of every event, sorted and unique; `ranges` (n_users,
    2), if given, each user's [lo, hi) item range (a multi-domain data set: its domain's items),
    else every item. Rejection in vectorised rounds (a user has seen a tiny fraction of the
    items), then, for the few entries still rejected (heavy users), a draw from the user's unseen
    items directly."""
    def draw(rows: np.ndarray) -> np.ndarray:
        if ranges is None:
            return rng.integers(FIRST_ITEM, n_items, size=len(rows))
        return rng.integers(ranges[user[rows], 0], ranges[user[rows], 1])

    out = draw(np.arange(len(user)))
    todo = np.arange(len(user))
    for _ in range(20):
        keys = user[todo] * n_items + out[todo]
        hit = np.minimum(np.searchsorted(seen, keys), len(seen) - 1)
        todo = todo[seen[hit] == keys]
        if not len(todo):
            return out
        out[todo] = draw(todo)
    for u in np.unique(user[todo]):
        first, last = np.searchsorted(seen, [u * n_items, (u + 1) * n_items])
        mine = todo[user[todo] == u]
        lo, hi = ranges[u] if ranges is not None else (FIRST_ITEM, n_items)
        unseen = np.setdiff1d(np.arange(lo, hi), seen[first:last] - u * n_items)
        if not len(unseen):
            raise DataError(f"user {u} has interacted with every item; cannot sample negatives")
        out[mine] = rng.choice(unseen, size=len(mine))
    return out


def _write_atomic(out_dir: Path, arrays: dict, meta: dict) -> None:
    """Write into a sibling temp dir, then swap it in (`files.replace_dir`): a killed prepare
    never leaves half a data set, nor destroys the one it was replacing."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for k, v in arrays.items():
        np.save(tmp / f"{k}.npy", v)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    replace_dir(tmp, out_dir)


def strategy_selects(spec: str, tasks: tuple[str, ...], labels: np.ndarray, scenario: np.ndarray,
                     action: np.ndarray) -> np.ndarray:
    """(N,) bool: which events (labels (N, T), scenario (N,), action (N,)) strategy `spec` keeps.
    The one definition of each strategy, for training batches and the serving cache alike."""
    kind, arg, _ = parse_strategy(spec)
    if kind == "recent":
        return np.ones(len(scenario), bool)
    if kind in ("pos", "neg"):
        if arg not in tasks:
            raise DataError(f"strategy {spec!r}: no task {arg!r} in {tasks}")
        return labels[:, tasks.index(arg)] == (1 if kind == "pos" else 0)
    return (scenario if kind == "scenario" else action) == int(arg)


class SumiData:
    """Prepared SUMI samples, memory-mapped, plus the multi-scale extraction for batches.
    `scenarios` (not empty): a view whose splits hold only the requests of those request
    scenarios (training one model per domain, `TrainConfig.scenarios`); histories, vocabulary
    and negatives stay the whole data's. `users` (u0, u1): a view that reads only the events of
    users u0..u1-1, `events` = user_offsets[u0]..user_offsets[u1]-1 (a rank's block of shards,
    `for_rank`): the strategies' matches and the seen items for fresh negatives are built over
    those events alone, and a request of another user is a DataError; the requests, candidates
    and vocabulary stay the whole data's. Default: every user."""

    def __init__(self, root: Path, scenarios: tuple[int, ...] = (), users: tuple[int, int] | None = None):
        root = Path(root)
        self.scenarios = tuple(scenarios)
        recover_dir(root)  # a prepare killed while swapping in a new data set: the old one is whole
        meta_path = root / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{root}: not a prepared data set (no meta.json); run `climber prepare` first")
        self.root = root
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{root}: format version {self.meta.get('format_version')}, expected "
                            f"{FORMAT_VERSION}; prepare it again")
        self.a = {p.stem: np.load(p, mmap_mode="r") for p in root.glob("*.npy")}
        self.tasks = tuple(self.meta["tasks"])
        offsets = self.a["user_offsets"]
        self.users = (0, len(offsets) - 1) if users is None else (int(users[0]), int(users[1]))
        self.events = (int(offsets[self.users[0]]), int(offsets[self.users[1]]))
        self._strategy_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._seen: np.ndarray | None = None  # sorted user * n_items + item over the view's events

    @property
    def fingerprint(self) -> str | None:
        """`fingerprint` of the arrays, recorded by prepare (None: prepared before fingerprints)."""
        return self.meta.get("fingerprint")

    @property
    def implicit(self) -> bool:
        return bool(self.meta["implicit"])

    @property
    def vocab(self) -> dict:
        v = dict(self.meta["vocab"])
        for k in ("tasks", "item_feature_cards", "user_feature_cards", "item_feature_widths", "user_feature_widths"):
            v[k] = tuple(v.get(k, ()))  # data prepared before bags has no widths: one column per feature
        return v

    def _in_split(self, split: str) -> np.ndarray:
        """(requests,) bool: the requests of `split` (of the view's scenarios, if any)."""
        sel = self.a["req_split"] == SPLITS[split]
        return sel & np.isin(self.a["req_scenario"], self.scenarios) if self.scenarios else sel

    def requests(self, split: str) -> np.ndarray:
        return np.flatnonzero(self._in_split(split))

    def _rank_bounds(self, world: int, key: str) -> list[int] | None:
        """The `world` + 1 boundaries, in the shard index's `key` ("users", "requests", "events" or
        "candidates"), of the ranks' blocks of shards: of N shards, rank r holds r N/world ..
        (r + 1) N/world - 1, one contiguous range of each array. None without a shard index or
        with one rank; a DataError unless `world` divides N."""
        index = self.meta.get("shards")
        if index is None or world == 1:
            return None
        n = len(index[key]) - 1
        if n % world:
            raise DataError(f"{self.root}: {n} shards cannot be split evenly over {world} ranks; prepare with "
                            f"--shards a multiple of {world}")
        return index[key][:: n // world]

    def rank_parts(self, req: np.ndarray, world: int) -> list[np.ndarray] | None:
        """`req` (request ids, ascending) split over `world` ranks by the shard index: rank r's part
        is its requests in its block of shards, r N/world .. (r + 1) N/world - 1 (so its users, and
        one byte range of each array). None without a shard index or with one rank; a DataError
        unless `world` divides the number of shards N."""
        bounds = self._rank_bounds(world, "requests")
        return None if bounds is None else np.split(req, np.searchsorted(req, bounds[1:-1]))

    def for_rank(self, rank: int, world: int) -> SumiData:
        """The view rank `rank` of `world` trains and validates with: with a shard index, one of its
        block of shards' users, which reads only their events (`users`); else this data."""
        bounds = self._rank_bounds(world, "users")
        return self if bounds is None else SumiData(self.root, self.scenarios, (bounds[rank], bounds[rank + 1]))

    def _check_users(self, user: np.ndarray, req: np.ndarray | None = None) -> None:
        """A DataError for a user (of request `req`, if given) outside the view's users, whose
        events it does not read."""
        u0, u1 = self.users
        out = np.flatnonzero((user < u0) | (user >= u1))
        if len(out):
            of = "user" if req is None else f"request {int(req[out[0]])} is of user"
            raise DataError(f"{self.root}: {of} {int(user[out[0]])}, outside this view's users {u0}..{u1 - 1} (a "
                            "rank's shards), whose events alone it reads")

    def labels(self, split: str) -> np.ndarray:
        """(C, T) labels of the prepared candidates of `split`'s requests."""
        a = self.a
        return np.asarray(a["cand_labels"])[np.repeat(self._in_split(split), np.diff(a["req_cand_start"]))]

    def bucket_by_length(self, order: np.ndarray, chunk: int, window: int, seq_len: int,
                         rng: np.random.Generator) -> np.ndarray:
        """`order` regrouped so that each run of `chunk` requests (a batch) holds similar
        history lengths and candidate counts, which `batch` then pads little: within every
        window of `window` chunks the requests are sorted by (events before the request,
        capped at seq_len; candidates), cut into chunks, and the whole chunks shuffled (by
        `rng`, so the order stays a pure function of the seed); a final partial chunk stays
        last. The result is a permutation of `order`."""
        a = self.a
        hist = np.minimum(a["req_hist_end"][order] - a["user_offsets"][a["req_user"][order]], seq_len)
        cands = a["req_cand_start"][order + 1] - a["req_cand_start"][order]
        span = chunk * window
        flat = np.concatenate([order[s : s + span][np.lexsort((cands[s : s + span], hist[s : s + span]))]
                               for s in range(0, len(order), span)] or [order])
        n = len(flat) // chunk
        whole = flat[: n * chunk].reshape(n, chunk)[rng.permutation(n)].reshape(-1)
        return np.concatenate([whole, flat[n * chunk :]])

    def _matches(self, spec: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions of the view's matching events, into the whole ev_* arrays; prefix counts
        (e1 - e0 + 1,) over its events e0..e1-1) for one strategy."""
        if spec not in self._strategy_cache:
            a, (e0, e1) = self.a, self.events
            m = strategy_selects(spec, self.tasks, a["ev_labels"][e0:e1], a["ev_scenario"][e0:e1],
                                 a["ev_action"][e0:e1])
            self._strategy_cache[spec] = (e0 + np.flatnonzero(m), np.concatenate([[0], np.cumsum(m)]))
        return self._strategy_cache[spec]

    def sample_negatives(self, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of `user`, drawn uniformly from the items that user never
        interacted with (in any split: the same definition as `prepare`'s fixed negatives); a
        DataError for a user outside the view's."""
        user = np.asarray(user, np.int64)
        self._check_users(user)
        n_items = int(self.meta["vocab"]["n_items"])
        if self._seen is None:  # the view's users' events: their keys, as over all events
            a, (u0, u1), (e0, e1) = self.a, self.users, self.events
            self._seen = u0 * n_items + seen_keys(a["user_offsets"][u0 : u1 + 1] - e0, a["ev_item"][e0:e1], n_items)
        return sample_unseen(user, self._seen, n_items, rng, self.a.get("user_item_range"))

    def _candidates(self, req: np.ndarray, negatives: tuple[int, np.random.Generator] | None):
        """(candidate rows into cand_* (B, M), their validity (B, M), fresh negative items (B, M)
        or None): the prepared candidates, or each request's positives followed by `n` fresh
        negatives per positive drawn by the generator."""
        a = self.a
        cs, ce = a["req_cand_start"][req], a["req_cand_start"][req + 1]
        if negatives is None:
            m = ce - cs
            M = int(m.max())
            cmask = np.arange(M)[None, :] < m[:, None]
            return np.where(cmask, cs[:, None] + np.arange(M), 0), cmask, None
        n, rng = negatives
        W = int((ce - cs).max())
        rows = cs[:, None] + np.arange(W)
        in_req = rows < ce[:, None]
        rows = np.where(in_req, rows, 0)
        pos = in_req & (a["cand_labels"][rows] > 0).any(-1)  # (B, W)
        n_pos = pos.sum(1)
        order = np.argsort(~pos, axis=1, kind="stable")  # positives first, in prepared order
        P = int(n_pos.max())
        rows = np.take_along_axis(rows, order, 1)[:, :P]
        M = P * (1 + n)
        j = np.arange(M)[None, :]
        is_pos = j < n_pos[:, None]
        is_neg = (j >= P) & (j < P + n * n_pos[:, None])
        user = np.broadcast_to(a["req_user"][req].astype(np.int64)[:, None], (len(req), M))
        items = np.zeros((len(req), M), np.int64)
        items[is_neg] = self.sample_negatives(user[is_neg], rng)
        rows = np.concatenate([rows, np.zeros((len(req), M - P), rows.dtype)], 1)
        return np.where(is_pos, rows, 0), is_pos | is_neg, np.where(is_neg, items, -1)

    def batch(self, req: np.ndarray, strategies: tuple[str, ...], seq_len: int,
              negatives: tuple[int, np.random.Generator] | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for requests `req`. History is left-padded (latest event last).

        Returns hist_* (B, K, L) with L <= seq_len trimmed to the longest history in the batch,
        cand_* (B, M) padded to the largest request, labels (B, M, T) float, and per-request
        user, time and scenario (B,). `negatives` (implicit data, training): (n, generator):
        each request's candidates are its positives and n fresh negatives per positive,
        instead of the negatives fixed at preparation. A DataError for a request of a user
        outside the view's.
        """
        a, e0 = self.a, self.events[0]
        req = np.asarray(req, dtype=np.int64)
        user = a["req_user"][req].astype(np.int64)
        self._check_users(user, req)
        lo = a["user_offsets"][user]
        hi = a["req_hist_end"][req]
        idx, valid = [], []
        for spec in strategies:
            pos, cum = self._matches(spec)
            cap = min(seq_len, parse_strategy(spec)[2] or seq_len)
            c_lo, c_hi = cum[lo - e0], cum[hi - e0]
            j = c_hi[:, None] - seq_len + np.arange(seq_len)  # (B, L) last seq_len matches
            ok = (j >= c_lo[:, None]) & (j >= c_hi[:, None] - cap)
            # padding points at the view's first event (its values are masked below): no read outside it
            idx.append(np.where(ok, pos[np.clip(j, 0, max(len(pos) - 1, 0))] if len(pos) else e0, e0))
            valid.append(ok)
        idx, valid = np.stack(idx, 1), np.stack(valid, 1)  # (B, K, L)
        used = valid.any(axis=(0, 1))
        first = int(np.argmax(used)) if used.any() else seq_len - 1  # keep >= 1 column
        idx, valid = idx[..., first:], valid[..., first:]

        cj, cmask, fresh = self._candidates(req, negatives)
        cand, labels = a["cand_item"][cj], a["cand_labels"][cj]
        if fresh is not None:  # fresh negatives: their items, label 0
            cand, labels = np.where(fresh >= 0, fresh, cand), np.where(fresh[..., None] >= 0, 0, labels)

        import torch

        def t(x, dtype=torch.long):
            return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)

        return {
            "user": t(user),
            "req_time": t(a["req_time"][req]),
            "req_scenario": t(a["req_scenario"][req]),
            "hist_item": t(np.where(valid, a["ev_item"][idx], PAD_ITEM)),
            "hist_time": t(np.where(valid, a["ev_time"][idx], 0)),
            "hist_action": t(np.where(valid, a["ev_action"][idx], 0)),
            "hist_scenario": t(np.where(valid, a["ev_scenario"][idx], 0)),
            "hist_labels": t(np.where(valid[..., None], a["ev_labels"][idx], 0)),
            "hist_mask": t(valid, torch.bool),
            "cand_item": t(np.where(cmask, cand, PAD_ITEM)),
            "cand_mask": t(cmask, torch.bool),
            "labels": t(np.where(cmask[..., None], labels, 0), torch.float32),
        }
