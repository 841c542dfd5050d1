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
- Action (a history feature): 0 = no click, else a dwell bucket 1..3 that rises with the like
  propensity.

Every parameter, and these constants, are recorded in `EventLog.notes`; one seed fixes the log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
TASKS = ("click", "like", "share")
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
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.users, self.events_per_user, self.items, self.topics, self.cohorts) < 1:
            raise ValueError(f"users, events_per_user, items, topics and cohorts must be positive: {self}")
        if self.session_events < 1 or self.memory_half_life <= 0 or self.zipf <= 0:
            raise ValueError("session_events >= 1, memory_half_life > 0 and zipf > 0 are required")
        if min(self.length_sigma, self.drift) < 0:
            raise ValueError("length_sigma and drift must be non-negative")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate(cfg: SyntheticConfig) -> EventLog:
    """A seeded synthetic `EventLog` (see the module docstring for the process)."""
    rng = np.random.default_rng(cfg.seed)
    U, n_items, K = cfg.users, cfg.items, cfg.topics
    med = cfg.events_per_user
    lengths = np.clip(np.rint(med * np.exp(cfg.length_sigma * rng.standard_normal(U))),
                      max(1, med // 5), med * 5).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    # items: a topic each, Zipf weight by a random popularity rank, quality and virality
    item_topic = rng.integers(0, K, n_items)
    weight = (rng.permutation(n_items) + 1.0) ** -cfg.zipf
    quality, virality = 0.5 * rng.standard_normal(n_items), rng.standard_normal(n_items)
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
    centres = rng.standard_normal((cfg.cohorts, K))
    theta = centres[cohort] + 0.5 * rng.standard_normal((U, K))
    scen_mix = rng.dirichlet(np.ones(len(SCENARIOS)), U)
    clock = rng.integers(0, 90 * DAY, U).astype(np.int64) + 1_600_000_000
    # memory stored scaled by 2^(t / half-life) at the time of the like, so its decayed value at
    # step t is m_scaled * 2^(-t / half-life): O(1) per like, no decay pass over all topics
    m_scaled = np.zeros((U, K))
    scen = np.zeros(U, np.int64)

    N = int(offsets[-1])
    out_item = np.empty(N, np.int64)
    out_time = np.empty(N, np.int64)
    out_scen = np.empty(N, np.int64)
    out_labels = np.empty((N, len(TASKS)), np.int8)
    out_action = np.empty(N, np.int64)
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
        like_logit = -2.3 + 0.6 * z + MEMORY[s] * mem[rows, k] + quality[item] + LIKE[s]
        click = rng.random(n) < _sigmoid(-2.4 + 1.2 * z + 0.5 * quality[item] + CLICK[s])
        like = click & (rng.random(n) < _sigmoid(like_logit))
        share = like & (rng.random(n) < _sigmoid(-1.5 + virality[item] + SHARE[s]))
        dwell = _sigmoid(like_logit + rng.standard_normal(n))
        m_scaled[u[like], k[like]] += 2.0 ** (t / cfg.memory_half_life)

        pos = offsets[u] + t
        out_item[pos], out_time[pos], out_scen[pos] = item, clock[u], s
        out_labels[pos] = np.stack([click, like, share], 1)
        out_action[pos] = np.where(click, 1 + (dwell > 1 / 3) + (dwell > 2 / 3), 0)

    notes = {
        "synthetic": True,
        "generator": "climber.data.synthetic.generate",
        "config": asdict(cfg),
        "scenarios": list(SCENARIOS),
        "constants": {name: arr.tolist() for name, arr in
                      (("popular", POPULAR), ("recall", RECALL), ("click", CLICK), ("like", LIKE),
                       ("memory", MEMORY), ("share", SHARE))},
        "label_logits": {"click": "-2.4 + 1.2 z + 0.5 q + click[s]",
                         "like | click": "-2.3 + 0.6 z + memory[s] log1p(m_topic) + q + like[s]",
                         "share | like": "-1.5 + v + share[s]"},
        "action": "0 = no click, 1..3 = dwell bucket",
    }
    users = np.arange(U)
    return EventLog(
        "synthetic", user=np.repeat(users, lengths), item=out_item, time=out_time, labels=out_labels, tasks=TASKS,
        action=out_action, scenario=out_scen,
        item_features=SideFeatures(np.arange(n_items), item_topic[:, None] + 1, ("topic",)),
        user_features=SideFeatures(users, cohort[:, None] + 1, ("cohort",)), notes=notes)
