"""`climber predict`: a file of (user, item[, time, scenario]) rows scored in batches equals the
serving engine's scores of the same requests one at a time (unknown users and items included),
in CSV and Parquet; malformed rows are errors that name their line or row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from climber.cli import main
from climber.serve.engine import Engine, ScoreRequest
from tests.serve_helpers import ITEMS, USERS, make_checkpoint

UNKNOWN_USER, UNKNOWN_ITEM = 999, 1001  # ITEMS are even


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("predict"))


def request_rows() -> dict[str, list[int]]:
    """Rows of five requests, interleaved: user 101 at two times, 102 in scenario 1, an unknown
    user, and an unknown item among known ones."""
    rows = []
    requests = ((101, 2_000_000, 0, ITEMS[:4]), (102, 2_000_000, 1, ITEMS[3:9]),
                (UNKNOWN_USER, 2_000_100, 0, ITEMS[:3]), (101, 2_500_000, 0, [*ITEMS[5:7], UNKNOWN_ITEM]),
                (USERS[4], 2_000_000, 1, ITEMS[10:12]))
    for user, t, scen, items in requests:
        rows += [(user, int(i), t, scen) for i in items]
    order = np.random.default_rng(0).permutation(len(rows))
    return {c: [int(rows[k][j]) for k in order] for j, c in enumerate(("user", "item", "time", "scenario"))}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_predict_equals_engine_scores_one_request_at_a_time(ckpt, tmp_path, fmt, capsys):
    rows = request_rows()
    req = tmp_path / f"requests.{fmt}"
    (pacsv.write_csv if fmt == "csv" else pq.write_table)(pa.table(rows), req)
    out = tmp_path / f"scores.{'parquet' if fmt == 'csv' else 'csv'}"  # either way round
    main(["predict", "--checkpoint", str(ckpt), "--requests", str(req), "--out", str(out), "--batch-size", "2",
          "--device", "cpu"])
    assert "scored 18 rows (5 requests; 1 unknown users," in capsys.readouterr().out
    got = (pq.read_table if out.suffix == ".parquet" else pacsv.read_csv)(out).to_pydict()
    assert list(got) == ["user", "item", "time", "scenario", "click", "like"]
    for c in ("user", "item", "time", "scenario"):
        assert got[c] == rows[c]  # input order kept

    engine = Engine.from_checkpoint(ckpt)
    for k in range(len(rows["user"])):
        u, t, s = rows["user"][k], rows["time"][k], rows["scenario"][k]
        same = [j for j in range(len(rows["user"])) if (rows["user"][j], rows["time"][j], rows["scenario"][j]) ==
                (u, t, s)]
        items, _ = engine.item_ids(np.array([rows["item"][j] for j in same]))
        want = engine.score_requests([ScoreRequest(items, s, t, u)])[0].probs[same.index(k)]
        np.testing.assert_allclose([got["click"][k], got["like"][k]], want, atol=1e-5)  # padding: rounding


def test_predict_scores_do_not_depend_on_the_batch(ckpt, tmp_path):
    req = tmp_path / "requests.csv"
    pacsv.write_csv(pa.table(request_rows()), req)
    outs = []
    for bs in ("1", "64"):
        main(["predict", "--checkpoint", str(ckpt), "--requests", str(req), "--out", str(tmp_path / f"{bs}.csv"),
              "--batch-size", bs, "--device", "cpu"])
        outs.append(pacsv.read_csv(tmp_path / f"{bs}.csv").to_pydict())
    np.testing.assert_allclose(outs[0]["like"], outs[1]["like"], atol=1e-5)
    assert outs[0]["like"] != outs[0]["click"]


@pytest.mark.parametrize("text, message", [
    ("user,item\n101,1000\n102,abc\n", "line 3: column 'item' must be an integer, got 'abc'"),
    ("user,item,time\n101,1000,5\n\n,1002,6\n", "line 4: column 'user' is empty"),
    ("user,item,scenario\n101,1000,0\n101,1002,7\n", "line 3: column 'scenario' must be in 0..1, got 7"),
    ("user,item,time\n101,1000,-5\n", "line 2: column 'time': negative timestamp"),
    ("user,item,time\n101,1000\n", "line 2: 2 fields, the header has 3"),
    ("uid,item\n101,1000\n", "missing column(s) ['user']"),
])
def test_predict_malformed_row_names_it(ckpt, tmp_path, capsys, text, message):
    req = tmp_path / "requests.csv"
    req.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["predict", "--checkpoint", str(ckpt), "--requests", str(req), "--out", str(tmp_path / "o.csv")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{req}: {message}" in err, err
    assert not (tmp_path / "o.csv").exists()


def test_predict_parquet_row_and_output_suffix(ckpt, tmp_path, capsys):
    req = tmp_path / "requests.parquet"
    pq.write_table(pa.table({"user": [101, 102], "item": [1000, None]}, pa.schema([("user", pa.int64()),
                                                                                  ("item", pa.int64())])), req)
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(ckpt), "--requests", str(req), "--out", str(tmp_path / "o.csv")])
    assert f"{req}: row 2: column 'item' is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(ckpt), "--requests", str(req), "--out", str(tmp_path / "o.json")])
    assert "must end in .csv or .parquet" in capsys.readouterr().err
