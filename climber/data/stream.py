"""Out-of-core `prepare`: SUMI samples from a log larger than memory (issue 22, item 3).

`prepare_stream` reads a generic table -- a CSV/TSV or Parquet file, or a directory of them (a
partitioned data set, read recursively in sorted path order) -- in record batches with
`pyarrow.dataset`, with `readers.read_table`'s column mapping and checks, and writes the same
prepared directory as `sumi.prepare` on the same log, array for array and byte for byte
(tests/test_stream.py). Peak memory is set by the vocabularies and one partition, not the log:

1. scan: every batch is converted and checked as read_table checks a table; kept are the
   distinct values (with counts) of the id columns and of action, scenario and feature columns:
   what prepare takes from the whole log (dense ids, vocabularies, events per user, maxima).
2. spill: every batch again, its rows in dense ids appended to one file per partition, under
   the output's temporary directory. A partition is a range of dense user ids, whole blocks of
   `sumi.SAMPLE_BLOCK` users holding about `partition_events` events; rows keep file order.
3. build: one partition at a time: drop exact duplicates, sort by (user, time) stably, and
   `sumi.build_users`, the function prepare runs on all users at once; its arrays are appended
   to the output .npy files, whose headers get the final lengths at the end.
The fingerprint is then hashed from the written files, meta.json written and the directory
swapped in as prepare does (`files.replace_dir`): a failed or killed prepare leaves no
half-written output, and the spill files go with the temporary directory.

Range partitions, not hash partitions: the prepared arrays are sorted by dense user id, so
partitions of consecutive users are appended in order, with no merge; the scan's counts keep
them balanced. Input is read twice (scan, spill); the spill is about 30 bytes an event on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from climber.config import PrepareConfig
from climber.data import readers
from climber.data.events import DataError, SideFeatures
from climber.data.sumi import (
    FIRST_ITEM,
    SAMPLE_BLOCK,
    PrepareStats,
    _side_table,
    build_meta,
    build_users,
    check_labels_vary,
    check_shards,
    check_strategies,
    first_rows,
)
from climber.files import replace_dir

# Peak bytes an event of a partition takes in the build pass (dedup, sort, build_users); the
# in-memory prepare measured about 340. A partition gets half of --memory-limit.
BYTES_PER_EVENT = 400
BATCH_ROWS = 1 << 20  # rows per Parquet record batch (CSV batches are BLOCK_BYTES of text)
BLOCK_BYTES = 32 << 20
_PARQUET, _TEXT = (".parquet", ".pq"), (".csv", ".tsv", ".tab")


def input_files(path: Path | str) -> tuple[list[Path], str]:
    """The files a path names and their format, 'parquet' or 'csv': a file; a directory's Parquet
    files (else its CSV/TSV files), recursively in sorted order; or a glob of Parquet files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _PARQUET + _TEXT)
        parquet = [p for p in files if p.suffix.lower() in _PARQUET]
        if not files:
            raise DataError(f"{path}: no Parquet or CSV/TSV files found")
        return (parquet, "parquet") if parquet else (files, "csv")
    if readers.glob.has_magic(str(path)):
        return readers.parquet_files(path), "parquet"
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    return [path], "parquet" if path.suffix.lower() in _PARQUET else "csv"


@dataclass(frozen=True)
class _At:
    """Where a batch's rows are: readers' row locator (`path`, `where(row)`) shifted by the rows
    of the file's earlier batches."""

    src: readers._Text | readers._Parquet
    base: int

    @property
    def path(self) -> Path:
        return self.src.path

    def where(self, row: int) -> str:
        return self.src.where(self.base + row)


