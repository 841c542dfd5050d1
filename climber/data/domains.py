"""Several logs as one multi-domain data set, each source a scenario (issue: scenario adaptation).

`combine` namespaces ids so that no user or item of one source meets another's: a source's k-th
distinct raw id becomes `domain * DOMAIN_STRIDE + k`, so the dense ids `prepare` gives items are
contiguous per domain and `item // DOMAIN_STRIDE` of a raw id is its domain. The request scenario
is the source's index. Side features keep their codes, each source in its own columns (named
`<source>.<feature>`, zero for the other sources' ids). Tasks: the sources must have the same
number; differing names are joined (`interact/purchase`).

Implicit sources need negatives from their own domain: a Beauty user's sampled negative must be
a Beauty item, or the task turns into "which catalogue is this". `prepare` reads the
`domains` note and samples each user's negatives from the item range of the user's domain.
"""

from __future__ import annotations

import numpy as np

from climber.data.events import DataError, EventLog, SideFeatures

DOMAIN_STRIDE = 1 << 40  # raw id = domain * DOMAIN_STRIDE + the id's index within its source


def combine(logs: list[EventLog], names: list[str]) -> EventLog:
    """One `EventLog` of several sources (see the module docstring)."""
    if len(logs) < 2 or len(names) != len(logs):
        raise DataError("combine needs two or more logs, one name each")
    if len({log.implicit for log in logs}) > 1:
        raise DataError(f"cannot combine implicit and explicit logs ({', '.join(names)})")
    if len({len(log.tasks) for log in logs}) > 1:
        raise DataError(f"cannot combine logs with different numbers of tasks: {[log.tasks for log in logs]}")
    tasks = tuple("/".join(dict.fromkeys(t)) for t in zip(*(log.tasks for log in logs)))
    users, items = [], []
    for d, log in enumerate(logs):
        for raw, out in ((log.user, users), (log.item, items)):
            vocab, idx = np.unique(raw, return_inverse=True)
            out.append((vocab, d * DOMAIN_STRIDE + idx.astype(np.int64)))

    def side(kind: str) -> SideFeatures | None:
        tables = [(d, getattr(log, f"{kind}_features")) for d, log in enumerate(logs)]
        tables = [(d, f) for d, f in tables if f is not None]
        if not tables:
            return None
        vocabs = users if kind == "user" else items
        ids = np.concatenate([d * DOMAIN_STRIDE + np.arange(len(vocabs[d][0])) for d in range(len(logs))])
        width = sum(f.codes.shape[1] for _, f in tables)
        codes, col, col_names = np.zeros((len(ids), width), np.int64), 0, []
        starts = np.cumsum([0] + [len(v[0]) for v in vocabs])
        for d, f in tables:
            pos = np.searchsorted(vocabs[d][0], f.ids)
            hit = (pos < len(vocabs[d][0])) & (vocabs[d][0][np.minimum(pos, len(vocabs[d][0]) - 1)] == f.ids)
            codes[starts[d] + pos[hit], col:col + f.codes.shape[1]] = f.codes[hit]
            col += f.codes.shape[1]
            col_names += [f"{names[d]}.{n}" for n in f.names]
        return SideFeatures(ids, codes, tuple(col_names))

    return EventLog(
        "+".join(names), user=np.concatenate([u for _, u in users]), item=np.concatenate([i for _, i in items]),
        time=np.concatenate([log.time for log in logs]), labels=np.concatenate([log.labels for log in logs]),
        tasks=tasks, action=np.concatenate([log.action for log in logs]),
        scenario=np.concatenate([np.full(len(log.user), d) for d, log in enumerate(logs)]),
        implicit=logs[0].implicit, item_features=side("item"), user_features=side("user"),
        notes={"domains": list(names), "sources": [log.notes for log in logs],
               "ids": f"raw id = domain * {DOMAIN_STRIDE} + index of the id among its source's sorted ids"})


def user_item_ranges(log: EventLog, item_vocab: np.ndarray, user_vocab: np.ndarray, first_item: int,
                     first_user: int) -> np.ndarray | None:
    """For a combined log: (first_user + n_users, 2) dense [lo, hi) item range of each user's domain
    (the unknown user: every item); None for a log of one domain."""
    if "domains" not in log.notes:
        return None
    n_dom = len(log.notes["domains"])
    item_dom = item_vocab // DOMAIN_STRIDE
    lo = first_item + np.searchsorted(item_dom, np.arange(n_dom))
    hi = first_item + np.searchsorted(item_dom, np.arange(n_dom), side="right")
    out = np.tile([first_item, first_item + len(item_vocab)], (first_user + len(user_vocab), 1)).astype(np.int64)
    dom = user_vocab // DOMAIN_STRIDE
    out[first_user:, 0], out[first_user:, 1] = lo[dom], hi[dom]
    return out
