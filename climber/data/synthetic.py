"""Synthetic interaction logs at any scale, for scaling experiments (docs/paper.md sections 1, 2.1, 4).

SYNTHETIC DATA: nothing here comes from real users. The generator imitates the structure the
paper's industrial logs have and the public sets lack: long lifecycle histories (hundreds to
thousands of events per user), several behaviour types (click, like, share), several scenarios
(feed, search, daily mix), Zipf item popularity and drifting interests, with labels that depend
on history far back, so that longer sequences and deeper models have something to find.

The process, per user, one impression at a time (all users advance together, vectorised):
- Items belong to one of `topics` latent topics; popularity is Zipf over a random item ranking,
  p(rank r) ~ r^-zipf, so every topic has its own popular head.
- A user has a cohort (a user side feature) whose centre sets the prior of the user's interest
  logits theta (topics,). Events come in sessions (geometric length, mean `session_events`); each
  session has one scenario (drawn from the user's own scenario mix), seconds between its events
  and hours to days between sessions. At each session start theta takes a random-walk step
  (std `drift` per topic): interests drift over the lifecycle.
- Long-term taste: each like of topic k adds 1 to a memory m[k] that halves every
  `memory_half_life` events, so a topic liked hundreds of events ago still counts.
- Exposure: in scenario s, with probability POPULAR[s] the item is drawn from global popularity,
  otherwise a topic from softmax(theta + RECALL[s] * log1p(m)) and an item of that topic by
  popularity (the daily mix recalls long-term tastes, search follows current interest).
- Labels (like needs a click, share needs a like), with z = theta[k] - mean(theta) the current
  interest and q_i, v_i item quality and virality:
      click ~ sigmoid(-2.4 + 1.2 z + 0.5 q_i + CLICK[s])
      like  ~ sigmoid(-2.3 + 0.6 z + MEMORY[s] * log1p(m[k]) + q_i + LIKE[s])
      share ~ sigmoid(-1.5 + v_i + SHARE[s])
  so the like label depends on likes of the same topic far back, weighted by scenario.
- Scenarios that read the history differently (`scenario_recency` > 0, default 0: off): a
  short memory r[k] of same-topic likes, halving every `short_half_life` events, adds
  scenario_recency * RECENT[s] * log1p(r[k]) to the like logit. Search then depends on the
  last few events, the daily mix not at all (it follows the long memory): a known truth for
  measuring whether per-scenario attention temperature and bias (the ATL) earn their keep.
- Scenarios that read the history in opposite ways (`scenario_contrast` > 0, default 0: off):
  the same short memory adds scenario_contrast * CONTRAST[s] * log1p(r[k]) to the click logit:
  search clicks again on the topics just liked, the daily mix avoids them (it offers something
  else), the feed does not care. A reader of the history with one set of weights for every
  scenario cannot fit both signs, so per-scenario adaptation has more to gain here than with
  `scenario_recency`, whose gain is bounded below seed noise (benchmarks/scenario_truth.py).
- Action (a history feature): 0 = no click, else a dwell bucket 1..3 that rises with the like
  propensity.

Every parameter, and these constants, are recorded in `EventLog.notes`; one seed fixes the log.

At scale (`chunk_users` > 0) users come in chunks, each from its own seeded stream with the
items and cohort centres shared, so chunks are made by parallel processes and written as Parquet
files as they are made (`write_parquet`), which `climber prepare synthetic --stream` prepares out
of core: a log of 1e8 events in the memory of one chunk and one partition. `chunk_users` 0 (the
default) keeps the one-stream log every committed synthetic result was made from.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from climber.config import PrepareConfig
from climber.data.events import EventLog, SideFeatures

SCENARIOS = ("feed", "search", "daily_mix")
POPULAR = np.array([0.5, 0.1, 0.2])  # share of exposures drawn from global popularity
RECALL = np.array([0.0, 0.0, 1.0])  # weight of long-term memory in topic exposure
CLICK = np.array([0.0, 0.6, 0.2])  # scenario offsets of the click logit
LIKE = np.array([0.0, -0.3, 0.3])  # ... of the like logit
MEMORY = np.array([0.5, 0.25, 1.0])  # weight of the long-term memory in the like logit
SHARE = np.array([0.3, -1.0, 0.0])  # ... of the share logit
RECENT = np.array([0.5, 1.5, 0.0])  # weight of the short (recent) memory in the like logit, x scenario_recency
CONTRAST = np.array([0.0, 1.0, -1.0])  # ... in the click logit, x scenario_contrast
TASKS = ("click", "like", "share")
# what `label_truth` records per event: current interest z, log1p long memory, log1p short memory, quality, virality
TRUTH = ("z", "memory", "recent", "quality", "virality")
DAY = 86_400
# How `climber prepare synthetic` groups it: a session's events are seconds apart, sessions hours
PREPARE = PrepareConfig(request_gap=60, max_candidates=20)
# long history, the like sequence (long-term taste), the click sequence, a short recent one
STRATEGIES = ("recent", "pos:like", "pos:click", "recent@16")


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of a synthetic log; lengths are log-normal around `events_per_user`."""

    users: int = 1000
    events_per_user: int = 500  # median events per user
    length_sigma: float = 0.6  # std of log length; lengths are clipped to [median/5, median*5]
    items: int = 20_000
    topics: int = 50
    zipf: float = 1.05
    cohorts: int = 5
    session_events: float = 10.0
    drift: float = 0.15
    memory_half_life: float = 300.0  # in events
    scenario_recency: float = 0.0  # scale of RECENT[s] * log1p(short memory) in the like logit; 0: off
    scenario_contrast: float = 0.0  # scale of CONTRAST[s] * log1p(short memory) in the click logit; 0: off
    short_half_life: float = 5.0  # in events
    # 0: every user from one random stream (the log held in memory). N: users in chunks of N, each
    # from its own stream, seeded by (seed, chunk); a chunk depends on nothing but its index, so
    # chunks are made in parallel and written as made (`write_parquet`), and a larger `users` keeps
    # the earlier users' events. A different log from 0's for the same seed.
    chunk_users: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.users, self.events_per_user, self.items, self.topics, self.cohorts) < 1:
            raise ValueError(f"users, events_per_user, items, topics and cohorts must be positive: {self}")
        if self.session_events < 1 or min(self.memory_half_life, self.short_half_life, self.zipf) <= 0:
            raise ValueError("session_events >= 1, memory_half_life > 0, short_half_life > 0 and zipf > 0 are required")
        if self.chunk_users < 0:
            raise ValueError("chunk_users must be >= 0 (0: one stream)")
        if min(self.scenario_recency, self.scenario_contrast) < 0:
            raise ValueError("scenario_recency and scenario_contrast must be >= 0")
        if min(self.length_sigma, self.drift) < 0:
            raise ValueError("length_sigma and drift must be non-negative")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class _Items:
    """What every user shares: items' topics, Zipf weights, quality and virality, the cohort
    centres (None: drawn later from the one stream, see `_simulate`), and the samplers built
    from them."""

    topic: np.ndarray
    weight: np.ndarray
    quality: np.ndarray
    virality: np.ndarray
    centres: np.ndarray | None

    @classmethod
    def draw(cls, rng: np.random.Generator, cfg: SyntheticConfig, centres: bool) -> _Items:
        topic = rng.integers(0, cfg.topics, cfg.items)
        weight = (rng.permutation(cfg.items) + 1.0) ** -cfg.zipf
        quality, virality = 0.5 * rng.standard_normal(cfg.items), rng.standard_normal(cfg.items)
        return cls(topic, weight, quality, virality,
                   rng.standard_normal((cfg.cohorts, cfg.topics)) if centres else None)