def _batches(files: list[Path], fmt: str, m: readers.ColumnMapping, batch_rows: int):
    """(locator, table) of every record batch of `files`, in order, with `m`'s columns."""
    columns = list(dict.fromkeys(m.columns()))
    for f in files:
        if fmt == "parquet":
            try:
                readers._require(f, pq.read_schema(f).names, columns)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{f}: not a readable Parquet file: {e}") from e
            src, file_format, types = readers._Parquet(f), ds.ParquetFileFormat(), None
        else:  # read_table's types: text ids and features, float time, boolean labels
            src = readers._open_text(f, delimiter=readers._TEXT_DELIMITERS.get(f.suffix.lower()))
            readers._require(f, src.header, columns)
            types = {c: readers.STR for c in columns} | {m.time: readers.FLOAT} | {c: readers.BOOL for c in m.labels}
            file_format = ds.CsvFileFormat(
                parse_options=pacsv.ParseOptions(delimiter=src.delimiter),
                convert_options=pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True),
                read_options=pacsv.ReadOptions(encoding=src.encoding, block_size=BLOCK_BYTES))
        base = 0
        try:
            for b in ds.dataset(f, format=file_format).to_batches(columns=columns, batch_size=batch_rows):
                if b.num_rows:
                    yield _At(src, base), pa.Table.from_batches([b])
                    base += b.num_rows
        except (OSError, pa.ArrowException) as e:
            where = readers._first_bad_line(src, types) if types else None
            raise DataError(where or f"{f}: cannot read: {e}") from e


def _counted(acc: pa.Table | None, col: pa.ChunkedArray) -> pa.Table:
    """acc's (v, n) rows and col's values counted, summed by value."""
    vc = pc.value_counts(col)
    t = pa.table({"v": vc.field("values"), "n": vc.field("counts")})
    if acc is None:
        return t
    g = pa.concat_tables([acc, t]).group_by("v").aggregate([("n", "sum")])
    return pa.table({"v": g["v"], "n": g["n_sum"]})


class _Values:
    """The distinct values of one column over every batch, ordered as readers code a whole
    table's column (`_factorize`): integers in numeric order where every value is one (text
    that reads as integers too), else text in sorted order; nulls are no value."""

    def __init__(self, name: str):
        self.name = name
        self.ints: pa.Table | None = None  # (v, n) counts by integer value
        self.strs: pa.Table | None = None  # (v, n) counts by stripped text, for text columns
        self.all_int, self.int_typed = True, False

    def add(self, raw: pa.ChunkedArray, at: _At) -> None:
        raw = self._text(pc.drop_null(raw))
        if pa.types.is_string(raw.type):
            self.strs = _counted(self.strs, raw)
        col = readers._int_if_possible(raw)
        if pa.types.is_integer(col.type):
            self.ints = _counted(self.ints, col)
            self.int_typed |= pa.types.is_integer(raw.type)
        elif pa.types.is_string(raw.type):
            self.all_int = False
        else:
            raise DataError(f"{at.path}: column {self.name!r} has type {raw.type}; a streamed prepare reads "
                            "integer or text values")

    @staticmethod
    def _text(col: pa.ChunkedArray) -> pa.ChunkedArray:
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_large_string(col.type):
            col = col.cast(readers.STR)
        return pc.utf8_trim_whitespace(col) if pa.types.is_string(col.type) else col

    def finish(self, path: Path) -> None:
        """Fix the order: `values` (sorted), `counts`, `is_int`."""
        if not self.all_int and self.int_typed:
            raise DataError(f"{path}: column {self.name!r} holds integers in some files and text in others")
        t = self.ints if self.all_int else self.strs
        if t is None:
            t = pa.table({"v": pa.array([], readers.INT), "n": pa.array([], pa.int64())})
        t = t.take(pc.sort_indices(t["v"]))
        self.values, self.counts, self.is_int = t["v"].combine_chunks(), t["n"].to_numpy(), self.all_int

    def index(self, raw: pa.ChunkedArray) -> np.ndarray:
        """(N,) int64 position of each value in `values`; -1 for null."""
        col = self._text(raw)
        col = readers._int_if_possible(col) if self.is_int else col
        return pc.index_in(col, value_set=self.values).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def as_numpy(self) -> np.ndarray:
        """The values as read_table gives them: integers, or text's codes 0..K-1."""
        return self.values.to_numpy().astype(np.int64) if self.is_int else np.arange(len(self.values), dtype=np.int64)

    def small_codes(self) -> bool:
        """action / scenario (`readers._small_codes`): kept as they are, or coded 0..K-1."""
        return self.is_int and (len(self.values) == 0 or self.values[0].as_py() >= 0)


