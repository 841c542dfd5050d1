"""The persistent store of events posted to `climber serve` (docs/paper.md section 3.2).

`EventStore` is the interface the serving engine needs; `SQLiteStore` implements it with the
standard library's sqlite3 in WAL mode, so an event acknowledged by /events survives kill -9
and a restart. Another store (Redis, a database service) implements the same four methods.

Each user's events carry `seq`, their position among all events ever appended for that user.
The engine decides what to forget (events outside every block window can never be read by
the model again); the store only keeps what it is told, plus a global bound: at most
`max_users` users, the least recently written one evicted first.

Items are raw ids, so a store outlives a vocabulary: a model retrained on new data reads it.
Labels are a bit mask over the task names recorded in the store, which must not change.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class History:
    """One user's events in time order: item, time, action, scenario (n,); labels (n, T). Items are
    dense ids inside the engine, raw ids in a store."""

    item: np.ndarray
    time: np.ndarray
    action: np.ndarray
    scenario: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls, n_tasks: int) -> History:
        z = np.zeros(0, np.int64)
        return cls(z, z, z, z, np.zeros((0, n_tasks), np.int64))

    @classmethod
    def concat(cls, parts: list[History]) -> History:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))

    def __len__(self) -> int:
        return len(self.item)

    def __getitem__(self, rows) -> History:
        """Rows by slice, index array or boolean mask."""
        return History(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


@dataclass(frozen=True)
class Stored:
    """What a store holds for one user."""

    events: History  # retained events, time order, raw item ids
    seq: np.ndarray  # (n,) their positions among all events appended for the user
    count: int  # events ever appended (the next event's seq)
    last_time: int | None  # time of the latest appended event, retained or not


class EventStore(ABC):
    """Per-user, time-ordered events appended while serving. Safe to call from several threads."""

    @abstractmethod
    def load(self, user: int) -> Stored:
        """The user's retained events (an unknown user: none, count 0)."""

    @abstractmethod
    def count(self, user: int) -> int:
        """Events ever appended for the user (cheap: checked on every cached request)."""

    @abstractmethod
    def append(self, user: int, events: History, drop: np.ndarray) -> int:
        """Atomically append `events` (seq count, count + 1, ...) and forget the events whose seq is
        in `drop` (new ones included). Returns how many other users were evicted to make room."""

    @abstractmethod
    def close(self) -> None: ...


class SQLiteStore(EventStore):
    """An EventStore in one SQLite file (WAL mode; ":memory:" for a store that dies with the process).

    synchronous=NORMAL: a commit is in the write-ahead log before `append` returns, so it survives
    the process being killed; a power cut may lose the last commits (FULL would fsync each one)."""

    def __init__(self, path: str | Path, tasks: tuple[str, ...], max_users: int = 1_000_000):
        if len(tasks) > 62:
            raise ValueError("the event store keeps labels as a bit mask: at most 62 tasks")
        self.path, self.tasks, self.max_users = str(path), tuple(tasks), max_users
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()  # one connection, shared by the HTTP loop and the model thread
        self._db.executescript("""
            PRAGMA journal_mode = WAL;
            PRAGMA synchronous = NORMAL;
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS users (user INTEGER PRIMARY KEY, count INTEGER NOT NULL,
                                              last_time INTEGER NOT NULL, touched INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS users_touched ON users (touched);
            CREATE TABLE IF NOT EXISTS events (user INTEGER NOT NULL, seq INTEGER NOT NULL, item INTEGER NOT NULL,
                                               time INTEGER NOT NULL, action INTEGER NOT NULL,
                                               scenario INTEGER NOT NULL, labels INTEGER NOT NULL,
                                               PRIMARY KEY (user, seq)) WITHOUT ROWID;
        """)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('tasks', ?)", (json.dumps(self.tasks),))
        stored = tuple(json.loads(self._db.execute("SELECT value FROM meta WHERE key = 'tasks'").fetchone()[0]))
        if stored != self.tasks:
            raise ValueError(f"event store {self.path} holds labels for tasks {list(stored)}, the model has "
                             f"{list(self.tasks)}: use another --store")
        self._touched, self._users = self._db.execute(
            "SELECT coalesce(max(touched), 0), count(*) FROM users").fetchone()

    def load(self, user: int) -> Stored:
        with self._lock:
            head = self._db.execute("SELECT count, last_time FROM users WHERE user = ?", (user,)).fetchone()
            rows = self._db.execute("SELECT seq, item, time, action, scenario, labels FROM events WHERE user = ? "
                                    "ORDER BY seq", (user,)).fetchall()
        a = np.array(rows, np.int64).reshape(-1, 6)
        labels = (a[:, 5:6] >> np.arange(len(self.tasks))) & 1  # (n, T)
        events = History(a[:, 1], a[:, 2], a[:, 3], a[:, 4], labels)
        return Stored(events, a[:, 0], *(head or (0, None)))

    def count(self, user: int) -> int:
        with self._lock:
            row = self._db.execute("SELECT count FROM users WHERE user = ?", (user,)).fetchone()
        return row[0] if row else 0

    def append(self, user: int, events: History, drop: np.ndarray) -> int:
        mask = (events.labels << np.arange(len(self.tasks))).sum(1)
        with self._lock, self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT count FROM users WHERE user = ?", (user,)).fetchone()
            count = row[0] if row else 0
            seq = count + np.arange(len(events))
            self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", zip(
                [user] * len(events), *(c.tolist() for c in (seq, events.item, events.time, events.action,
                                                             events.scenario, mask))))
            self._db.executemany("DELETE FROM events WHERE user = ? AND seq = ?",
                                 [(user, int(s)) for s in drop])
            self._touched += 1
            self._db.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?)",
                             (user, count + len(events), int(events.time[-1]), self._touched))
            old = []
            if row is None:  # a new user: the least recently written ones make room
                old = self._db.execute("SELECT user FROM users ORDER BY touched LIMIT ?",
                                       (max(0, self._users + 1 - self.max_users),)).fetchall()
                self._db.executemany("DELETE FROM events WHERE user = ?", old)
                self._db.executemany("DELETE FROM users WHERE user = ?", old)
                self._users += 1 - len(old)
        return len(old)

    def close(self) -> None:
        with self._lock:
            self._db.close()
