"""Readers: turn each public data format into an `EventLog` (see events.py).

Sources: MovieLens-100K (RecBole atomic files), KuaiRand (the shared subset or the official
`log_standard_*.csv`), S3-Rec sequence text (LastFM, Beauty), the ReChorus Grocery files, any
RecBole atomic `.inter` file with its `.user` / `.item` side files, and any CSV/TSV/Parquet table
(a Parquet directory or glob too) through a `ColumnMapping`; `read_source` picks one by name, or
reads a path in the format it is told. `read_requests` reads the rows `climber predict` scores.

Policies:
- Ids stay raw integers (strings in generic tables, stripped of surrounding whitespace, become
  integer codes in sorted order); time is integer seconds, or the position in the user's sequence
  for S3-Rec, which has no timestamps. A generic table's timestamps must read as seconds before
  the year 2200 (`--time-unit` scales ms/us/ns; values that look like one get that hint).
- Rows keep file order and timestamps need not be sorted: `sumi.prepare` later sorts events
  stably by (user, time), so ties keep file order.
- Bad input never passes silently. Every problem raises `DataError` naming the file and, where
  one applies, the 1-based line (text; the header is line 1, blank lines count) or row (Parquet).
  A missing id, label or timestamp is an error, never a dropped row (a missing id: empty, NaN, or
  the text nan/null/none); a missing side-feature value is code 0. Text that is not valid UTF-8
  is an error at its line. pyarrow parse errors do not always say where, so on one we re-scan the file with the
  `csv` module to find the first bad line.
- Side features cover the ids that occur in the log; for per-row features (KuaiRand, generic
  tables) an id gets its first non-missing value in file order.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from climber.data.datasets import FORMATS
from climber.data.events import DataError, EventLog, SideFeatures
from climber.data.fetch import fetch_movielens

INT, FLOAT, STR, BOOL = pa.int64(), pa.float64(), pa.string(), pa.bool_()
# pyarrow's default spellings of booleans; a label column accepts exactly these.
_TRUE, _FALSE = ("1", "True", "TRUE", "true"), ("0", "False", "FALSE", "false")
_INT_RE = re.compile(r"\s*-?\d+\s*")


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return "_" not in v  # Python accepts 1_000, pyarrow does not


# Per pyarrow type: does a text field parse, and what it should have been (for the message).
_PARSES = {
    str(INT): (lambda v: _INT_RE.fullmatch(v) is not None, "an integer"),
    str(FLOAT): (_is_float, "a number"),
    str(BOOL): (lambda v: v in _TRUE + _FALSE, "0/1"),
}


# ---------------------------------------------------------------- locating rows in files


@dataclass(frozen=True)
class _Text:
    """A delimited text file with its header: reads records and maps a row index to its line."""

    path: Path
    delimiter: str
    encoding: str
    header: tuple[str, ...]

    def records(self) -> Iterator[tuple[int, list[str]]]:
        """(line number, fields) of each data record, skipping blank lines as pyarrow does."""
        with open(self.path, newline="", encoding=_py_encoding(self.encoding), errors="replace") as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            next(rec for rec in reader if rec)  # the header
            for rec in reader:
                if rec:
                    yield reader.line_num, rec

    def where(self, row: int) -> str:
        line, _ = next(islice(self.records(), row, None))
        return f"{self.path}: line {line}"


@dataclass(frozen=True)
class _Parquet:
    """A Parquet file, or several read as one table (a directory or a glob): rows are located
    in the file they came from."""

    path: Path
    parts: tuple[tuple[Path, int], ...] = ()  # (file, rows) in table order, when several

    def where(self, row: int) -> str:
        for file, n in self.parts:
            if row < n:
                return f"{file}: row {row + 1}"
            row -= n
        return f"{self.path}: row {row + 1}"


_Src = _Text | _Parquet


def _py_encoding(encoding: str) -> str:
    return "utf-8-sig" if encoding == "utf-8" else encoding  # pyarrow skips a UTF-8 BOM; so must we


def _check(src: _Src, bad: np.ndarray, what: str, values: np.ndarray | None = None) -> None:
    """Raise DataError at the first row where `bad` holds."""
    if bad.any():
        row = int(np.argmax(bad))
        got = "" if values is None else f", got {values[row]}"
        raise DataError(f"{src.where(row)}: {what}{got}")


def _require(path: Path, found: tuple[str, ...] | list[str], needed: list[str]) -> None:
    missing = [c for c in dict.fromkeys(needed) if c not in found]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns found: {list(found)}")


# ---------------------------------------------------------------- parsing


def _open_text(path: Path, encoding: str = "utf-8", delimiter: str | None = None) -> _Text:
    """Read the header (the first non-blank line); sniff the delimiter from it when not given."""
    path = Path(path)
    try:
        with open(path, newline="", encoding=_py_encoding(encoding), errors="replace") as f:
            first = next((line for line in f if line.strip("\r\n")), None)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if first is None:
        raise DataError(f"{path}: empty file")
    if delimiter is None:
        delimiter = max("\t,;|", key=first.count)
    return _Text(path, delimiter, encoding, tuple(next(csv.reader([first], delimiter=delimiter))))


def _read_text(src: _Text, types: dict[str, pa.DataType]) -> pa.Table:
    """Parse the columns in `types` (all required); only an empty field is null."""
    _require(src.path, src.header, list(types))
    try:
        table = pacsv.read_csv(
            src.path,
            read_options=pacsv.ReadOptions(encoding=src.encoding),
            parse_options=pacsv.ParseOptions(delimiter=src.delimiter),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=list(types), null_values=[""], strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as e:
        raise DataError(_first_bad_line(src, types) or f"{src.path}: {e}") from e
    if table.num_rows == 0:
        raise DataError(f"{src.path}: no data rows after the header")
    return table


def _first_bad_line(src: _Text, types: dict[str, pa.DataType]) -> str | None:
    """Find where pyarrow failed: the first record with a wrong field count or an unparseable field."""
    checks = [
        (i, name, *_PARSES[str(types[name])])
        for i, name in enumerate(src.header)
        if name in types and str(types[name]) in _PARSES
    ]
    for line, rec in src.records():
        if len(rec) != len(src.header):
            return f"{src.path}: line {line}: {len(rec)} fields, the header has {len(src.header)}"
        for i, name, parses, what in checks:
            if rec[i] != "" and not parses(rec[i]):
                return f"{src.path}: line {line}: column {name!r} must be {what}, got {rec[i]!r}"
    with open(src.path, "rb") as f:  # records() decoded leniently: find a line that does not decode
        for line, raw in enumerate(f, 1):
            try:
                raw.decode(_py_encoding(src.encoding))
            except UnicodeDecodeError as e:
                return f"{src.path}: line {line}: not valid {src.encoding} ({e.reason} at byte {e.start})"
    return None


# ---------------------------------------------------------------- column conversion


def _no_nulls(src: _Src, table: pa.Table, name: str) -> pa.ChunkedArray:
    col = table[name]
    if col.null_count:
        _check(src, col.is_null().to_numpy(zero_copy_only=False), f"column {name!r} is empty")
    return col


def _required(src: _Src, table: pa.Table, name: str) -> np.ndarray:
    return _no_nulls(src, table, name).to_numpy()


def _flags(src: _Src, table: pa.Table, name: str) -> np.ndarray:
    """A 0/1 column: booleans, or integers that are all 0 or 1."""
    col = table[name]
    if not (pa.types.is_boolean(col.type) or pa.types.is_integer(col.type)):
        raise DataError(f"{src.path}: column {name!r} has type {col.type}; labels must be 0/1 or booleans")
    v = _required(src, table, name).astype(np.int64)
    _check(src, (v != 0) & (v != 1), f"column {name!r} must be 0/1", v)
    return v.astype(np.int8)


def _nonneg_time(src: _Src, t: np.ndarray, name: str) -> None:
    if t.dtype.kind == "f":
        _check(src, ~np.isfinite(t), f"column {name!r}: timestamp is not a finite number", t)
    _check(src, t < 0, f"column {name!r}: negative timestamp", t)


def _factorize(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Categorical codes 1..K in sorted order of the distinct values; 0 for null."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    uniq = pc.drop_null(pc.unique(col))
    uniq = uniq.take(pc.sort_indices(uniq))
    return pc.index_in(col, value_set=uniq).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1


def _int_if_possible(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Integer-valued columns (also integer strings, integral floats) as int64, others unchanged
    but for strings, which lose surrounding whitespace (" 12" and "12" are one id)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = pc.utf8_trim_whitespace(col)
    try:
        return col.cast(INT)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return col


BAG_WIDTH = 32  # most values kept per bag feature (an item's tags), in the source's order


def _bag(values: list[list], width: int = BAG_WIDTH) -> tuple[np.ndarray, int]:
    """Per-id lists of values -> codes (n, w) and w: the first w = min(width, longest list)
    values of each list as categorical codes 1..K in sorted order of the distinct values, 0 in
    unused columns (a bag feature of `SideFeatures`)."""
    uniq = sorted({v for vs in values for v in vs[:width]})
    code = {v: c for c, v in enumerate(uniq, 1)}
    w = max(1, min(width, max((len(vs) for vs in values), default=1)))
    out = np.zeros((len(values), w), np.int64)
    for r, vs in enumerate(values):
        out[r, :len(vs[:w])] = [code[v] for v in vs[:w]]
    return out, w


def _lookup(keys: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Rows of `codes` for each key by `ids` (unique), zeros where a key has no row."""
    order = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids[order], keys), 0, len(ids) - 1)
    hit = ids[order][pos] == keys
    return np.where(hit[:, None], codes[order][pos], 0)


