"""Serving with several scenarios per user (docs/paper.md sections 2.3 and 3.2): the engine's cache
memory and hit rate for a scenario-adaptive Climber, whose caches are keyed by (user, scenario),
against the same model with one shared temperature and bias (`climber-shared-tau`), whose
engine keeps one cache per user; and which parts of a cache depend on the request scenario.

Data: a synthetic multi-scenario log (climber/data/synthetic.py, SYNTHETIC: three scenarios,
each user with its own scenario mix, `scenario_recency` 3), prepared as `climber prepare
synthetic` does. Replay: the last `--requests-per-user` requests of `--replay-users` users, in
rounds (every user's first, then every user's second, ...: all users active at once); before
each request the user's events up to the request are posted to the engine (`append_events`),
so a cached history is extended (or its full block windows recomputed) when events arrived
since it was built, and a request in a scenario the user has no cache for prefills (a miss).
Models: random weights with perturbed temperatures and biases (tests/helpers.perturb), so the
scenarios differ as a trained model's would; cache sizes and hit rates depend on the shapes and
the request stream, not the weights.

Replayed twice per model: with an unbounded cache, and with the budget the shared model's
caches needed (every user once), so the adaptive model is measured at equal memory.

Which parts of a cache depend on the scenario is measured directly: the same history is
prefilled under two request scenarios and each layer's cached keys/values compared.

    python -m benchmarks.bench_scenario_serving            # small preset, CPU

Prints a table, then one JSON line; writes benchmarks/results/scenarios/serving/bench.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, environment, percentiles, table, write_results
from climber.config import model_config
from climber.data import synthetic
from climber.data.sumi import FIRST_ITEM, SumiData, prepare
from climber.model import make_model
from climber.serve.engine import Engine, ScoreRequest
from climber.serve.store import History, SQLiteStore
from tests.helpers import perturb


def build_data(root: Path, users: int, events: int, seed: int) -> SumiData:
    cfg = synthetic.SyntheticConfig(users=users, events_per_user=events, items=2000, topics=20,
                                    scenario_recency=3.0, seed=seed)
    prepare(synthetic.generate(cfg), root, synthetic.PREPARE, synthetic.STRATEGIES)
    return SumiData(root)


def replay_requests(data: SumiData, n_users: int, per_user: int) -> np.ndarray:
    """The last `per_user` requests of the first `n_users` users with that many, in rounds: round
    j serves every user's j-th of them. The users' timelines are aligned so that all of them
    are active at once, as the many concurrent users of a service are (the synthetic users'
    own times spread over months, which would leave few of them active together)."""
    a = data.a
    req_user = np.asarray(a["req_user"])
    users = [u for u in np.unique(req_user) if (req_user == u).sum() >= per_user][:n_users]
    return np.stack([np.flatnonzero(req_user == u)[-per_user:] for u in users], 1).reshape(-1)  # (rounds x users)


def events_of(data: SumiData, lo: int, hi: int) -> History:
    """Events lo..hi-1 of the prepared arrays, with raw item ids (as a client posts them)."""
    a = data.a
    raw = np.asarray(a["item_vocab"])[np.asarray(a["ev_item"][lo:hi], np.int64) - FIRST_ITEM]
    return History(raw, *(np.asarray(a[k][lo:hi], np.int64) for k in ("ev_time", "ev_action", "ev_scenario",
                                                                        "ev_labels")))


def replay(model: torch.nn.Module, data: SumiData, req: np.ndarray, cache_bytes: int) -> dict:
    """Serve `req` one at a time through a fresh engine; its stats, cache bytes and latency.
    hit: the cache held the user's every event; found (1 - miss rate): a cache was found and
    extended or partly recomputed (a full block window) with the events since, not prefilled."""
    a = data.a
    user_vocab, item_vocab = np.asarray(a["user_vocab"]), np.asarray(a["item_vocab"])
    engine = Engine(model, SQLiteStore(":memory:", data.tasks), item_vocab, user_vocab, cache_bytes)
    posted: dict[int, int] = {}  # dense user -> events posted (positions in the prepared arrays)
    peak, ms = 0, []
    for r in req:
        u = int(a["req_user"][r])
        raw_user = int(user_vocab[u - 1])
        start = posted.get(u, int(a["user_offsets"][u]))
        end = int(a["req_hist_end"][r])
        if end > start:
            engine.append_events(raw_user, events_of(data, start, end))
            posted[u] = end
        cand = np.asarray(a["cand_item"][a["req_cand_start"][r]:a["req_cand_start"][r + 1]], np.int64)
        t0 = time.perf_counter()
        engine.score_requests([ScoreRequest(cand, int(a["req_scenario"][r]), int(a["req_time"][r]), raw_user)])
        ms.append(1e3 * (time.perf_counter() - t0))
        peak = max(peak, engine.cache.bytes)
    s = engine.stats
    n = len(req)
    return {"requests": n, **{k: s[k] for k in ("hit", "extend", "recompute", "miss", "evict")},
            "hit_rate": s["hit"] / n, "found_rate": 1 - s["miss"] / n,
            "entries": len(engine.cache), "cache_bytes": engine.cache.bytes, "peak_cache_bytes": peak,
            "bytes_per_entry": engine.cache.bytes / max(1, len(engine.cache)), **percentiles(ms)}


@torch.inference_mode()
def scenario_dependence(model: torch.nn.Module, data: SumiData) -> dict:
    """One user's history prefilled under request scenarios 0 and 1: per layer, max |K0 - K1|
    and |V0 - V1| relative to max |K0|, |V0|; which cached tensors differ; and the share of a
    cache's bytes that does not depend on the scenario."""
    a = data.a
    engine = Engine(model, SQLiteStore(":memory:", data.tasks), a["item_vocab"], a["user_vocab"], 1 << 40)
    u = int(np.argmax(np.diff(np.asarray(a["user_offsets"]))))  # the longest history
    h = events_of(data, int(a["user_offsets"][u]), int(a["user_offsets"][u + 1]))
    h = History(engine.item_ids(h.item)[0], h.time, h.action, h.scenario, h.labels)
    c0, c1 = engine.prefill(h, 0, u), engine.prefill(h, 1, u)
    layers = []
    for i, ((k0, v0), (k1, v1)) in enumerate(zip(c0.kv, c1.kv, strict=True)):
        layers.append({"layer": i, "k_rel_diff": float((k0 - k1).abs().max() / k0.abs().max()),
                       "v_rel_diff": float((v0 - v1).abs().max() / v0.abs().max()),
                       "kv_bytes": sum(t.numel() * t.element_size() for t in (k0, v0))})
    shared = sum(x["kv_bytes"] for x in layers if x["k_rel_diff"] == 0 and x["v_rel_diff"] == 0)
    shared += sum(t.numel() * t.element_size() for t in (c0.hist_mask, c0.hist_time, c0.user, c0.hist_sum))
    same = {name: bool(torch.equal(getattr(c0, name), getattr(c1, name))) for name in ("hist_mask", "hist_time",
                                                                                       "hist_sum")}
    return {"history_events": len(h), "layers": layers, "same": same, "cache_bytes": c0.nbytes,
            "scenario_independent_bytes": shared, "scenario_independent_share": shared / c0.nbytes}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--users", type=int, default=300, help="users of the synthetic log")
    ap.add_argument("--events", type=int, default=300, help="median events per user")
    ap.add_argument("--replay-users", type=int, default=100)
    ap.add_argument("--requests-per-user", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/scenarios/serving/bench.json)")
    ns = ap.parse_args(argv)
    torch.manual_seed(ns.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp) / "synthetic", ns.users, ns.events, ns.seed)
        req = replay_requests(data, ns.replay_users, ns.requests_per_user)
        req_user, req_scen = np.asarray(data.a["req_user"])[req], np.asarray(data.a["req_scenario"])[req]
        per_user = [len(np.unique(req_scen[req_user == u])) for u in np.unique(req_user)]
        models, rows, dependence = {}, [], {}
        for name, adaptive in (("climber", True), ("climber-shared-tau", False)):
            cfg = model_config(ns.preset, data.vocab, synthetic.STRATEGIES, scenario_adaptive=adaptive, dropout=0.0)
            torch.manual_seed(ns.seed)
            models[name] = make_model(cfg).eval()
            perturb(models[name])
            dependence[name] = scenario_dependence(models[name], data)
        unbounded = 1 << 40
        for name, model in models.items():
            rows.append({"model": name, "budget": "unbounded", **replay(model, data, req, unbounded)})
        budget = next(r["peak_cache_bytes"] for r in rows if r["model"] == "climber-shared-tau")
        rows.append({"model": "climber", "budget": f"{budget / 2**20:.2f} MiB", **replay(models["climber"], data, req,
                                                                                        budget)})
    print(table(rows, [("model", "model", "s"), ("budget", "cache budget", "s"), ("requests", "requests", "d"),
                       ("hit_rate", "hit rate", ".3f"), ("found_rate", "cache found", ".3f"), ("miss", "miss", "d"),
                       ("evict", "evict", "d"), ("entries", "entries", "d"),
                       ("peak_cache_bytes", "peak cache B", ",d"), ("bytes_per_entry", "B/entry", ",.0f"),
                       ("p50_ms", "p50 ms", ".2f")]))
    for name, d in dependence.items():
        diffs = ", ".join(f"layer {x['layer']} K {x['k_rel_diff']:.2g} V {x['v_rel_diff']:.2g}" for x in d["layers"])
        print(f"{name}: cached K/V under scenario 0 vs 1 (max |diff| / max |value|): {diffs}; "
              f"scenario-independent share of a cache {d['scenario_independent_share']:.2f}")
    payload = {"preset": ns.preset, "synthetic": {"users": ns.users, "events_per_user": ns.events,
                                                  "scenario_recency": 3.0, "seed": ns.seed},
               "replay": {"users": len(per_user), "requests": len(req),
                          "mean_scenarios_per_user": float(np.mean(per_user))},
               "rows": rows, "scenario_dependence": dependence, "environment": environment("cpu")}
    print(json.dumps(payload))
    (RESULTS / "scenarios" / "serving").mkdir(parents=True, exist_ok=True)
    path = write_results("scenarios/serving/bench", "benchmarks.bench_scenario_serving", payload) if ns.out is None \
        else ns.out
    if ns.out is not None:
        ns.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
