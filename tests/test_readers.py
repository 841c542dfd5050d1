"""Tests of climber.data.readers: each reader on slices of the shared data, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from climber.data.events import DataError
from climber.data.fetch import ML100K_FILES, fetch_movielens
from climber.data.readers import (
    ColumnMapping,
    read_grocery,
    read_kuairand,
    read_movielens,
    read_recbole,
    read_s3rec,
    read_source,
    read_table,
    shared_data_dir,
)

SHARED = shared_data_dir()
OFFICIAL_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
    "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
    "is_profile_enter,is_rand,tab"
)


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set CLIMBER_SHARED_DATA to the shared/data folder)")
    return path


def head(src: Path, dst: Path, n: int = 200) -> Path:
    """Copy the first n lines of src to dst."""
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(line for _, line in zip(range(n), f, strict=False)), encoding="utf-8")
    return dst


def raises_at(fn, path: Path, where: str) -> None:
    """fn() raises DataError naming the file and the place (e.g. 'line 3')."""
    with pytest.raises(DataError) as err:
        fn()
    assert str(path) in str(err.value) and where in str(err.value), str(err.value)


# ---------------------------------------------------------------- readers on real slices


def test_kuairand_subset_slice(tmp_path):
    path = head(shared("kuairand-subset/events.tsv"), tmp_path / "events.tsv")
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    log = read_kuairand(path)
    assert len(log) == len(rows) == 199
    assert log.tasks == ("click", "long_view", "like") and not log.implicit
    assert log.notes["format"] == "shared subset"
    for j, col in enumerate(("is_click", "long_view", "label")):
        assert log.labels[:, j].tolist() == [int(r[col]) for r in rows]
    assert log.time.tolist() == [int(r["time_ms"]) // 1000 for r in rows]
    assert (log.scenario == 0).all() and log.action.max() <= 15
    assert set(log.item_features.ids) == {int(r["video_id"]) for r in rows}
    assert log.item_features.names == ("duration",)


def test_kuairand_official_format_action_and_scenario(tmp_path):
    path = tmp_path / "log_standard_4_08_to_4_21_pure.csv"
    path.write_text(
        OFFICIAL_HEADER + "\n"
        # user 3 video 1071: clicked, long view, liked, followed and forwarded (bits 1 + 4) on tab 1
        "3,1071,20220408,1600,1649408076860,1,1,1,0,1,0,1,175045,87433,0,0,0,0,1\n"
        # comment and profile enter (bits 2 + 8), tab 4, duration unknown (0)
        "3,1072,20220408,1600,1649408079999,0,0,0,1,0,1,0,0,0,0,0,1,0,4\n"
    )
    log = read_kuairand(path)
    assert log.notes["format"] == "official"
    assert log.labels.tolist() == [[1, 1, 1], [0, 0, 0]]
    assert log.action.tolist() == [1 | 4, 2 | 8]
    assert log.scenario.tolist() == [1, 4]
    assert log.time.tolist() == [1649408076, 1649408079]
    # 87.4 s lies in [64 s, 128 s): bucket 1 + 7; a 0 duration is missing
    assert log.item_features.codes[:, 0].tolist() == [8, 0]


def test_s3rec_slice_time_is_position(tmp_path):
    path = head(shared("s3rec/LastFM.txt"), tmp_path / "LastFM.txt")
    attrs = json.loads(shared("s3rec/LastFM_item2attributes.json").read_text())
    (tmp_path / "LastFM_item2attributes.json").write_text(json.dumps(attrs))
    lines = [list(map(int, line.split())) for line in path.read_text().splitlines()]
    log = read_s3rec(path)
    assert len(log) == sum(len(seq) - 1 for seq in lines)
    assert log.implicit and log.tasks == ("interact",) and (log.labels == 1).all()
    first = lines[0]
    assert log.user[: len(first) - 1].tolist() == [first[0]] * (len(first) - 1)
    assert log.item[: len(first) - 1].tolist() == first[1:]
    assert log.time[: len(first) - 1].tolist() == list(range(len(first) - 1))
    feats = log.item_features  # a bag of each item's first 32 attributes
    assert feats.names == ("attr",) * 32 and feats.widths == (32,) and set(feats.ids) == set(log.item)
    every = sorted({a for vs in attrs.values() for a in vs[:32]})  # codes 1.. in sorted order of the values
    for r, item in enumerate(feats.ids):
        want = [every.index(a) + 1 for a in attrs[str(item)][:32]]
        assert feats.codes[r].tolist() == want + [0] * (32 - len(want))


def test_s3rec_without_attributes(tmp_path):
    path = tmp_path / "Toy.txt"
    path.write_text("1 5 6 7\n2 6 5\n")
    log = read_s3rec(path)
    assert log.item_features is None and log.name == "toy"
    assert log.time.tolist() == [0, 1, 2, 0, 1]


def test_grocery_slice(tmp_path):
    head(shared("grocery/events.tsv"), tmp_path / "events.tsv")
    head(shared("grocery/item_meta.tsv"), tmp_path / "item_meta.tsv", n=10_000)
    log = read_grocery(tmp_path)
    assert len(log) == 199 and log.implicit and log.tasks == ("purchase",)
    with open(tmp_path / "item_meta.tsv", encoding="utf-8") as f:
        category = {int(r["item_id"]): int(r["i_category"]) + 1 for r in csv.DictReader(f, delimiter="\t")}
    feats = log.item_features
    assert feats.names == ("category",)
    assert feats.codes[:, 0].tolist() == [category[int(i)] for i in feats.ids]


def test_read_source_by_name():
    shared("s3rec/LastFM.txt")
    log = read_source("lastfm")
    assert log.name == "lastfm" and len(log) == 52_551


# ---------------------------------------------------------------- MovieLens on a fake ml-100k


def fake_ml100k(root: Path) -> Path:
    root.mkdir()
    (root / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t5\t881250949\n1\t11\t3\t881250950\n2\t10\t4\t881250000\n2\t12\t1\t881250001\n"
    )
    (root / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t56\tF\tother\tT8H1N\n"
    )
    (root / "ml-100k.item").write_bytes(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\n11\tMis\xe9rables, Les\t1995\tDrama Musical\n"
        "12\tSomething\tunkonwn\tunknown\n".encode("latin-1")
    )
    return root


def test_movielens_fake(tmp_path):
    log = read_movielens(fake_ml100k(tmp_path / "ml"))
    rating = np.array([5, 3, 4, 1])
    assert log.tasks == ("like",) and len(log) == 4
    assert log.labels[:, 0].tolist() == (rating >= 4).astype(int).tolist()
    assert log.labels.mean() == (rating >= 4).mean()
    assert log.action.tolist() == rating.tolist()
    assert log.time.tolist() == [881250949, 881250950, 881250000, 881250001]
    users = log.user_features
    assert users.names == ("age", "gender", "occupation", "zip1")
    # age 24 -> bucket 18-24 (2), 56 -> 56+ (7); codes in sorted order (F, M; other, technician);
    # zip 8... -> 9, a non-digit zip -> 11
    assert users.codes.tolist() == [[2, 2, 2, 9], [7, 1, 1, 11]]
    items = log.item_features
    assert items.names == ("genre", "genre", "genre", "decade") and items.widths == (3, 1)
    # a bag of genres, sorted: Animation 1, Children's 2, Comedy 3, Drama 4, Musical 5, unknown 6;
    # one decade (1990s) and a missing year
    assert items.codes.tolist() == [[1, 2, 3, 1], [4, 5, 0, 1], [6, 0, 0, 0]]
    assert items.cards == (7, 2)


def test_fetch_movielens_uses_cache(tmp_path):
    for name in ML100K_FILES:
        (tmp_path / name).write_text("x")
    assert fetch_movielens(tmp_path) == tmp_path  # present: no download


# ---------------------------------------------------------------- generic tables


def test_read_table_csv_strings_and_units(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("u,i,t,click,cat,tab\nbob,x,3000,1,a,home\nann,y,1000,0,,feed\nbob,y,2000,true,b,home\n")
    mapping = ColumnMapping(
        "u", "i", "t", labels=("click",), scenario="tab", item_features=("cat",), time_unit="ms"
    )
    log = read_table(path, mapping)
    assert log.user.tolist() == [1, 0, 1] and log.item.tolist() == [0, 1, 1]  # codes in sorted order
    assert log.time.tolist() == [3, 1, 2]  # unsorted times are kept in file order
    assert log.tasks == ("click",) and log.labels[:, 0].tolist() == [1, 0, 1]
    assert log.scenario.tolist() == [1, 0, 1]
    # item y: first row has no category, the next has 'b' -> first non-missing value wins
    assert log.item_features.codes[:, 0].tolist() == [1, 2]


def test_read_table_parquet_implicit(tmp_path):
    path = tmp_path / "log.parquet"
    ts = pa.array([5_500, 6_000], pa.timestamp("ms"))
    pq.write_table(pa.table({"user": [7, 8], "item": [70, 80], "ts": ts, "stars": [1, 5]}), path)
    log = read_source(str(path), user="user", item="item", time="ts", action="stars")
    assert log.implicit and log.tasks == ("interact",)
    assert log.user.tolist() == [7, 8] and log.action.tolist() == [1, 5]
    assert log.time.tolist() == [5, 6]  # a timestamp column is converted by its own unit


# ---------------------------------------------------------------- bad input


def test_empty_file(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("")
    raises_at(lambda: read_kuairand(path), path, "empty file")


def test_header_only(tmp_path):
    (tmp_path / "events.tsv").write_text("user_id\titem_id\ttime\n")
    raises_at(lambda: read_grocery(tmp_path), tmp_path / "events.tsv", "no data rows")


def test_missing_column(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("user_id\titem_id\n1\t2\n")
    raises_at(lambda: read_grocery(tmp_path), path, "missing column(s) ['time']")
    with pytest.raises(DataError, match=r"columns found: \['user_id', 'item_id'\]"):
        read_grocery(tmp_path)


def test_short_row(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("user_id\titem_id\ttime\n1\t2\t3\n\n1\t4\n")  # the blank line 3 still counts
    raises_at(lambda: read_grocery(tmp_path), path, "line 4: 2 fields, the header has 3")


def test_non_numeric_timestamp(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("user_id\titem_id\ttime\n1\t2\t3\n1\t4\t5\n1\t5\tyesterday\n")
    raises_at(
        lambda: read_grocery(tmp_path), path, "line 4: column 'time' must be an integer, got 'yesterday'"
    )


def test_negative_timestamp(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("u,i,t\n1,2,3\n1,3,-4\n")
    raises_at(lambda: read_table(path, ColumnMapping("u", "i", "t")), path, "line 3: column 't': negative")


def test_missing_id(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("user_id\titem_id\ttime\n1\t2\t3\n\t4\t5\n")
    raises_at(lambda: read_grocery(tmp_path), path, "line 3: column 'user_id' is empty")


def test_bad_label(tmp_path):
    path = tmp_path / "events.tsv"
    lines = head(shared("kuairand-subset/events.tsv"), path, n=5).read_text().splitlines()
    cells = lines[3].split("\t")
    cells[-2] = "2"  # the `label` column
    lines[3] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")
    raises_at(lambda: read_kuairand(path), path, "line 4: column 'label' must be 0/1, got '2'")


def test_bad_rating_and_parquet_label(tmp_path):
    root = fake_ml100k(tmp_path / "ml")
    inter = root / "ml-100k.inter"
    inter.write_text(inter.read_text() + "3\t10\t7\t881250002\n")
    raises_at(lambda: read_movielens(root), inter, "line 6: column 'rating:float' must be 1..5, got 7.0")
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"u": [1, 2, 3], "i": [1, 2, 3], "t": [1, 2, 3], "y": [0, 1, 3]}), path)
    raises_at(lambda: read_table(path, ColumnMapping("u", "i", "t", labels=("y",))), path, "row 3")


def test_s3rec_bad_lines(tmp_path):
    path = tmp_path / "Seq.txt"
    path.write_text("1 2 3\n2 4 x5\n")
    raises_at(lambda: read_s3rec(path), path, "line 2: 'x5' is not an integer id")
    path.write_text("1 2 3\n2\n")
    raises_at(lambda: read_s3rec(path), path, "line 2: user 2 has no items")
    path.write_text("1 2 3\n1 4\n")
    raises_at(lambda: read_s3rec(path), path, "line 2: user 1 already has line 1")


# ---------------------------------------------------------------- input policy (docs/design.md)


def test_ids_are_stripped_of_whitespace(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("u,i,t,tab\nbob,12,1,home\n bob , 12 ,2, home\nann,7,3,feed \n")
    log = read_table(path, ColumnMapping("u", "i", "t", scenario="tab"))
    assert log.user.tolist() == [1, 1, 0] and log.item.tolist() == [12, 12, 7]  # " 12 " is the integer 12
    assert log.scenario.tolist() == [1, 1, 0]


@pytest.mark.parametrize("bad", ["NaN", "nan", "NULL", "None", "  "])
def test_null_or_nan_ids_are_rejected_at_their_line(tmp_path, bad):
    path = tmp_path / "log.csv"
    path.write_text(f"u,i,t\nbob,1,1\nann,2,2\n{bad},3,3\n")
    raises_at(lambda: read_table(path, ColumnMapping("u", "i", "t")), path, "line 4: column 'u': missing id")


def test_nan_ids_in_parquet_are_rejected_at_their_row(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"u": [1.0, float("nan"), 3.0], "i": [1, 2, 3], "t": [1, 2, 3]}), path)
    raises_at(lambda: read_table(path, ColumnMapping("u", "i", "t")), path, "row 2: column 'u': missing id")


@pytest.mark.parametrize("value, unit, hint", [
    ("1700000000000", "s", "ms"),
    ("1700000000000000", "s", "us"),
    ("1700000000000000", "ms", "us"),
    ("1700000000000000000", "s", "ns"),
    ("1e20", "s", None),
])
def test_implausible_timestamps_are_rejected_with_a_time_unit_hint(tmp_path, value, unit, hint):
    path = tmp_path / "log.csv"
    path.write_text(f"u,i,t\n1,2,1000\n1,3,{value}\n")
    message = f"it looks like {hint}: pass --time-unit {hint}" if hint else "timestamp outside int64"
    with pytest.raises(DataError, match=message) as err:
        read_table(path, ColumnMapping("u", "i", "t", time_unit=unit))
    assert f"{path}: line 3: column 't': " in str(err.value)
    if hint:  # ... and the hint is right
        assert read_table(path, ColumnMapping("u", "i", "t", time_unit=hint)).time[1] == 1_700_000_000


def test_invalid_utf8_error_names_the_line(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(b"u,i,t\nbob,1,1\nann,2,2\nb\xffb,3,3\n")
    raises_at(lambda: read_table(path, ColumnMapping("u", "i", "t")), path, "line 4: not valid utf-8")


def test_prepare_a_table_without_column_flags_is_a_clear_error(tmp_path, capsys):
    from climber.cli import main

    path = tmp_path / "logs.csv"
    path.write_text("uid,iid,ts\n1,2,3\n")
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", str(path), "--out", str(tmp_path / "x"), "--user", "uid"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert "needs its columns named: --item COLUMN --time COLUMN (columns found: ['uid', 'iid', 'ts'])" in err


# ---------------------------------------------------------------- explicit formats, RecBole, Parquet sets


def test_prepare_s3rec_by_path_with_format(tmp_path, capsys):
    from climber.cli import main

    path = tmp_path / "seqs.txt"
    path.write_text("".join(f"{u} " + " ".join(str(10 + (u * 7 + k) % 30) for k in range(8)) + "\n"
                            for u in range(1, 13)))
    main(["prepare", str(path), "--format", "s3rec", "--out", str(tmp_path / "d"), "--request-gap", "0",
          "--max-candidates", "1"])
    out = capsys.readouterr().out
    assert "prepared seqs" in out and "96 events, 12 users" in out
    with pytest.raises(DataError, match="a table needs its columns named"):  # without --format: a table
        read_source(str(path))


def recbole_files(root: Path, label: str = "1.0") -> Path:
    """A RecBole atomic data set: string user ids, float labels, .user and .item side files."""
    root.mkdir(exist_ok=True)
    (root / "shop.inter").write_text(
        "user_id:token\titem_id:token\tlabel:float\ttimestamp:float\tprice:float\n"
        f"ann\t7\t{label}\t100\t1.5\nbob\t7\t0.0\t90\t2.0\nann\t8\t0.0\t120\t3.0\nbob\t9\t1\t130\t1.0\n")
    (root / "shop.user").write_text("user_id:token\tage:token\tscore:float\nbob\t30\t0.5\nann\t20\t0.1\n"
                                    "cid\t40\t0.2\n")
    (root / "shop.item").write_text("item_id:token\tgenres:token_seq\tbrand:token\n7\tdrama comedy\tx\n"
                                    "8\tdrama\ty\n9\t\tx\n")
    return root / "shop.inter"


def test_recbole_typed_header_float_labels_and_side_files(tmp_path):
    log = read_source(str(recbole_files(tmp_path / "rb")))  # .inter: recbole without --format
    assert log.tasks == ("label",) and not log.implicit
    assert log.labels[:, 0].tolist() == [1, 0, 0, 1]
    assert log.user.tolist() == [0, 1, 0, 1]  # ann, bob coded in sorted order
    assert log.time.tolist() == [100, 90, 120, 130]
    u = log.user_features
    assert u.names == ("age",) and u.ids.tolist() == [0, 1]  # float field left out; cid not in the log
    assert u.codes[:, 0].tolist() == [1, 2]  # ann 20, bob 30
    i = log.item_features
    assert i.names == ("genres", "genres", "brand") and i.ids.tolist() == [7, 8, 9]
    assert i.codes.tolist() == [[2, 1, 1], [2, 0, 2], [0, 0, 1]]  # bag (comedy 1, drama 2), brand


def test_recbole_feature_choice_implicit_and_position_time(tmp_path):
    root = tmp_path / "rb"
    root.mkdir()
    (root / "seq.inter").write_text("user_id:token\titem_id:token\n5\t1\n6\t2\n5\t3\n5\t2\n")
    (root / "seq.item").write_text("item_id:token\tbrand:token\tgenres:token_seq\n1\ta\tx y\n2\tb\ty\n3\ta\tz\n")
    log = read_recbole(root / "seq.inter", item_features=("brand",))
    assert log.implicit and log.tasks == ("interact",)
    assert log.time.tolist() == [0, 0, 1, 2]  # position in the user's sequence
    assert log.item_features.names == ("brand",)


@pytest.mark.parametrize("label, where", [("0.5", "line 2: field 'label' must be 0/1"),
                                          ("yes", "line 2: column 'label:float' must be a number")])
def test_recbole_bad_label_names_the_line(tmp_path, label, where):
    path = recbole_files(tmp_path / "rb", label)
    raises_at(lambda: read_recbole(path), path, where)


def test_recbole_header_without_types_is_a_clear_error(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text("user_id\titem_id\n1\t2\n")
    with pytest.raises(DataError, match="is not name:type"):
        read_source(str(path), "recbole")


def parquet_parts(root: Path) -> Path:
    root.mkdir()
    for k in range(3):
        pq.write_table(pa.table({"uid": [k, k, 9], "iid": [1, 2, 3 + k], "ts": [10 * k, 10 * k + 1, 50 + k]}),
                       root / f"part-{k}.parquet")
    return root


def test_parquet_directory_and_glob(tmp_path):
    root = parquet_parts(tmp_path / "events")
    m = ColumnMapping("uid", "iid", "ts")
    for src in (root, root / "part-*.parquet"):
        log = read_source(str(src), mapping=m)
        assert log.user.tolist() == [0, 0, 9, 1, 1, 9, 2, 2, 9] and log.time.tolist()[-1] == 52
        assert log.name == "events"
    assert len(read_source(str(root / "part-[01].parquet"), "parquet", mapping=m)) == 6


def test_parquet_set_row_error_names_its_file(tmp_path):
    root = parquet_parts(tmp_path / "events")
    pq.write_table(pa.table({"uid": [3, None], "iid": [1, 2], "ts": [1, 2]}), root / "part-3.parquet")
    raises_at(lambda: read_source(str(root), user="uid", item="iid", time="ts"), root / "part-3.parquet",
              "row 2: column 'uid' is empty")
    with pytest.raises(DataError, match="no Parquet files found"):
        read_source(str(tmp_path / "events" / "*.pq"), "parquet", user="uid", item="iid", time="ts")


def test_builtin_without_shared_data_says_where_it_comes_from(tmp_path, monkeypatch, capsys):
    from climber.cli import main

    monkeypatch.setenv("CLIMBER_SHARED_DATA", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["prepare", "kuairand", "--out", str(tmp_path / "k")])
    err = capsys.readouterr().err
    assert f"{tmp_path / 'kuairand-subset' / 'events.tsv'} not found" in err
    assert "CLIMBER_SHARED_DATA" in err and "https://kuairand.com" in err and "--format kuairand" in err
    for name in ("lastfm", "beauty", "grocery"):
        with pytest.raises(DataError, match="The data comes from"):
            read_source(name)