def _first_per_id(ids: np.ndarray, codes: np.ndarray, names: tuple[str, ...]) -> SideFeatures:
    """Collapse per-row codes (N, F) to one row per id: its first non-missing value in file order."""
    uniq = np.unique(ids)
    out = np.zeros((len(uniq), codes.shape[1]), np.int64)
    for f in range(codes.shape[1]):
        order = np.lexsort((codes[:, f] == 0, ids))  # by id, non-missing first; lexsort is stable
        s = ids[order]
        first = np.r_[True, s[1:] != s[:-1]]
        out[:, f] = codes[order[first], f]
    return SideFeatures(uniq, out, names)


def _meta(
    src: _Src, meta_ids: np.ndarray, codes: np.ndarray, names: tuple[str, ...], log_ids: np.ndarray, what: str
) -> SideFeatures:
    """Side features from a per-id metadata file, for the ids in the log."""
    order = np.argsort(meta_ids, kind="stable")
    s = meta_ids[order]
    dup = np.zeros(len(s), bool)
    dup[order[1:][s[1:] == s[:-1]]] = True
    _check(src, dup, f"duplicate {what} id", meta_ids)
    uniq = np.unique(log_ids)
    return SideFeatures(uniq, _lookup(uniq, meta_ids, codes), names)


# ---------------------------------------------------------------- MovieLens-100K

