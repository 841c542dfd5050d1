"""Scaling-law tooling (climber/scaling): sweep skip/resume with tiny real runs, fits that recover
known parameters, crossovers on constructed curves, and a planner that keeps to the budget and
the swept hull (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from climber.config import TrainConfig
from climber.data.sumi import prepare
from climber.data.synthetic import PREPARE, STRATEGIES, SyntheticConfig, generate
from climber.model import make_model
from climber.scaling.fit import (
    LineFit,
    allocation_table,
    crossover,
    crossover_bootstrap,
    fit_line,
    fit_report,
    fit_saturating,
)
from climber.scaling.planner import _in_hull, candidates, plan
from climber.scaling.sweep import Grid, append_row, read_rows, sweep
from tests.helpers import tiny_config

TRAIN = TrainConfig(epochs=1, batch_size=64, warmup_steps=5, log_every=100)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scaling") / "syn"
    log = generate(SyntheticConfig(users=24, events_per_user=60, items=300, topics=5, seed=1))
    prepare(log, out, PREPARE, STRATEGIES)
    return out


def _grid(models=("climber",)) -> Grid:
    return Grid(models=models, lengths=(4, 8), layers=(1, 2), preset="tiny")


# ---- sweep -----------------------------------------------------------------------------------------


def test_sweep_rows_skip_and_redo_of_a_cut_row(data_dir, tmp_path):
    results = tmp_path / "r.jsonl"
    msgs: list[str] = []
    rows = sweep(data_dir, results, _grid(("climber", "dlrm")), TRAIN, log=msgs.append)
    # climber: 2 lengths x 2 depths; DLRM has no layers, so only its 2 lengths
    assert sorted((r["model"], r["seq_len"], r["n_layers"]) for r in rows) == [
        ("climber", 4, 1), ("climber", 4, 2), ("climber", 8, 1), ("climber", 8, 2),
        ("dlrm", 4, None), ("dlrm", 8, None)]
    assert len({r["key"] for r in rows}) == 6
    for r in rows:
        assert r["params"]["embedding"] > 0 and r["params"]["dense"] > 0
        assert r["epochs_run"] == pytest.approx(1.0)
        assert r["train_flops"] == pytest.approx(3 * r["flops"]["exact"] * r["train_requests"] * r["epochs_run"])
        assert 0 < r["test"]["auc"] < 1 and r["valid"]["logloss"] > 0 and not r["resumed"]
    climber = {(r["seq_len"], r["n_layers"]): r for r in rows if r["model"] == "climber"}
    assert climber[(8, 1)]["flops"]["paper"] > climber[(4, 1)]["flops"]["paper"]  # ~ length x layers
    assert climber[(4, 2)]["flops"]["exact"] > climber[(4, 1)]["flops"]["exact"]

    # a second call trains nothing
    msgs.clear()
    assert len(sweep(data_dir, results, _grid(("climber", "dlrm")), TRAIN, log=msgs.append)) == 6
    assert all("skipped" in m for m in msgs)

    # a kill while the last row was being written: the cut line is dropped and that run redone,
    # from its finished checkpoint, to the same numbers
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    assert len(read_rows(results)) == 5
    rows2 = sweep(data_dir, results, _grid(("climber", "dlrm")), TRAIN, log=lambda m: None)
    assert len(rows2) == 6 and len(results.read_text().splitlines()) == 6
    last, redone = json.loads(lines[-1]), rows2[-1]
    assert redone["key"] == last["key"] and redone["resumed"]
    assert redone["test"] == last["test"] and redone["valid"] == last["valid"]


def test_sweep_resumes_after_sigkill(data_dir, tmp_path):
    """A real interruption: kill the `climber scale sweep` process once its first row is in; the
    rerun (in-process, same grid and training config) completes the grid without redoing it."""
    results, runs = tmp_path / "r.jsonl", tmp_path / "runs"
    cmd = [sys.executable, "-m", "climber", "scale", "sweep", "--data", str(data_dir), "--out", str(results),
           "--runs", str(runs), "--lengths", "4", "8", "--layers", "1", "2", "--preset", "tiny", "--epochs", "1",
           "--batch-size", "64", "--warmup-steps", "5", "--device", "cpu", "--log-every", "100"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not read_rows(results) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    first = read_rows(results)
    assert 1 <= len(first) < 4
    msgs: list[str] = []
    rows = sweep(data_dir, results, _grid(), TRAIN, runs, log=msgs.append)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    assert rows[: len(first)] == first
    assert sum("skipped" in m for m in msgs) == len(first)


def test_sweep_shards_partition_the_grid(data_dir, tmp_path):
    """Two shards of one grid, sharing a results file, train each point exactly once; a bad
    shard index is refused."""
    results = tmp_path / "r.jsonl"
    grid = Grid(models=("climber", "dlrm"), lengths=(4,), layers=(1, 2), preset="tiny")  # 3 points
    first = sweep(data_dir, results, grid, TRAIN, shard=(0, 2), log=lambda m: None)
    assert len(first) == 2  # points 1 and 3
    rows = sweep(data_dir, results, grid, TRAIN, shard=(1, 2), log=lambda m: None)
    assert sorted((r["model"], r["n_layers"]) for r in rows) == [("climber", 1), ("climber", 2), ("dlrm", None)]
    msgs: list[str] = []
    assert len(sweep(data_dir, results, grid, TRAIN, log=msgs.append)) == 3  # unsharded: all done
    assert all("skipped" in m for m in msgs)
    with pytest.raises(ValueError, match="shard 2/2"):
        sweep(data_dir, results, grid, TRAIN, shard=(2, 2))


def _append_many(path: str, tag: int, n: int) -> None:
    for i in range(n):
        append_row(Path(path), {"key": f"{tag}-{i}", "pad": "x" * 1_000_000})


def test_append_row_from_concurrent_processes_keeps_every_line(tmp_path):
    """Processes appending to one results file under the lock: every row arrives whole, once."""
    import multiprocessing as mp

    path = tmp_path / "r.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), t, 25)) for t in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 100
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(f"{t}-{i}" for t in range(4) for i in range(25))


# ---- fits ------------------------------------------------------------------------------------------


def test_fit_line_recovers_parameters():
    rng = np.random.default_rng(0)
    x = np.repeat(np.linspace(6, 9, 7), 2)
    y = 0.70 + 0.02 * x + 0.001 * rng.standard_normal(len(x))
    f = fit_line(x, y)
    s = f.summary()
    assert f.a == pytest.approx(0.70, abs=0.005) and f.b == pytest.approx(0.02, abs=0.001)
    assert s["b_ci"][0] < 0.02 < s["b_ci"][1] and s["b_ci"][1] - s["b_ci"][0] < 0.003
    lo, hi = f.band(x)
    assert (lo <= f.predict(x)).all() and (f.predict(x) <= hi).all()
    # one FLOPs value: a constant at the mean, no slope
    c = fit_line(np.full(3, 5.0), np.array([0.70, 0.71, 0.72]))
    assert c.constant and c.b == 0 and c.a == pytest.approx(0.71)
    # no residual degrees of freedom: no band is claimed
    assert np.isnan(fit_line(np.array([6.0, 7.0]), np.array([0.7, 0.72])).band([6.5])[0]).all()


def test_fit_saturating_recovers_parameters():
    rng = np.random.default_rng(1)
    x = np.linspace(5, 10, 12)
    y = 0.85 - 0.05 * 10 ** (-0.4 * (x - x.mean())) + 0.0002 * rng.standard_normal(len(x))
    s = fit_saturating(x, y)
    assert s["A"] == pytest.approx(0.85, abs=0.003) and s["alpha"] == pytest.approx(0.4, rel=0.1)
    assert s["B"] == pytest.approx(0.05, rel=0.1)
    assert fit_saturating(x[:4], y[:4]) is None  # 3 parameters on 4 points: not identified


def test_crossover_on_constructed_lines():
    a, b = (0.70, 0.02), (0.76, 0.01)  # equal at x = 6; A steeper
    assert crossover(a, b, 5, 8) == {"kind": "overtakes", "x": pytest.approx(6.0)}
    assert crossover(a, b, 7, 9) == {"kind": "above", "x": pytest.approx(6.0)}
    assert crossover(a, b, 3, 5) == {"kind": "below", "x": pytest.approx(6.0)}
    assert crossover(b, a, 5, 8) == {"kind": "falls_below", "x": pytest.approx(6.0)}
    assert crossover((0.7, 0.01), (0.6, 0.01), 5, 8) == {"kind": "above", "x": None}
    # with bootstrap: noisy points on those lines cross near 6, upwards in most replicates
    rng = np.random.default_rng(2)
    xa, xb = np.linspace(5, 8, 8), np.linspace(4, 7, 8)
    fa = fit_line(xa, 0.70 + 0.02 * xa + 0.0005 * rng.standard_normal(8))
    fb = fit_line(xb, 0.76 + 0.01 * xb + 0.0005 * rng.standard_normal(8))
    c = crossover_bootstrap(fa, fb, 4, 8)
    assert c["kind"] == "overtakes" and c["x_ci"][0] < 6 < c["x_ci"][1] and c["bootstrap_kinds"]["overtakes"] > 0.9


def _row(model: str, L: int, N: int | None, auc: float, d: int = 16) -> dict:
    """A sweep row for a real tiny config (real FLOPs and params), with a given AUC."""
    cfg = tiny_config(arch=model, seq_len=L, n_layers=N or 1, d_model=d)
    with torch.device("meta"):
        m = make_model(cfg)
    fl = m.flops(L, 4.0)
    return {"key": f"{model}_L{L}_N{N}_d{d}", "model": model, "seq_len": L, "n_layers": N, "d_model": d,
            "dataset": "constructed", "config": {"model": dataclasses.asdict(cfg)}, "candidates_per_request": 4.0,
            "params": m.param_counts(), "flops": fl, "train_flops": 3 * fl["exact"] * 100, "epochs_run": 1.0,
            "wall_s": 1.0, "valid": {"auc": auc, "gauc": auc, "logloss": 0.6},
            "test": {"auc": auc, "gauc": auc, "logloss": 0.6}, "test_popularity": {"auc": 0.6, "gauc": 0.6,
                                                                                   "logloss": 0.65}}


def _surface(L: float, N: float) -> float:
    """A known AUC surface, quadratic in the logs, best at a balanced length x depth split."""
    x, y = math.log(L), math.log(N)
    return 0.70 + 0.02 * x + 0.02 * y - 0.01 * (x - y - 2.5) ** 2


GRID = [(L, N) for L in (8, 16, 32, 64) for N in (1, 2, 4, 8)]


def test_fit_report_writes_outputs_and_allocation(tmp_path):
    rows = [_row("climber", L, N, _surface(L, N)) for L, N in GRID]
    rows += [_row("dlrm", L, None, 0.72) for L in (8, 16, 32, 64)]
    s = fit_report(rows, tmp_path, n_boot=200)
    for f in s["figures"] + ["report.md", "fit.json"]:
        assert (tmp_path / f).stat().st_size > 0
    assert s["fits"]["dlrm"]["constant"] and s["fits"]["climber"]["b"] > 0
    assert "climber vs dlrm" in s["crossovers"]
    # equal length x layers levels (e.g. 8x4, 16x2, 32x1 at 32): the winner maximises the surface
    for level in allocation_table(rows, "test"):
        best = max(level["configs"], key=lambda c: _surface(c["L"], c["N_L"]))
        assert level["best"] == f"climber_L{best['L']}_N{best['N_L']}_d16"


# ---- planner ---------------------------------------------------------------------------------------


def test_planner_respects_budget_and_finds_the_optimum():
    rows = [_row("climber", L, N, _surface(L, N)) for L, N in GRID]
    flops = sorted(r["flops"]["exact"] for r in rows)
    budget = flops[len(flops) // 2]
    p = plan(rows, budget, n_boot=200)
    rec = p["recommendation"]
    assert rec["flops"] <= budget and 8 <= rec["seq_len"] <= 64 and 1 <= rec["n_layers"] <= 8
    # noise-free data of the surface's own form: the pick is the true best feasible candidate
    with torch.device("meta"):
        models = {N: make_model(tiny_config(n_layers=N)) for N in range(1, 9)}

    def flops_of(L: int, N: int) -> float:
        return models[N].flops(L, 4.0)["exact"]

    assert flops_of(rec["seq_len"], rec["n_layers"]) == pytest.approx(rec["flops"])
    feasible = [(_surface(c["seq_len"], c["n_layers"]), c["seq_len"], c["n_layers"])
                for c in candidates(rows, ("seq_len", "n_layers")) if flops_of(c["seq_len"], c["n_layers"]) <= budget]
    assert (rec["seq_len"], rec["n_layers"]) == max(feasible)[1:]
    assert rec["predicted_auc"] == pytest.approx(max(feasible)[0], abs=1e-6)


def test_planner_refuses_to_extrapolate():
    rows = [_row("climber", L, N, _surface(L, N)) for L, N in GRID]
    flops = [r["flops"]["exact"] for r in rows]
    low = plan(rows, min(flops) / 2, n_boot=50)
    assert low["recommendation"] is None and any("extrapolate" in n for n in low["notes"])
    high = plan(rows, max(flops) * 100, n_boot=50)
    assert any("not binding" in n for n in high["notes"])
    assert high["recommendation"]["seq_len"] <= 64 and high["recommendation"]["n_layers"] <= 8


def test_candidates_stay_in_the_convex_hull():
    # a triangle of swept points: (8, 1), (64, 1), (8, 8) and one inside; (64, 8) is outside
    tri = [(8, 1), (64, 1), (8, 8), (16, 2)]
    rows = [_row("climber", L, N, _surface(L, N)) for L, N in tri]
    cands = candidates(rows, ("seq_len", "n_layers"))
    assert cands and all(math.log(c["seq_len"] / 8) / math.log(8) + math.log(c["n_layers"]) / math.log(8) <= 1 + 1e-9
                         for c in cands)
    assert {"seq_len": 64, "n_layers": 8, "d_model": 16} not in cands
    pts = np.log([[8, 1], [64, 1], [8, 8]])
    assert _in_hull(pts, np.log([[16, 2], [64, 8]])).tolist() == [True, False]


def test_linefit_band_is_empty_without_bootstrap():
    f = LineFit(0.7, 0.01, np.empty((0, 2)), np.array([1.0, 2.0]), np.array([0.71, 0.72]))
    assert np.isnan(f.band([1.5])[0]).all() and math.isnan(f.summary()["b_ci"][0])
