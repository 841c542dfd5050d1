"""`climber compare` end to end on a tiny data set: table, resume, selection on the shared grid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from climber import compare as compare_mod
from climber.config import TrainConfig
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.runtime import Runtime
from tests.helpers import synthetic_log

ROOT = Path(__file__).resolve().parents[1]
TINY = TrainConfig(epochs=1, batch_size=16, warmup_steps=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(synthetic_log(), d, PrepareConfig(request_gap=50, max_candidates=4), ("recent", "pos:like", "recent@4"))
    return d


def test_cli_two_models_two_seeds_then_resume_skips_everything(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "climber", "compare", "--data", str(data_dir), "--out", str(out), "--models",
           "climber", "dlrm", "--seeds", "0", "1", "--preset", "tiny", "--epochs", "1", "--batch-size", "16",
           "--warmup-steps", "1", "--device", "cpu"]
    res = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    md = (out / "compare.md").read_text()
    assert md.strip() in res.stdout  # the same table on stdout
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["dlrm", "climber"]  # the paper's row order, whatever the command's order
    for r in rows.values():
        assert len(r["test_per_seed"]) == 2 and 0 < r["auc"]["mean"] < 1 and r["auc"]["std"] >= 0
        assert r["params"]["total"] > 0 and r["flops"]["exact"] > 0
        assert r["trained_on"] == ["cpu"]  # where each run trained, for tables assembled from several machines
        assert f"| {r['model']} | {r['auc']['mean']:.4f} ± {r['auc']['std']:.4f} |" in md
    assert rows["dlrm"]["auc_impr_vs_dlrm"] == 0
    assert "on an exponential moving average of the weights (decay 0.99)" in md  # the default, stated
    assert "Trained on: cpu (dlrm, climber)." in md
    assert rows["climber"]["auc_impr_vs_dlrm"] == pytest.approx(rows["climber"]["auc"]["mean"] /
                                                                rows["dlrm"]["auc"]["mean"] - 1)
    assert report["command"].startswith("climber compare --data") and "--seeds 0 1" in report["command"]
    assert "Tuning: none." in md and report["versions"]["torch"] and "popularity" in md
    assert len(list(out.glob("runs/*/lr0.003_emb10_ewd0_neg16/seed*/run.json"))) == 4
    per_request = np.diff(SumiData(data_dir).a["req_cand_start"]).mean()
    assert report["flops_at"] == {"L": 8, "M": round(per_request)}  # FLOPs of a mean-sized request

    def no_training(*a, **kw):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_mod, "train", no_training)
    again = compare_mod.compare(data_dir, out, ["climber", "dlrm"], [0, 1], "tiny", TINY)
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in report["rows"]]
    with pytest.raises(ValueError, match="different config"):  # a changed budget never reuses old runs
        compare_mod.compare(data_dir, out, ["dlrm"], [0], "tiny", TrainConfig(epochs=2, batch_size=16))
    moved = tmp_path / "moved"  # runs trained elsewhere (another machine, another folder) copied in
    shutil.move(out, moved)
    again = compare_mod.compare(data_dir, moved, ["climber", "dlrm"], [0, 1], "tiny", TINY)
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in report["rows"]]


def test_grid_point_picked_on_validation_and_test_run_only_for_it(data_dir, tmp_path):
    out = tmp_path / "grid"
    grid = {"lr": (1e-3, 1e-2), "embedding_lr_mult": (1, 10)}
    report = compare_mod.compare(data_dir, out, ["transformer"], [0, 1], "tiny", TINY, grid)
    (row,) = report["rows"]
    by_point = row["valid_auc_by_point"]
    assert len(by_point) == 4 and compare_mod.point_tag(row["picked"]) == max(by_point, key=by_point.get)
    assert row["lr"] == row["picked"]["lr"]
    runs = {p.parent.parent.name: json.loads(p.read_text()) for p in out.glob("runs/transformer/*/seed0/run.json")}
    for tag, run in runs.items():  # each point trained with its own settings
        point = next(p for p in compare_mod.grid_points(TINY, grid) if compare_mod.point_tag(p) == tag)
        assert {k: run["config"]["train"][k] for k in point} == point
    tested = {p.parent.parent.name for p in out.glob("runs/transformer/*/seed*/test.json")}
    assert tested == {compare_mod.point_tag(row["picked"])}  # the other points never saw the test split
    md = (out / "compare.md").read_text()
    grid_text = "lr {0.001, 0.01}, embedding_lr_mult {1, 10}, embedding_weight_decay {0}, train_negatives {16}"
    assert grid_text + " (4 points)" in md
    # two request scenarios: each picked run's test per scenario, their mean in the row and the table
    scen = [json.loads(p.read_text()) for p in out.glob("runs/transformer/*/seed*/test_by_scenario.json")]
    assert len(scen) == 2 and set(row["auc_by_scenario"]) == {"0", "1"} and "Test AUC per request scenario" in md
    assert row["auc_by_scenario"]["1"]["mean"] == pytest.approx(np.mean([s["1"]["mean"]["auc"] for s in scen]))


def test_grid_rejects_unknown_axes():
    with pytest.raises(ValueError, match="grid axes"):
        compare_mod.grid_points(TINY, {"dropout": (0.1,)})


def test_train_only_jobs_leave_testing_to_the_last_call(data_dir, tmp_path, monkeypatch):
    """Parallel jobs train disjoint seeds with train_only (no test split touched, no table); the
    last call trains nothing, picks the point over all seeds and tests only that one."""
    out = tmp_path / "jobs"
    grid = {"lr": (1e-3, 1e-2)}
    for seed in (0, 1):
        assert compare_mod.compare(data_dir, out, ["dlrm"], [seed], "tiny", TINY, grid, train_only=True) is None
    assert not list(out.glob("runs/**/test.json")) and not (out / "compare.json").exists()
    monkeypatch.setattr(compare_mod, "train", lambda *a, **kw: pytest.fail("the last call trained a run"))
    report = compare_mod.compare(data_dir, out, ["dlrm"], [0, 1], "tiny", TINY, grid)
    (row,) = report["rows"]
    tested = {p.parent.parent.name for p in out.glob("runs/dlrm/*/seed*/test.json")}
    assert tested == {compare_mod.point_tag(row["picked"])} and len(row["test_per_seed"]) == 2


def test_negatives_axis_is_dropped_on_explicit_data(data_dir, tmp_path):
    """Explicit logs sample no training negatives: a negatives axis would train the same run
    twice, so it is dropped (one run directory per seed, at the budget's count)."""
    assert not SumiData(data_dir).implicit
    compare_mod.compare(data_dir, tmp_path / "c", ["dlrm"], [0], "tiny", TINY, {"train_negatives": (4, 16)},
                        train_only=True)
    assert [p.name for p in (tmp_path / "c" / "runs" / "dlrm").iterdir()] == ["lr0.003_emb10_ewd0_neg16"]


def test_per_domain_row_trains_one_model_per_scenario_on_its_requests(data_dir, tmp_path, monkeypatch):
    """climber-per-domain: one Climber per request scenario, trained and validated on that
    scenario's requests only, tested on its own; the row's metrics over the union of the
    scenarios' test predictions (the same candidates as a shared model's), resumable."""
    out = tmp_path / "dom"
    trained = []  # (run dir, training requests' scenarios, validation requests' scenarios)
    real_train = compare_mod.train

    def train_spy(data_dir, run_dir, mcfg, tcfg, runtime, progress=True):
        view = SumiData(data_dir, tcfg.scenarios)
        a = view.a
        trained.append((Path(run_dir).name, set(a["req_scenario"][view.requests("train")].tolist()),
                        set(a["req_scenario"][view.requests("valid")].tolist())))
        return real_train(data_dir, run_dir, mcfg, tcfg, runtime, progress)

    monkeypatch.setattr(compare_mod, "train", train_spy)
    report = compare_mod.compare(data_dir, out, ["climber", "climber-per-domain"], [0], "tiny", TINY)
    assert sorted(trained) == [("scenario0", {0}, {0}), ("scenario1", {1}, {1}), ("seed0", {0, 1}, {0, 1})]
    rows = {r["model"]: r for r in report["rows"]}
    dom, one = rows["climber-per-domain"], rows["climber"]
    assert dom["domain_models"] == 2 and dom["params"]["total"] == 2 * one["params"]["total"]
    assert dom["flops"] == one["flops"]  # a request goes through its scenario's model only
    for k in ("0", "1"):  # each domain model's saved run config names its scenario; its metrics are its own
        run_dir = out / "runs" / "climber-per-domain" / "lr0.003_emb10_ewd0_neg16" / "seed0" / f"scenario{k}"
        assert json.loads((run_dir / "run.json").read_text())["config"]["train"]["scenarios"] == [int(k)]
        assert json.loads((run_dir / "config.json").read_text())["train"]["scenarios"] == [int(k)]
        assert 0 < dom["auc_by_scenario"][k]["mean"] < 1
    seed_dir = out / "runs" / "climber-per-domain" / "lr0.003_emb10_ewd0_neg16" / "seed0"
    overall = json.loads((seed_dir / "test.json").read_text())
    assert dom["auc"]["mean"] == pytest.approx(overall["mean"]["auc"])
    # the union holds every test candidate, in the order a shared model's test has them
    data = SumiData(data_dir)
    run = {"run_dir": str(seed_dir), "domains": {k: str(seed_dir / f"scenario{k}") for k in ("0", "1")}}
    users, labels, _ = compare_mod._predict_test(data, run, Runtime(device="cpu"), 32)
    assert np.array_equal(labels, data.labels("test")) and len(users) == data.meta["counts"]["candidates_test"]
    assert "climber-per-domain: 2 Climbers, one per request scenario" in (out / "compare.md").read_text()

    monkeypatch.setattr(compare_mod, "train", lambda *a, **kw: pytest.fail("a finished domain run was trained again"))
    again = compare_mod.compare(data_dir, out, ["climber-per-domain"], [0], "tiny", TINY)
    assert again["rows"][0]["auc"] == dom["auc"]


def test_domain_jobs_train_one_scenario_each_and_the_last_call_reports(data_dir, tmp_path, monkeypatch):
    """`domain`: a job trains only that request scenario's model of a per-domain row (no test, no
    table), so parallel jobs cover the row's domains; the last call trains nothing and reports.
    A scenario the data does not have is an error before any training."""
    out = tmp_path / "jobs"
    trained = []
    real_train = compare_mod.train
    monkeypatch.setattr(compare_mod, "train", lambda d, run_dir, *a, **kw: trained.append(Path(run_dir).name)
                        or real_train(d, run_dir, *a, **kw))
    with pytest.raises(ValueError, match="request scenarios"):
        compare_mod.compare(data_dir, out, ["climber-per-domain"], [0], "tiny", TINY, domain=7)
    for k in (1, 0):
        assert compare_mod.compare(data_dir, out, ["climber-per-domain"], [0], "tiny", TINY, domain=k) is None
    assert trained == ["scenario1", "scenario0"] and not (out / "compare.json").exists()
    monkeypatch.setattr(compare_mod, "train", lambda *a, **kw: pytest.fail("the last call trained a run"))
    (row,) = compare_mod.compare(data_dir, out, ["climber-per-domain"], [0], "tiny", TINY)["rows"]
    assert row["domain_models"] == 2 and 0 < row["auc"]["mean"] < 1


def test_per_domain_row_needs_several_scenarios(tmp_path):
    import dataclasses

    d = tmp_path / "one"
    log = synthetic_log()
    prepare(dataclasses.replace(log, scenario=np.zeros_like(log.scenario)), d, PrepareConfig(request_gap=50,
            max_candidates=4), ("recent", "pos:like"))
    with pytest.raises(ValueError, match="one model per request scenario"):
        compare_mod.compare(d, tmp_path / "c", ["climber-per-domain"], [0], "tiny", TINY)


def test_merged_reports_equal_one_comparison_of_all_their_models(data_dir, tmp_path):
    """Rows trained in separate calls (say, one on a GPU and one on a CPU) merge into the table one
    call of all the models writes; reports of another protocol, or with a model twice, are refused."""
    kw = dict(seeds=[0], preset="tiny", train_cfg=TINY, runtime=Runtime(device="cpu"))
    both = compare_mod.compare(data_dir, tmp_path / "both", ["climber", "dlrm"], **kw)
    for name in ("climber", "dlrm"):  # the same runs, reported per model
        shutil.copytree(tmp_path / "both" / "runs" / name, tmp_path / name / "runs" / name)
    parts = [compare_mod.compare(data_dir, tmp_path / m, [m], **kw) for m in ("climber", "dlrm")]
    merged = compare_mod.merge(parts)
    assert [r["model"] for r in merged["rows"]] == ["dlrm", "climber"]
    for r, r_both in zip(merged["rows"], both["rows"]):
        assert r["test_per_seed"] == r_both["test_per_seed"]
        assert r["auc_impr_vs_dlrm"] == pytest.approx(r_both["auc_impr_vs_dlrm"])
    assert parts[0]["rows"][0]["auc_impr_vs_dlrm"] is None  # no DLRM in climber's own report
    md = compare_mod.to_markdown(merged)
    assert "Merged from 2 comparisons" in md and md.count("Command (the call that picked") == 2
    empty = {**parts[0], "rows": []}  # a merged report merges again, its sources kept
    assert compare_mod.merge([merged, empty])["sources"][:2] == merged["sources"]
    with pytest.raises(ValueError, match="models in more than one report"):
        compare_mod.merge([both, parts[1]])
    other = compare_mod.compare(data_dir, tmp_path / "other", ["dlrm"], **{**kw, "seeds": [1]})
    with pytest.raises(ValueError, match=r"\['seeds'\] differ"):
        compare_mod.merge([parts[0], other])