_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])  # buckets <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+


def read_movielens(root: Path | None = None) -> EventLog:
    """MovieLens-100K from RecBole atomic files ml-100k.{inter,user,item} (fetched when root is None).

    like = rating >= 4; action = the rating 1..5. Item features: genres (a bag), release decade.
    User features: age bucket, gender, occupation, first zip character (digit 0-9, or 'other').
    """
    root = fetch_movielens() if root is None else Path(root)
    # The original files are latin-1; decoding as latin-1 never fails, and we read only ASCII fields.
    src = _open_text(root / "ml-100k.inter", "latin-1", "\t")
    u, i, r, ts = "user_id:token", "item_id:token", "rating:float", "timestamp:float"
    t = _read_text(src, {u: INT, i: INT, r: FLOAT, ts: FLOAT})
    user, item, rating, time = (_required(src, t, c) for c in (u, i, r, ts))
    _check(src, ~np.isin(rating, [1, 2, 3, 4, 5]), f"column {r!r} must be 1..5", rating)
    _nonneg_time(src, time, ts)

    usrc = _open_text(root / "ml-100k.user", "latin-1", "\t")
    ut = _read_text(
        usrc, {u: INT, "age:token": INT, "gender:token": STR, "occupation:token": STR, "zip_code:token": STR}
    )
    age = ut["age:token"].to_numpy(zero_copy_only=False)  # float with NaN where missing
    age_code = np.where(np.isnan(age), 0, np.searchsorted(_AGE_EDGES, np.nan_to_num(age), side="right") + 1)
    zips = ut["zip_code:token"].to_pylist()
    zip_code = [0 if not z else int(z[0]) + 1 if z[0] in "0123456789" else 11 for z in zips]
    ucodes = np.column_stack(
        [age_code, _factorize(ut["gender:token"]), _factorize(ut["occupation:token"]), zip_code]
    )
    user_features = _meta(
        usrc, _required(usrc, ut, u), ucodes, ("age", "gender", "occupation", "zip1"), user, "user"
    )

    isrc = _open_text(root / "ml-100k.item", "latin-1", "\t")
    it = _read_text(isrc, {i: INT, "release_year:token": STR, "class:token_seq": STR})
    # Years are not all numbers (item 267 says 'unkonwn', item 1412 says 'V'): those are missing.
    decade = [int(y) // 10 * 10 if y and y.isdigit() else None for y in it["release_year:token"].to_pylist()]
    genres, w = _bag([(g or "").split() for g in it["class:token_seq"].to_pylist()])
    icodes = np.column_stack([genres, _factorize(pa.array(decade, INT))])
    item_features = _meta(isrc, _required(isrc, it, i), icodes, ("genre",) * w + ("decade",), item, "item")

    return EventLog(
        "ml-100k",
        user,
        item,
        time.astype(np.int64),
        (rating >= 4)[:, None],
        ("like",),
        action=rating.astype(np.int64),
        item_features=item_features,
        user_features=user_features,
        notes={"source": str(root)},
    )


# ---------------------------------------------------------------- KuaiRand

# action bit k set when the k-th of these happened: follow=1, comment=2, forward=4, profile_enter=8.
KUAIRAND_ACTION_BITS = ("is_follow", "is_comment", "is_forward", "is_profile_enter")
# Duration buckets with log-spaced edges 1 s, 2 s, ..., 512 s: code 1 (<1 s) .. 11 (>=512 s); 0 missing.
_DURATION_EDGES_MS = 1000.0 * 2.0 ** np.arange(10)


def read_kuairand(path: Path) -> EventLog:
    """A KuaiRand log: the shared subset (tab-separated, `label` 1=like 0=hate, no `tab`) or an
    official `log_standard_*.csv` (`is_like`, scenario from `tab`); told apart by the header.

    tasks click, long_view, like; action = bitmask of KUAIRAND_ACTION_BITS; time = time_ms // 1000.
    Item feature `duration`: bucket of duration_ms.
    """
    src = _open_text(path)
    official = "is_like" in src.header
    if not official and "label" not in src.header:
        raise DataError(
            f"{src.path}: no like column: expected 'is_like' (official KuaiRand) or 'label' "
            f"(shared subset); columns found: {list(src.header)}"
        )
    like = "is_like" if official else "label"
    types = {"user_id": INT, "video_id": INT, "time_ms": INT, "duration_ms": FLOAT}
    types |= {c: BOOL for c in ("is_click", "long_view", like, *KUAIRAND_ACTION_BITS)}
    if official:
        types["tab"] = INT
    t = _read_text(src, types)
    user, item, time_ms = (_required(src, t, c) for c in ("user_id", "video_id", "time_ms"))
    _nonneg_time(src, time_ms, "time_ms")
    labels = np.column_stack([_flags(src, t, c) for c in ("is_click", "long_view", like)])
    action = sum(_flags(src, t, c).astype(np.int64) << k for k, c in enumerate(KUAIRAND_ACTION_BITS))
    scenario = None
    if official:
        scenario = _required(src, t, "tab")
        _check(src, scenario < 0, "column 'tab' must be >= 0", scenario)
    dur = np.nan_to_num(t["duration_ms"].to_numpy(zero_copy_only=False), nan=0.0)
    dur_code = np.where(dur > 0, np.searchsorted(_DURATION_EDGES_MS, dur, side="right") + 1, 0)
    return EventLog(
        "kuairand",
        user,
        item,
        time_ms // 1000,
        labels,
        ("click", "long_view", "like"),
        action=action,
        scenario=scenario,
        item_features=_first_per_id(item, dur_code[:, None], ("duration",)),
        notes={"source": str(src.path), "format": "official" if official else "shared subset"},
    )


# ---------------------------------------------------------------- S3-Rec sequences


def read_s3rec(path: Path) -> EventLog:
    """S3-Rec text: one user a line, `user_id item_1 item_2 ...` in time order; time = position 0, 1, ...

    Implicit, task "interact". With `<stem>_item2attributes.json` beside it, item feature `attr` is
    a bag of the item's attributes (its first 32, `_bag`).
    """
    path = Path(path)
    users: list[int] = []
    lengths: list[int] = []
    items: list[int] = []
    line_of: dict[int, int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                toks = line.split()
                if not toks:
                    continue
                bad = next((tok for tok in toks if _INT_RE.fullmatch(tok) is None), None)
                if bad is not None:
                    raise DataError(f"{path}: line {line_no}: {bad!r} is not an integer id")
                if len(toks) < 2:
                    raise DataError(f"{path}: line {line_no}: user {toks[0]} has no items")
                user = int(toks[0])
                if user in line_of:
                    raise DataError(f"{path}: line {line_no}: user {user} already has line {line_of[user]}")
                line_of[user] = line_no
                users.append(user)
                lengths.append(len(toks) - 1)
                items.extend(map(int, toks[1:]))
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if not users:
        raise DataError(f"{path}: empty file")
    n = np.array(lengths)
    starts = np.cumsum(n) - n
    time = np.arange(n.sum()) - np.repeat(starts, n)
    item = np.array(items, np.int64)
    attrs = path.with_name(f"{path.stem}_item2attributes.json")
    return EventLog(
        path.stem.lower(),
        np.repeat(users, n),
        item,
        time,
        np.ones((len(item), 1), np.int8),
        ("interact",),
        implicit=True,
        item_features=_s3rec_attributes(attrs, item) if attrs.exists() else None,
        notes={"source": str(path), "time": "sequence position"},
    )


def _s3rec_attributes(path: Path, log_items: np.ndarray) -> SideFeatures:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: bad JSON: {e.msg}") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object mapping item id -> list of attribute ids")
    ids, codes = [], []
    for key, attr in raw.items():
        if not (
            key.lstrip("-").isdigit()
            and isinstance(attr, list)
            and all(isinstance(a, int) and a >= 0 for a in attr)
        ):
            raise DataError(f"{path}: item {key!r}: expected an integer id -> list of attribute ids >= 0")
        ids.append(int(key))
        codes.append(attr)
    bag, w = _bag(codes)
    uniq = np.unique(log_items)
    return SideFeatures(uniq, _lookup(uniq, np.array(ids, np.int64), bag), ("attr",) * w)


# ---------------------------------------------------------------- RecBole atomic files

RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")


def _recbole_header(src: _Text) -> dict[str, tuple[str, str]]:
    """Field name -> (header column, type) of an atomic file, whose header is `name:type`."""
    fields = {}
    for col in src.header:
        name, _, kind = col.rpartition(":")
        if not name or kind not in RECBOLE_TYPES:
            raise DataError(f"{src.path}: header field {col!r} is not name:type with a type in {RECBOLE_TYPES} "
                            "(a RecBole atomic file)")
        fields[name] = (col, kind)
    return fields


def _recbole_side(path: Path, key: str, names: tuple[str, ...], log_ids: np.ndarray,
                  log_raw: np.ndarray | None) -> SideFeatures | None:
    """Features of a `.user` / `.item` file keyed by field `key`: each token field (or those in
    `names`) a categorical feature, each token_seq field a bag; float fields are left out. Ids are
    matched as the log's: integers as they are, strings by the log's coding (`log_raw`, sorted)."""
    if not path.exists():
        return None
    src = _open_text(path, delimiter="\t")
    fields = _recbole_header(src)
    if key not in fields:
        raise DataError(f"{path}: no {key!r} field to join on; fields: {list(fields)}")
    use = [f for f, (_, kind) in fields.items() if f != key and kind in ("token", "token_seq")
           and (not names or f in names)]
    missing = [f for f in names if f not in fields]
    if missing:
        raise DataError(f"{path}: no field(s) {missing}; fields: {list(fields)}")
    t = _read_text(src, {fields[f][0]: STR for f in (key, *use)})
    ids = _int_if_possible(_no_nulls(src, t, fields[key][0]))
    if log_raw is None:
        if not pa.types.is_integer(ids.type):
            raise DataError(f"{path}: {key} must be integers, as in the interaction file")
        ids = ids.to_numpy()
    else:  # string ids: the log's codes; ids the log does not have get -1 and match nothing
        raw = np.asarray(ids.to_pylist(), dtype=object).astype(str)
        pos = np.clip(np.searchsorted(log_raw, raw), 0, max(len(log_raw) - 1, 0))
        ids = np.where(log_raw[pos] == raw, pos, -1) if len(log_raw) else np.full(len(raw), -1)
    cols, out_names = [], []
    for f in use:
        col = t[fields[f][0]]
        if fields[f][1] == "token_seq":
            bag, w = _bag([(v or "").split() for v in col.to_pylist()])
            cols.append(bag)
            out_names += [f] * w
        else:
            cols.append(_factorize(_int_if_possible(col))[:, None])
            out_names.append(f)
    if not cols:
        return None
    keep = ids >= 0
    return _meta(src, ids[keep], np.concatenate(cols, 1)[keep], tuple(out_names), log_ids, key.split("_")[0])


def read_recbole(path: Path, user: str = "user_id", item: str = "item_id", time: str = "timestamp",
                 labels: tuple[str, ...] = (), item_features: tuple[str, ...] = (),
                 user_features: tuple[str, ...] = ()) -> EventLog:
    """A RecBole atomic interaction file (`<name>.inter`: tab-separated, header `name:type`), with
    `<name>.user` and `<name>.item` beside it joined as side features (`_recbole_side`).

    Fields are named without their type. labels: 0/1 fields, one task each (`label:float` 0.0 /
    1.0 included); none given, a `label` field is the task "label" if there is one, else the log is
    implicit (task "interact"). time: seconds; without a `timestamp` field, the row's position in
    its user's sequence (file order), as S3-Rec. Ids: integers as they are, strings coded in
    sorted order (the side files' ids by the same coding)."""
    path = Path(path)
    src = _open_text(path, delimiter="\t")
    fields = _recbole_header(src)
    labels = tuple(labels) or (("label",) if "label" in fields else ())
    missing = [f for f in (user, item, *labels) if f not in fields]
    if missing:
        raise DataError(f"{path}: no field(s) {missing}; fields: {list(fields)}")
    has_time = time in fields
    t = _read_text(src, {fields[user][0]: STR, fields[item][0]: STR} | {fields[f][0]: FLOAT for f in labels}
                   | ({fields[time][0]: FLOAT} if has_time else {}))
    raw = {}
    ids = {}
    for f in (user, item):
        col = _int_if_possible(_no_nulls(src, t, fields[f][0]))
        raw[f] = None if pa.types.is_integer(col.type) else np.unique(np.asarray(col.to_pylist(), object).astype(str))
        ids[f] = _ids(src, t, fields[f][0])
    flags = []
    for f in labels:
        v = _required(src, t, fields[f][0])
        _check(src, (v != 0) & (v != 1), f"field {f!r} must be 0/1", v)
        flags.append(v.astype(np.int8))
    if has_time:
        tv = _required(src, t, fields[time][0])
        _nonneg_time(src, tv, fields[time][0])
        tv = tv.astype(np.int64)
    else:  # position within the user's sequence, in file order
        order = np.argsort(ids[user], kind="stable")
        starts = np.searchsorted(ids[user][order], ids[user][order])
        tv = np.empty(len(order), np.int64)
        tv[order] = np.arange(len(order)) - starts
    stem = path.with_suffix("")
    return EventLog(
        path.stem, ids[user], ids[item], tv,
        np.column_stack(flags) if flags else np.ones((len(tv), 1), np.int8), labels or ("interact",),
        implicit=not labels,
        item_features=_recbole_side(stem.with_suffix(".item"), item, tuple(item_features), ids[item], raw[item]),
        user_features=_recbole_side(stem.with_suffix(".user"), user, tuple(user_features), ids[user], raw[user]),
        notes={"source": str(path), "format": "recbole", **({} if has_time else {"time": "sequence position"})},
    )


# ---------------------------------------------------------------- Grocery (ReChorus)


def read_grocery(root: Path) -> EventLog:
    """Amazon Grocery: events.tsv (user_id, item_id, time in unix seconds) and item_meta.tsv.

    Implicit, task "purchase"; item feature `category` = i_category + 1 (0 = unknown).
    """
    root = Path(root)
    src = _open_text(root / "events.tsv", delimiter="\t")
    t = _read_text(src, {"user_id": INT, "item_id": INT, "time": INT})
    user, item, time = (_required(src, t, c) for c in ("user_id", "item_id", "time"))
    _nonneg_time(src, time, "time")

    msrc = _open_text(root / "item_meta.tsv", delimiter="\t")
    m = _read_text(msrc, {"item_id": INT, "i_category": INT})
    cat = m["i_category"].to_numpy(zero_copy_only=False)  # float with NaN where missing
    _check(msrc, cat < 0, "column 'i_category' must be >= 0", cat)
    code = np.where(np.isnan(cat), 0, np.nan_to_num(cat) + 1).astype(np.int64)
    features = _meta(msrc, _required(msrc, m, "item_id"), code[:, None], ("category",), item, "item")
    return EventLog(
        "grocery",
        user,
        item,
        time,
        np.ones((len(user), 1), np.int8),
        ("purchase",),
        implicit=True,
        item_features=features,
        notes={"source": str(root)},
    )


# ---------------------------------------------------------------- any table


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of a generic table hold what.

    labels: 0/1 or boolean columns, one task each (named by the column); none => implicit, task
    "interact". action / scenario: integer columns >= 0 are kept as they are, anything else is
    coded 0..K-1. Features: coded 1..K, 0 = missing. time_unit (s, ms, us, ns) scales a numeric time
    column to seconds; a Parquet timestamp column is converted by its own unit.
    """

    user: str
    item: str
    time: str
    labels: tuple[str, ...] = ()
    action: str | None = None
    scenario: str | None = None
    item_features: tuple[str, ...] = ()
    user_features: tuple[str, ...] = ()
    time_unit: str = "s"

    def __post_init__(self) -> None:
        if self.time_unit not in _TIME_SCALE:
            raise ValueError(f"time_unit must be one of {list(_TIME_SCALE)}, got {self.time_unit!r}")

    def columns(self) -> list[str]:
        extra = [c for c in (self.action, self.scenario) if c is not None]
        return [
            self.user,
            self.item,
            self.time,
            *self.labels,
            *extra,
            *self.item_features,
            *self.user_features,
        ]


_TIME_SCALE = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}
_MAX_SECONDS = 7_258_118_400  # 2200-01-01: later "seconds" are milliseconds or finer, read as seconds
_MISSING_IDS = ["", "nan", "null", "none"]  # after stripping, any case
_TEXT_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


def parquet_files(path: Path | str) -> list[Path]:
    """The Parquet files a path names: itself, every *.parquet / *.pq under a directory (sorted,
    recursively, as Hive-style partitions are laid out), or the files matching a glob."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".parquet", ".pq") and p.is_file())
    elif glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        files = [path]
    if not files:
        raise DataError(f"{path}: no Parquet files found")
    return files


def _read_parquet(path: Path, columns: list[str]) -> tuple[pa.Table, _Parquet]:
    """`columns` of one Parquet file, or of several (`parquet_files`) concatenated in order."""
    files = parquet_files(path)
    tables = []
    for f in files:
        try:
            _require(f, pq.read_schema(f).names, columns)
            tables.append(pq.read_table(f, columns=columns))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f}: not a readable Parquet file: {e}") from e
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        raise DataError(f"{path}: the files' columns have different types: {e}") from e
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    parts = tuple((f, t.num_rows) for f, t in zip(files, tables, strict=True)) if len(files) > 1 else ()
    return table, _Parquet(Path(path), parts)


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq") or path.is_dir() or glob.has_magic(str(path))


