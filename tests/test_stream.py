"""Out-of-core prepare (climber/data/stream.py): the same prepared files as the in-memory
`prepare` on the same log, clear errors on bad input, and no half-written output; a shard index
(`--shards`) that cuts between users in balance and leaves the arrays alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from climber.config import PrepareConfig
from climber.data import stream
from climber.data.events import DataError
from climber.data.readers import ColumnMapping, read_table
from climber.data.sumi import SAMPLE_BLOCK, SumiData, prepare, shard_index

EXPLICIT = ColumnMapping(user="uid", item="iid", time="ts", labels=("click", "like"), action="act",
                         scenario="tab", item_features=("cat",), user_features=("age",))
IMPLICIT = ColumnMapping(user="uid", item="iid", time="ts", scenario="tab")
CFG = PrepareConfig(request_gap=30, max_candidates=5, negatives=3, eval_requests=1)
STRATEGIES = ("recent", "scenario:1@4")


def log_table(n_users: int = 4 * SAMPLE_BLOCK + 37, seed: int = 0, text_ids: bool = False) -> pa.Table:
    """A random log in file order (not sorted by user or time) with tied timestamps, exact
    duplicate rows, sparse raw ids and side features with missing values."""
    rng = np.random.default_rng(seed)
    per_user = rng.integers(1, 12, n_users)
    raw_users = rng.choice(10**9, n_users, replace=False)
    uid = np.repeat(raw_users, per_user)
    n = len(uid)
    iid = rng.choice(10**6, 300, replace=False)[rng.integers(0, 300, n)]
    ts = 1_600_000_000 + rng.integers(0, 400, n) * 7
    cols = {"uid": uid, "iid": iid, "ts": ts, "click": rng.integers(0, 2, n), "like": rng.integers(0, 2, n),
            "act": rng.integers(0, 4, n), "tab": rng.integers(0, 3, n)}
    cat = pa.array(np.where(rng.random(n) < 0.2, None, iid % 7).tolist(), pa.int64())
    age = pa.array(np.where(rng.random(n) < 0.3, None, uid % 5).tolist(), pa.int64())
    dup = rng.integers(0, n, n // 20)  # exact copies of earlier rows, appended
    order = rng.permutation(n)
    table = pa.table({**cols, "cat": cat, "age": age}).take(np.concatenate([order, dup]))
    if text_ids:  # text ids with stray spaces, scenario names instead of numbers
        table = table.set_column(0, "uid", pa.array([f" u{u}" for u in table["uid"].to_pylist()]))
        table = table.set_column(6, "tab", pa.array(["feed", "search", "mix"][t] for t in table["tab"].to_pylist()))
    return table


def write_parts(table: pa.Table, root: Path, parts: int = 3) -> Path:
    """A Hive-style partitioned Parquet directory: consecutive slices in sorted subfolders."""
    step = -(-table.num_rows // parts)
    for k in range(parts):
        (root / f"day={k}").mkdir(parents=True)
        pq.write_table(table.slice(k * step, step), root / f"day={k}" / "part-0.parquet")
    return root


def assert_same_prepared(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def both(src: Path, mapping: ColumnMapping, tmp_path: Path, monkeypatch, partitions: int = 3,
         shards: int = 1) -> tuple[Path, Path, int]:
    """Prepare `src` in memory and streamed; returns both directories and the partitions built."""
    calls = []
    build = stream.build_users
    monkeypatch.setattr(stream, "build_users", lambda *a, **k: calls.append(a[1]) or build(*a, **k))
    prepare(read_table(src, mapping), tmp_path / "mem", CFG, STRATEGIES, shards)
    stream.prepare_stream(src, mapping, tmp_path / "stream", CFG, STRATEGIES, partitions=partitions,
                          batch_rows=700, shards=shards)
    return tmp_path / "mem", tmp_path / "stream", len(calls)


@pytest.mark.parametrize("mapping", [EXPLICIT, IMPLICIT], ids=["explicit", "implicit"])
def test_stream_prepare_equals_in_memory_on_a_partitioned_parquet_directory(tmp_path, monkeypatch, mapping):
    src = write_parts(log_table(), tmp_path / "log")
    mem, streamed, n_parts = both(src, mapping, tmp_path, monkeypatch)
    assert n_parts >= 3
    assert_same_prepared(mem, streamed)
    meta = json.loads((streamed / "meta.json").read_text())
    assert meta["counts"]["duplicates_dropped"] > 0 and meta["implicit"] == (mapping is IMPLICIT)
    assert SumiData(streamed).fingerprint == meta["fingerprint"]


def test_stream_prepare_equals_in_memory_on_csv_with_text_ids(tmp_path, monkeypatch):
    table = log_table(seed=1, text_ids=True)
    pacsv.write_csv(table, tmp_path / "log.csv")
    mem, streamed, n_parts = both(tmp_path / "log.csv", EXPLICIT, tmp_path, monkeypatch, partitions=4)
    assert n_parts >= 3
    assert_same_prepared(mem, streamed)
    assert SumiData(streamed).meta["vocab"]["n_scenarios"] == 3


def test_stream_prepare_of_one_partition_equals_many(tmp_path):
    src = write_parts(log_table(seed=2), tmp_path / "log")
    stream.prepare_stream(src, IMPLICIT, tmp_path / "one", CFG, STRATEGIES)
    stream.prepare_stream(src, IMPLICIT, tmp_path / "many", CFG, STRATEGIES, memory_limit=2000 * 2 * 400)
    assert_same_prepared(tmp_path / "one", tmp_path / "many")


def test_stream_bad_input_is_a_clear_error(tmp_path):
    table = log_table(n_users=300)
    bad = table.to_pydict()
    bad["like"][1200] = 2  # in the third batch of 500
    pacsv.write_csv(pa.table(bad), tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"bad.csv: line 1202: column 'like' must be 0/1"):
        stream.prepare_stream(tmp_path / "bad.csv", EXPLICIT, tmp_path / "out", CFG, STRATEGIES, batch_rows=500)
    write_parts(table.drop_columns(["ts"]), tmp_path / "nots")
    with pytest.raises(DataError, match=r"day=0/part-0.parquet: missing column\(s\) \['ts'\]"):
        stream.prepare_stream(tmp_path / "nots", EXPLICIT, tmp_path / "out", CFG, STRATEGIES)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "a.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        stream.prepare_stream(tmp_path / "torn", EXPLICIT, tmp_path / "out", CFG, STRATEGIES)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_stream_prepare_that_fails_midway_leaves_no_half_written_output(tmp_path, monkeypatch):
    src = write_parts(log_table(), tmp_path / "log")
    out = tmp_path / "out"
    stream.prepare_stream(src, EXPLICIT, out, CFG, STRATEGIES)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    build = stream.build_users

    def dies_on_the_second_partition(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C would
        return build(*a, **k)

    monkeypatch.setattr(stream, "build_users", dies_on_the_second_partition)
    with pytest.raises(KeyboardInterrupt):
        stream.prepare_stream(src, IMPLICIT, out, CFG, STRATEGIES, partitions=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous data, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "out"]  # no temporary or spill files


def test_stream_cli_prepares_the_same_data_as_without_stream(tmp_path, capsys):
    from climber.cli import main

    src = write_parts(log_table(n_users=300), tmp_path / "log")
    flags = ["--user", "uid", "--item", "iid", "--time", "ts", "--labels", "click", "like", "--scenario", "tab",
             "--request-gap", "30"]
    main(["prepare", str(src), "--out", str(tmp_path / "mem"), *flags, "--shards", "4"])
    main(["prepare", str(src), "--out", str(tmp_path / "stream"), *flags, "--stream", "--memory-limit", "0.001",
          "--shards", "4"])
    assert "streaming" in capsys.readouterr().out
    assert_same_prepared(tmp_path / "mem", tmp_path / "stream")
    assert len(SumiData(tmp_path / "stream").meta["shards"]["users"]) == 5
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "--shards N" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a built-in data set is not a table
        main(["prepare", "ml-100k", "--out", str(tmp_path / "x"), "--stream"])
    assert "--stream reads CSV/TSV/Parquet tables" in capsys.readouterr().err


def test_shard_index_cuts_between_users_in_balance_and_leaves_the_arrays_alone(tmp_path, monkeypatch):
    """--shards 3, in memory and streamed: the same directory, meta's index included; without the
    index, the directory of --shards 1 (the arrays and fingerprint byte for byte, no index). The
    shards tile the users, requests, events and candidates, no user's requests or events cross a
    boundary, and each holds E/N events give or take less than m, the most events of one user
    (`sumi.shard_index`, whose bound holds while m <= E/N, as here)."""
    src = write_parts(log_table(), tmp_path / "log")
    mem, streamed, _ = both(src, EXPLICIT, tmp_path, monkeypatch, shards=3)
    assert_same_prepared(mem, streamed)
    stream.prepare_stream(src, EXPLICIT, tmp_path / "one", CFG, STRATEGIES)
    for p in (tmp_path / "one").glob("*.npy"):
        assert p.read_bytes() == (streamed / p.name).read_bytes(), p.name
    one, three = (json.loads((d / "meta.json").read_text()) for d in (tmp_path / "one", streamed))
    index = three.pop("shards")
    assert three == one and "shards" not in one

    a = SumiData(streamed).a
    users, req, ev, cand = (np.array(index[k]) for k in ("users", "requests", "events", "candidates"))
    n_users, E = len(a["user_offsets"]) - 1, len(a["ev_item"])
    assert [users[0], req[0], ev[0], cand[0]] == [1, 0, 0, 0]
    assert [users[-1], req[-1], ev[-1], cand[-1]] == [n_users, len(a["req_user"]), E, len(a["cand_item"])]
    assert (np.diff(users) > 0).all() and (np.diff(req) > 0).all()
    for k in range(3):
        mine = a["req_user"][req[k]:req[k + 1]]
        assert ((mine >= users[k]) & (mine < users[k + 1])).all()
        assert a["user_offsets"][users[k]] == ev[k] and a["req_cand_start"][req[k]] == cand[k]
    m = np.diff(a["user_offsets"]).max()
    assert m <= E / 3 and (abs(np.diff(ev) - E / 3) < m).all()
    # a user with more than E/N events: no bound, but every shard keeps a user
    skewed = {"user_offsets": np.array([0, 0, 1, 101, 102, 103]), "req_user": np.arange(1, 5),
              "req_cand_start": np.arange(5)}
    assert shard_index(skewed, 3)["users"] == [1, 3, 4, 5]


def test_shards_of_zero_or_more_than_the_users_are_a_clear_error(tmp_path):
    table = log_table(n_users=40)
    pq.write_table(table, tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"--shards 0: a shard is a range of whole users, so 1 to 40"):
        prepare(read_table(tmp_path / "log.parquet", EXPLICIT), tmp_path / "out", CFG, STRATEGIES, shards=0)
    with pytest.raises(DataError, match=r"--shards 41: a shard is a range of whole users, so 1 to 40"):
        stream.prepare_stream(tmp_path / "log.parquet", EXPLICIT, tmp_path / "out", CFG, STRATEGIES, shards=41)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.parquet"]
    stream.prepare_stream(tmp_path / "log.parquet", EXPLICIT, tmp_path / "out", CFG, STRATEGIES, shards=40)
    assert np.diff(SumiData(tmp_path / "out").meta["shards"]["users"]).tolist() == [1] * 40