def _simulate(cfg: SyntheticConfig, rng: np.random.Generator, U: int, items: _Items | None,
              truth: bool = False) -> dict[str, np.ndarray]:
    """U users' events, one impression at a time (the module docstring's process), as columns with
    users 0..U-1, plus `lengths` and `cohort` per user and the `items` used. items None: one stream
    draws everything, in the order the generator has always used, so a seed's log stays the same.
    truth: also each event's label model (`TRUTH` columns), drawing nothing more."""
    n_items, K = cfg.items, cfg.topics
    med = cfg.events_per_user
    lengths = np.clip(np.rint(med * np.exp(cfg.length_sigma * rng.standard_normal(U))),
                      max(1, med // 5), med * 5).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    # items: a topic each, Zipf weight by a random popularity rank, quality and virality
    if items is None:
        items = _Items.draw(rng, cfg, centres=False)
    item_topic, weight, quality, virality = items.topic, items.weight, items.quality, items.virality
    glob_cdf = np.cumsum(weight) / weight.sum()
    # within-topic sampling with one searchsorted: items sorted by topic, each topic's
    # normalised CDF shifted by its topic index, so key k + u (u in [0, 1)) lands in topic k
    by_topic = np.argsort(item_topic, kind="stable")
    t_sorted = item_topic[by_topic]
    w_sorted = weight[by_topic]
    topic_tot = np.bincount(t_sorted, weights=w_sorted, minlength=K)
    within = np.cumsum(w_sorted) - np.concatenate([[0], np.cumsum(topic_tot)[:-1]])[t_sorted]
    keys = t_sorted + within / np.where(topic_tot > 0, topic_tot, 1)[t_sorted]
    topic_has_items = topic_tot > 0

    # users: cohort prior, interests, scenario mix, start time
    cohort = rng.integers(0, cfg.cohorts, U)
    centres = items.centres if items.centres is not None else rng.standard_normal((cfg.cohorts, K))
    theta = centres[cohort] + 0.5 * rng.standard_normal((U, K))
    scen_mix = rng.dirichlet(np.ones(len(SCENARIOS)), U)
    clock = rng.integers(0, 90 * DAY, U).astype(np.int64) + 1_600_000_000
    # memory stored scaled by 2^(t / half-life) at the time of the like, so its decayed value at
    # step t is m_scaled * 2^(-t / half-life): O(1) per like, no decay pass over all topics
    m_scaled = np.zeros((U, K))
    short = np.zeros((U, K))  # the short memory, decayed in place every event (scenario_recency or _contrast > 0)
    short_decay = 2.0 ** (-1.0 / cfg.short_half_life)
    scen = np.zeros(U, np.int64)

    N = int(offsets[-1])
    out_item = np.empty(N, np.int64)
    out_time = np.empty(N, np.int64)
    out_scen = np.empty(N, np.int64)
    out_labels = np.empty((N, len(TASKS)), np.int8)
    out_action = np.empty(N, np.int64)
    out_truth = {name: np.empty(N) for name in TRUTH} if truth else None
    for t in range(int(lengths.max())):
        u = np.flatnonzero(lengths > t)
        n = len(u)
        new = (rng.random(n) < 1.0 / cfg.session_events) | (t == 0)
        un = u[new]
        if len(un):  # a new session: scenario, a gap of hours to days, an interest drift step
            cdf = np.cumsum(scen_mix[un], axis=1)
            scen[un] = (rng.random(len(un))[:, None] > cdf[:, :-1]).sum(1)
            if t > 0:
                clock[un] += (3600 + rng.exponential(DAY, len(un))).astype(np.int64)
                theta[un] += cfg.drift * rng.standard_normal((len(un), K))
        clock[u[~new]] += (5 + rng.exponential(15.0, n - len(un))).astype(np.int64)
        s = scen[u]
        decay = 2.0 ** (-t / cfg.memory_half_life)
        mem = np.log1p(m_scaled[u] * decay)  # (n, K)

        # exposure: global popularity, or a topic (Gumbel-max over the logits) then an item of it
        logits = theta[u] + RECALL[s][:, None] * mem
        logits[:, ~topic_has_items] = -np.inf
        topic = np.argmax(logits + rng.gumbel(size=(n, K)), axis=1)
        from_topic = by_topic[np.minimum(np.searchsorted(keys, topic + rng.random(n)), n_items - 1)]
        popular = np.minimum(np.searchsorted(glob_cdf, rng.random(n)), n_items - 1)
        item = np.where(rng.random(n) < POPULAR[s], popular, from_topic)
        k = item_topic[item]

        rows = np.arange(n)
        z = theta[u, k] - theta[u].mean(1)
        recent = np.zeros(n)
        if cfg.scenario_recency or cfg.scenario_contrast:
            short[u] *= short_decay
            recent = np.log1p(short[u, k])
        inputs = (z, mem[rows, k], recent, quality[item], virality[item])  # the TRUTH columns
        click_logit, like_logit, share_logit = _label_logits(cfg, s, *inputs)
        click = rng.random(n) < _sigmoid(click_logit)
        like = click & (rng.random(n) < _sigmoid(like_logit))
        share = like & (rng.random(n) < _sigmoid(share_logit))
        dwell = _sigmoid(like_logit + rng.standard_normal(n))
        m_scaled[u[like], k[like]] += 2.0 ** (t / cfg.memory_half_life)
        short[u[like], k[like]] += 1.0

        pos = offsets[u] + t
        if out_truth is not None:
            for name, col in zip(TRUTH, inputs):
                out_truth[name][pos] = col
        out_item[pos], out_time[pos], out_scen[pos] = item, clock[u], s
        out_labels[pos] = np.stack([click, like, share], 1)
        out_action[pos] = np.where(click, 1 + (dwell > 1 / 3) + (dwell > 2 / 3), 0)

    return {"user": np.repeat(np.arange(U), lengths), "item": out_item, "time": out_time, "labels": out_labels,
            "action": out_action, "scenario": out_scen, "lengths": lengths, "cohort": cohort, "items": items,
            **({"truth": out_truth} if truth else {})}


def label_truth(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """The one-stream log of `cfg` (chunk_users 0) with what its labels were drawn from: per event
    `user`, `time`, the item's `topic`, `scenario`, `labels` and the `TRUTH` columns (the label
    logits' inputs at the event, the memories as log1p), so an analysis can score events by their
    true probabilities (`true_logits`) or by a label model with fewer degrees of freedom."""
    if cfg.chunk_users:
        raise ValueError("label_truth reads the one-stream log (chunk_users 0)")
    ev = _simulate(cfg, np.random.default_rng(cfg.seed), cfg.users, None, truth=True)
    return {"user": ev["user"], "time": ev["time"], "topic": ev["items"].topic[ev["item"]], "scenario": ev["scenario"],
            "labels": ev["labels"], **ev["truth"]}


def true_logits(cfg: SyntheticConfig, t: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 3) logits of click, like given click and share given like: the generator's label model."""
    return np.stack(_label_logits(cfg, t["scenario"], *(t[name] for name in TRUTH)), 1)


def _label_logits(cfg: SyntheticConfig, s: np.ndarray, z: np.ndarray, memory: np.ndarray, recent: np.ndarray,
                  quality: np.ndarray, virality: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The label model (the module docstring's logits): click, like | click and share | like logits
    of events in scenarios s from the `TRUTH` inputs (memories as log1p)."""
    click = -2.4 + 1.2 * z + 0.5 * quality + CLICK[s] + cfg.scenario_contrast * CONTRAST[s] * recent
    like = -2.3 + 0.6 * z + MEMORY[s] * memory + quality + LIKE[s] + cfg.scenario_recency * RECENT[s] * recent
    return click, like, -1.5 + virality + SHARE[s]


def notes(cfg: SyntheticConfig) -> dict:
    """What a prepared synthetic data set records about its making (meta.json's `notes`)."""
    return {
        "synthetic": True,
        "generator": "climber.data.synthetic.generate",
        "config": asdict(cfg),
        "scenarios": list(SCENARIOS),
        "constants": {name: arr.tolist() for name, arr in
                      (("popular", POPULAR), ("recall", RECALL), ("click", CLICK), ("like", LIKE),
                       ("memory", MEMORY), ("share", SHARE), ("recent", RECENT), ("contrast", CONTRAST))},
        "label_logits": {"click": "-2.4 + 1.2 z + 0.5 q + click[s] + scenario_contrast contrast[s] log1p(r_topic)",
                         "like | click": "-2.3 + 0.6 z + memory[s] log1p(m_topic) + q + like[s]"
                                         " + scenario_recency recent[s] log1p(r_topic)",
                         "share | like": "-1.5 + v + share[s]"},
        "action": "0 = no click, 1..3 = dwell bucket",
    }


def _chunk(cfg: SyntheticConfig, c: int) -> dict[str, np.ndarray]:
    """Chunk c of a chunked log: users c*chunk_users.. from a stream seeded by (seed, 1, c), items
    and cohort centres from one seeded by (seed, 0), so a chunk depends on nothing but its index."""
    first = c * cfg.chunk_users
    items = _Items.draw(np.random.default_rng([cfg.seed, 0]), cfg, centres=True)
    ev = _simulate(cfg, np.random.default_rng([cfg.seed, 1, c]), min(cfg.chunk_users, cfg.users - first), items)
    ev["user"] += first
    return ev


def _per_chunk(fn, cfg: SyntheticConfig, workers: int, *args: list) -> list:
    """[fn(cfg, c, *args[c]) for every chunk c], by up to `workers` processes. Forked where the
    platform can: a spawned worker re-runs the caller's main script, which breaks scripts without
    a main guard and code read from stdin; the workers run numpy alone, so the parent's threads
    do not matter."""
    n = -(-cfg.users // cfg.chunk_users)
    workers = min(workers, n)
    if workers <= 1:
        return [fn(cfg, c, *(a[c] for a in args)) for c in range(n)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        return list(pool.map(fn, [cfg] * n, range(n), *args))


def generate(cfg: SyntheticConfig, workers: int = 1) -> EventLog:
    """A seeded synthetic `EventLog` (see the module docstring for the process); with
    `cfg.chunk_users`, its chunks made by up to `workers` processes (the same log for any number)."""
    if cfg.chunk_users:
        parts = _per_chunk(_chunk, cfg, workers)
        ev = {k: np.concatenate([p[k] for p in parts]) for k in ("user", "item", "time", "labels", "action",
                                                                  "scenario", "cohort")}
        topic = parts[0]["items"].topic
    else:
        ev = _simulate(cfg, np.random.default_rng(cfg.seed), cfg.users, None)
        topic = ev["items"].topic
    return EventLog(
        "synthetic", user=ev["user"], item=ev["item"], time=ev["time"], labels=ev["labels"], tasks=TASKS,
        action=ev["action"], scenario=ev["scenario"],
        item_features=SideFeatures(np.arange(cfg.items), topic[:, None] + 1, ("topic",)),
        user_features=SideFeatures(np.arange(cfg.users), ev["cohort"][:, None] + 1, ("cohort",)), notes=notes(cfg))


# How a chunk file's columns read (`readers.ColumnMapping`'s fields), for `prepare_stream`
PARQUET_COLUMNS = {"user": "user", "item": "item", "time": "time", "labels": TASKS, "action": "action",
                   "scenario": "scenario", "item_features": ("topic",), "user_features": ("cohort",)}


def _write_chunk(cfg: SyntheticConfig, c: int, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ev = _chunk(cfg, c)
    cols = {"user": ev["user"], "item": ev["item"], "time": ev["time"],
            **{t: ev["labels"][:, i] for i, t in enumerate(TASKS)}, "action": ev["action"],
            "scenario": ev["scenario"], "topic": ev["items"].topic[ev["item"]] + 1,
            "cohort": ev["cohort"][ev["user"] - c * cfg.chunk_users] + 1}
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.rename(path)
    return len(ev["user"])


def write_parquet(cfg: SyntheticConfig, out_dir: Path | str, workers: int = 1) -> int:
    """The chunked log (cfg.chunk_users > 0) as one Parquet file per chunk in out_dir, made by up to
    `workers` processes, each holding one chunk at a time: memory set by the chunk, not the log.
    Columns: `PARQUET_COLUMNS`, side features on every row. Returns the number of events."""
    if not cfg.chunk_users:
        raise ValueError("write_parquet needs chunk_users > 0: a log in one stream is made in memory (generate)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):  # stale chunks would be read as this log's
        raise ValueError(f"{out_dir}: not empty; write_parquet writes a log's chunks into a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"part-{c:05d}.parquet" for c in range(-(-cfg.users // cfg.chunk_users))]
    counts = _per_chunk(_write_chunk, cfg, workers, paths)
    return sum(counts)