def read_table(path: Path, mapping: ColumnMapping) -> EventLog:
    """A CSV/TSV (delimiter by suffix, else sniffed from the header) or Parquet table (a file, a
    directory of files or a glob), by `mapping`."""
    path = Path(path)
    m = mapping
    src: _Src
    if _is_parquet(path):
        table, src = _read_parquet(path, list(dict.fromkeys(m.columns())))
    else:
        src = _open_text(path, delimiter=_TEXT_DELIMITERS.get(path.suffix.lower()))
        types = {c: STR for c in m.columns()} | {m.time: FLOAT} | {c: BOOL for c in m.labels}
        table = _read_text(src, types)

    user_ids, item_ids = (_ids(src, table, c) for c in (m.user, m.item))
    labels = np.column_stack([_flags(src, table, c) for c in m.labels]) if m.labels else None
    return EventLog(
        path.parent.name if glob.has_magic(str(path)) else path.stem,
        user_ids,
        item_ids,
        _seconds(src, table, m.time, m.time_unit),
        labels if labels is not None else np.ones((len(user_ids), 1), np.int8),
        m.labels or ("interact",),
        implicit=not m.labels,
        action=_small_codes(src, table, m.action) if m.action else None,
        scenario=_small_codes(src, table, m.scenario) if m.scenario else None,
        item_features=_row_features(table, m.item_features, item_ids),
        user_features=_row_features(table, m.user_features, user_ids),
        notes={"source": str(path), "mapping": asdict(m)},
    )