def _labels(at: _At, t: pa.Table, m: readers.ColumnMapping) -> np.ndarray:
    if not m.labels:
        return np.ones((t.num_rows, 1), np.int8)
    return np.column_stack([readers._flags(at, t, c) for c in m.labels])


class _Npy:
    """One .npy file written in pieces: a header for length 0, the pieces, then the header again
    with the final length. numpy pads a header so that the first axis' length never changes its
    size, and the bytes are those `np.save` writes for the whole array."""

    def __init__(self, path: Path, dtype: np.dtype, tail: tuple[int, ...]):
        self.f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.dtype, self.tail, self.n = np.dtype(dtype), tail, 0
        self._header()
        self.data_start = self.f.tell()

    def _header(self) -> None:
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": (self.n, *self.tail)})

    def add(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, self.dtype)
        assert a.shape[1:] == self.tail, (a.shape, self.tail)
        a.tofile(self.f)
        self.n += len(a)

    def close(self) -> None:
        self.f.seek(0)
        self._header()
        assert self.f.tell() == self.data_start, "npy header changed size"
        self.f.close()


def fingerprint_files(root: Path, names: list[str], chunk_bytes: int = 64 << 20) -> str:
    """`sumi.fingerprint` of the arrays saved as root/<name>.npy, read in chunks."""
    h = hashlib.sha256()
    for k in sorted(names):
        a = np.load(root / f"{k}.npy", mmap_mode="r")
        h.update(f"{k} {a.dtype.str} {a.shape}\n".encode())
        step = max(1, chunk_bytes // max(1, a.itemsize * int(np.prod(a.shape[1:]))))
        for i in range(0, len(a), step):
            h.update(np.ascontiguousarray(a[i:i + step]).data)
    return h.hexdigest()[:16]


def _int_dtype(top: int) -> type:
    return np.int16 if top < 2**15 else np.int32 if top < 2**31 else np.int64


def partition_bounds(user_counts: np.ndarray, target: int) -> np.ndarray:
    """Dense user ids where partitions start, and the end: whole blocks of SAMPLE_BLOCK users, a
    new partition once the next block would take it over `target` events (a block larger than
    `target` is a partition on its own)."""
    n_users = len(user_counts)
    blocks = np.add.reduceat(user_counts, np.arange(0, n_users, SAMPLE_BLOCK))
    bounds, acc = [0], 0
    for b, c in enumerate(blocks):
        if acc and acc + c > target:
            bounds.append(b * SAMPLE_BLOCK)
            acc = 0
        acc += int(c)
    return np.array([*bounds, n_users], np.int64)


def prepare_stream(path: Path | str, mapping: readers.ColumnMapping, out_dir: Path, cfg: PrepareConfig,
                   strategies: tuple[str, ...], memory_limit: float = 2 * 2**30, partitions: int | None = None,
                   batch_rows: int = BATCH_ROWS, shards: int = 1, name: str | None = None,
                   notes: dict | None = None) -> dict:
    """`sumi.prepare(readers.read_table(path, mapping), out_dir, cfg, strategies, shards)`, out of core
    (see the module docstring). Partitions hold about memory_limit / 2 / BYTES_PER_EVENT events,
    or `partitions` (at least, as whole user blocks allow) splits them evenly. `name` and `notes`
    (default: the file's name; the source and mapping) go to meta.json. Returns meta."""
    path, out_dir, m = Path(path), Path(out_dir), mapping
    files, fmt = input_files(path)
    tasks = m.labels or ("interact",)
    implicit = not m.labels
    batches = lambda: _batches(files, fmt, m, batch_rows)
    names = {"user": m.user, "item": m.item, "action": m.action, "scenario": m.scenario,
             **{f"item:{c}": c for c in m.item_features}, **{f"user:{c}": c for c in m.user_features}}
    names = {k: c for k, c in names.items() if c is not None}

    # pass 1: check every row, count the distinct values
    values = {k: _Values(c) for k, c in names.items()}
    rows, lo, hi = 0, np.ones(len(tasks), np.int8), np.zeros(len(tasks), np.int8)
    for at, t in batches():
        readers.id_column(at, t, m.user), readers.id_column(at, t, m.item)
        readers._seconds(at, t, m.time, m.time_unit)
        labels = _labels(at, t, m)
        lo, hi = np.minimum(lo, labels.min(0)), np.maximum(hi, labels.max(0))
        for k, c in names.items():
            values[k].add(t[c] if k.partition(":")[2] else readers._no_nulls(at, t, c), at)
        rows += t.num_rows
    if rows == 0:
        raise DataError(f"{path}: no rows")
    for v in values.values():
        v.finish(path)
    name = name or (path.parent.name if readers.glob.has_magic(str(path)) else path.stem)
    top = {k: (int(values[k].values[-1].as_py()) if values[k].small_codes() else len(values[k].values) - 1)
           if k in values else 0 for k in ("action", "scenario")}
    check_strategies(strategies, name, tasks, top["scenario"] + 1, top["action"] + 1)
    if not implicit:
        check_labels_vary(name, tasks, lo, hi)
    user_vocab, item_vocab = values["user"].as_numpy(), values["item"].as_numpy()
    check_shards(name, shards, len(user_vocab))
    n_items = len(item_vocab) + FIRST_ITEM
    user_counts = np.concatenate([[0], values["user"].counts])
    target = -(-rows // partitions) if partitions else max(1, int(memory_limit / 2 / BYTES_PER_EVENT))
    bounds = partition_bounds(user_counts, target)
    feats = {kind: [c for k, c in names.items() if k.startswith(f"{kind}:")] for kind in ("item", "user")}
    tables = {kind: np.zeros((len(user_vocab if kind == "user" else item_vocab), len(cs)), np.int64)
              for kind, cs in feats.items()}

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    spill = tmp / "spill"
    spill.mkdir(parents=True)
    try:
        rec = np.dtype([("user", np.int32), ("item", np.int32), ("time", np.int64),
                        ("action", _int_dtype(top["action"])), ("scenario", _int_dtype(top["scenario"])),
                        ("labels", np.int8, (len(tasks),))])
        _spill(batches(), m, values, bounds, rec, spill, tables, feats)
        arrays, stats, duplicates = _build(spill, rec, bounds, tmp, cfg, implicit, n_items)
        shutil.rmtree(spill)
        side = {kind: SideFeatures(vocab, tables[kind], tuple(feats[kind])) if feats[kind] else None
                for kind, vocab in (("item", item_vocab), ("user", user_vocab))}
        for k, a in {"item_features": _side_table(side["item"], item_vocab, FIRST_ITEM),
                     "user_features": _side_table(side["user"], user_vocab, 1),
                     "item_vocab": item_vocab, "user_vocab": user_vocab}.items():
            np.save(tmp / f"{k}.npy", a)
            arrays[k] = np.load(tmp / f"{k}.npy", mmap_mode="r")
        log = SimpleNamespace(name=name, tasks=tasks, implicit=implicit, item_features=side["item"],
                              user_features=side["user"],
                              notes=notes or {"source": str(path), "mapping": asdict(m)})
        meta = build_meta(log, cfg, strategies, arrays, stats, duplicates, top["action"] + 1, top["scenario"] + 1,
                          fingerprint_files(tmp, list(arrays)), shards)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _spill(batches, m: readers.ColumnMapping, values: dict[str, _Values], bounds: np.ndarray, rec: np.dtype,
           spill: Path, tables: dict[str, np.ndarray], feats: dict[str, list[str]]) -> None:
    """Pass 2: every row, in dense ids, appended to its partition's file; each id's first
    non-missing side feature codes (`readers._first_per_id`) into `tables`."""
    outs = [open(spill / f"{k}.bin", "wb") for k in range(len(bounds) - 1)]  # noqa: SIM115
    try:
        for at, t in batches:
            r = np.empty(t.num_rows, rec)
            r["user"] = values["user"].index(t[m.user]) + 1
            r["item"] = values["item"].index(t[m.item]) + FIRST_ITEM
            r["time"] = readers._seconds(at, t, m.time, m.time_unit)
            r["labels"] = _labels(at, t, m)
            for k in ("action", "scenario"):  # readers._small_codes: as they are, or coded 0..K-1
                col, v = getattr(m, k), values.get(k)
                if col is None:
                    r[k] = 0
                elif v.small_codes():
                    r[k] = readers._int_if_possible(v._text(t[col])).to_numpy()
                else:
                    r[k] = v.index(t[col])
            for kind, cs in feats.items():
                dense = r[kind] - (1 if kind == "user" else FIRST_ITEM)
                for j, c in enumerate(cs):
                    code = values[f"{kind}:{c}"].index(t[c]) + 1
                    ids, first = np.unique(dense[code > 0], return_index=True)
                    cur = tables[kind][ids, j]
                    tables[kind][ids, j] = np.where(cur == 0, code[code > 0][first], cur)
            part = np.searchsorted(bounds, r["user"], side="right") - 1
            order = np.argsort(part, kind="stable")
            r, cuts = r[order], np.searchsorted(part[order], np.arange(len(outs) + 1))
            for k in np.flatnonzero(np.diff(cuts)):
                r[cuts[k]:cuts[k + 1]].tofile(outs[k])
    finally:
        for f in outs:
            f.close()


def _build(spill: Path, rec: np.dtype, bounds: np.ndarray, tmp: Path, cfg: PrepareConfig, implicit: bool,
           n_items: int) -> tuple[dict[str, np.ndarray], PrepareStats, int]:
    """Pass 3: each partition's SUMI arrays (`sumi.build_users`), appended to tmp/<name>.npy;
    returns the arrays (memory-mapped), the counts and the duplicates dropped."""
    out: dict[str, _Npy] = {}
    stats, duplicates, n_ev, n_cand = PrepareStats(rec["labels"].shape[0]), 0, 0, 0
    try:
        for k in range(len(bounds) - 1):
            r = np.fromfile(spill / f"{k}.bin", rec)
            (spill / f"{k}.bin").unlink()
            ev = {c: r[c].astype(np.int64) for c in ("user", "item", "time", "action", "scenario")}
            ev["labels"] = r["labels"]
            del r
            if cfg.drop_duplicates:
                keep = first_rows(ev["user"], ev["item"], ev["time"], ev["action"], ev["scenario"], ev["labels"])
                duplicates += len(ev["user"]) - len(keep)
                ev = {c: v[keep] for c, v in ev.items()} if len(keep) < len(ev["user"]) else ev
            order = np.lexsort((ev["time"], ev["user"]))
            ev = {c: v[order] for c, v in ev.items()}
            part = build_users(ev, int(bounds[k]), int(bounds[k + 1]), cfg, implicit, n_items, None)
            del ev, order
            stats.add(part)
            part["user_offsets"] += n_ev
            part["req_hist_end"] += n_ev
            part["req_cand_start"] += n_cand
            n_ev, n_cand = n_ev + len(part["ev_item"]), n_cand + len(part["cand_item"])
            for c, a in part.items():
                if c not in out:
                    out[c] = _Npy(tmp / f"{c}.npy", a.dtype, a.shape[1:])
                out[c].add(a)
        out["user_offsets"].add(np.array([n_ev]))
        out["req_cand_start"].add(np.array([n_cand]))
    finally:
        for f in out.values():
            f.close()
    return {c: np.load(tmp / f"{c}.npy", mmap_mode="r") for c in out}, stats, duplicates