def _ids(src: _Src, table: pa.Table, name: str) -> np.ndarray:
    """Integer ids as they are; other ids (strings, stripped) coded 0..K-1 in sorted order. A
    missing id (null, NaN, or a text in _MISSING_IDS) is an error at its line or row."""
    col = id_column(src, table, name)
    return col.to_numpy() if pa.types.is_integer(col.type) else _factorize(col) - 1


def id_column(src: _Src, table: pa.Table, name: str) -> pa.ChunkedArray:
    """Column `name` as ids: int64 where every value is an integer, else as it is (strings
    stripped); a missing id is an error at its line or row. `_ids` codes the non-integer ones;
    stream.py codes them over every batch of a log."""
    col = _int_if_possible(_no_nulls(src, table, name))
    if pa.types.is_integer(col.type):
        return col
    if pa.types.is_floating(col.type):
        missing = pc.is_nan(col)
    else:
        missing = pc.is_in(pc.utf8_lower(col.cast(STR)), value_set=pa.array(_MISSING_IDS))
    _check(src, missing.to_numpy(zero_copy_only=False), f"column {name!r}: missing id",
           col.to_numpy(zero_copy_only=False))
    return col


def _seconds(src: _Src, table: pa.Table, name: str, unit: str) -> np.ndarray:
    col = table[name]
    if pa.types.is_timestamp(col.type):
        _no_nulls(src, table, name)
        t = col.cast(INT).to_numpy() // {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[col.type.unit]
    elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        t = _required(src, table, name)
        _nonneg_time(src, t, name)
        _check(src, t >= 2.0**63, f"column {name!r}: timestamp outside int64", t)
        t = t // _TIME_SCALE[unit]
        if t.max() > _MAX_SECONDS:
            raw = t.max() * _TIME_SCALE[unit]
            finer = [u for u, k in _TIME_SCALE.items() if k > _TIME_SCALE[unit] and raw / k <= _MAX_SECONDS]
            hint = f"; it looks like {finer[0]}: pass --time-unit {finer[0]}" if finer else ""
            _check(src, t > _MAX_SECONDS, f"column {name!r}: timestamp after the year 2200 in unit "
                                          f"{unit!r}{hint}", t * _TIME_SCALE[unit])
    else:
        raise DataError(f"{src.path}: column {name!r} has type {col.type}; expected numbers or timestamps")
    _check(src, t < 0, f"column {name!r}: negative timestamp", t)
    return t.astype(np.int64)


def _small_codes(src: _Src, table: pa.Table, name: str) -> np.ndarray:
    """action / scenario: non-negative integers as they are, other values coded 0..K-1."""
    col = _int_if_possible(_no_nulls(src, table, name))
    if pa.types.is_integer(col.type) and pc.min(col).as_py() >= 0:
        return col.to_numpy()
    return _factorize(col) - 1


def _row_features(table: pa.Table, names: tuple[str, ...], ids: np.ndarray) -> SideFeatures | None:
    if not names:
        return None
    codes = np.column_stack([_factorize(_int_if_possible(table[c])) for c in names])
    return _first_per_id(ids, codes, names)


def _columns(path: Path) -> list[str]:
    if _is_parquet(path):
        try:
            return pq.read_schema(parquet_files(path)[0]).names
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    return list(_open_text(path, delimiter=_TEXT_DELIMITERS.get(path.suffix.lower())).header)


# ---------------------------------------------------------------- requests to score


def read_requests(path: Path, n_scenarios: int) -> dict[str, np.ndarray | None]:
    """Rows to score (`climber predict`): a CSV/TSV or Parquet table with integer columns `user`
    and `item` (raw ids, as in the training log) and optional `time` (seconds) and `scenario`
    (0..n_scenarios-1) -> {user, item, time or None, scenario or None}. A missing or
    non-integer id, a bad time or an out-of-range scenario is a DataError naming its line or row."""
    path = Path(path)
    src: _Src
    if path.suffix.lower() in (".parquet", ".pq"):
        src = _Parquet(path)
        try:
            names = pq.read_schema(path).names
            _require(path, names, ["user", "item"])
            table = pq.read_table(path, columns=[c for c in ("user", "item", "time", "scenario") if c in names])
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from e
        for c in table.column_names:
            if not (pa.types.is_integer(table[c].type) or (c == "time" and pa.types.is_floating(table[c].type))):
                raise DataError(f"{path}: column {c!r} has type {table[c].type}; expected integers")
    else:
        src = _open_text(path, delimiter=_TEXT_DELIMITERS.get(path.suffix.lower()))
        _require(path, src.header, ["user", "item"])
        types = {"user": INT, "item": INT} | {c: t for c, t in (("time", FLOAT), ("scenario", INT)) if c in src.header}
        table = _read_text(src, types)
    out: dict[str, np.ndarray | None] = {c: _required(src, table, c) for c in ("user", "item")}
    out["time"] = out["scenario"] = None
    if "time" in table.column_names:
        t = _required(src, table, "time")
        _nonneg_time(src, t, "time")
        out["time"] = t.astype(np.int64)
    if "scenario" in table.column_names:
        sc = _required(src, table, "scenario")
        _check(src, (sc < 0) | (sc >= n_scenarios), f"column 'scenario' must be in 0..{n_scenarios - 1}", sc)
        out["scenario"] = sc.astype(np.int64)
    return out


# ---------------------------------------------------------------- by name


def shared_data_dir() -> Path:
    """The shared data folder: env CLIMBER_SHARED_DATA, else <repo root>/../shared/data."""
    env = os.environ.get("CLIMBER_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


# name -> (file under the shared data folder, reader, where the data comes from and how to read it by path)
_NAMED = {
    "kuairand": ("kuairand-subset/events.tsv", read_kuairand,
                 "KuaiRand (Gao et al., CIKM 2022; https://kuairand.com, CC BY-SA 4.0): download KuaiRand-Pure "
                 "and run `climber prepare KuaiRand-Pure/data/log_standard_4_08_to_4_21_pure.csv --format kuairand "
                 "--out data/kuairand`"),
    "lastfm": ("s3rec/LastFM.txt", read_s3rec,
               "the S3-Rec preprocessing (GitHub RUCAIBox/CIKM2020-S3Rec, data/LastFM.txt and "
               "LastFM_item2attributes.json): `climber prepare LastFM.txt --format s3rec --out data/lastfm`"),
    "beauty": ("s3rec/Beauty.txt", read_s3rec,
               "the S3-Rec preprocessing (GitHub RUCAIBox/CIKM2020-S3Rec, data/Beauty.txt and "
               "Beauty_item2attributes.json): `climber prepare Beauty.txt --format s3rec --out data/beauty`"),
    "grocery": ("grocery/events.tsv", lambda p: read_grocery(p.parent),
                "ReChorus' Amazon Grocery_and_Gourmet_Food (GitHub THUwangcy/ReChorus, data/): events.tsv "
                "(user_id, item_id, time) and item_meta.tsv in one folder, named by CLIMBER_SHARED_DATA/grocery"),
}
SOURCES = ("ml-100k", *_NAMED)


def read_source(name: str, fmt: str | None = None, **kw) -> EventLog:
    """Read a named source ("ml-100k" takes `root`; the others come from shared_data_dir()), or a
    path: in format `fmt` (one of FORMATS), else a table (CSV/TSV, Parquet file, directory or
    glob). Tables take `mapping=ColumnMapping(...)` or its fields as keywords; recbole takes
    read_recbole's keywords; s3rec and kuairand none."""
    if fmt is None and name == "ml-100k":
        return read_movielens(**kw)
    if fmt is None and name in _NAMED:
        if kw:
            raise TypeError(f"read_source({name!r}) takes no options, got {sorted(kw)}")
        rel, reader, origin = _NAMED[name]
        path = shared_data_dir() / rel
        if not path.exists():
            raise DataError(f"{name}: {path} not found. The built-in {name!r} reads the shared data folder "
                            f"(set CLIMBER_SHARED_DATA to it; now {shared_data_dir()}). The data comes from "
                            f"{origin}. MovieLens-100K needs nothing: `climber prepare ml-100k`")
        return reader(path)
    path = Path(name)
    if fmt not in FORMATS + (None,):
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if not (path.exists() or (fmt in (None, "parquet") and glob.has_magic(name))):
        raise DataError(f"unknown source {name!r}: not one of {list(SOURCES)} and not an existing file")
    if fmt in ("s3rec", "kuairand"):
        if kw:
            raise TypeError(f"format {fmt} takes no column options, got {sorted(kw)}")
        return read_s3rec(path) if fmt == "s3rec" else read_kuairand(path)
    if fmt == "recbole" or (fmt is None and path.suffix == ".inter"):
        other = set(kw) - {"user", "item", "time", "labels", "item_features", "user_features"}
        if other:
            raise DataError(f"{name}: a RecBole file takes --user --item --time --labels --item-features "
                            f"--user-features (field names without their type), not {sorted(other)}")
        return read_recbole(path, **kw)
    mapping = kw.pop("mapping", None)
    if mapping is not None and kw:
        raise TypeError(f"give either mapping or ColumnMapping fields, not both (got {sorted(kw)})")
    if fmt == "parquet" and not _is_parquet(path):
        raise DataError(f"{name}: --format parquet needs a .parquet/.pq file, a directory of them or a glob")
    missing = [k for k in ("user", "item", "time") if k not in kw]
    if mapping is None and missing:
        raise DataError(f"{name}: a table needs its columns named: {' '.join(f'--{k} COLUMN' for k in missing)}"
                        f" (columns found: {_columns(path)})")
    return read_table(path, mapping if mapping is not None else ColumnMapping(**kw))
