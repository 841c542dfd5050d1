"""The one event schema every reader produces (docs/paper.md section 1).

An `EventLog` is a column store of interaction events: one row per (user, item) impression
or interaction, with a timestamp, one binary label per task (the behaviours we predict), an
optional categorical action (e.g. a star rating) and scenario, plus optional item and user
side features. Readers in `readers.py` turn each source format into an `EventLog`; `sumi.py`
turns an `EventLog` into SUMI samples.

Raw ids stay raw here (any int64); dense re-indexing happens in `sumi.prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad input data: the message names the file, and the row where one is known."""


@dataclass
class SideFeatures:
    """Categorical side features keyed by a raw id (item or user).

    `ids` (n,) raw ids; `codes` (n, C) int codes, 0 = missing; `names` one per column. Columns
    that share a name (consecutive) are one multi-valued feature, a bag (an item's tags or
    genres: one value per column, 0 in the unused ones). Feature f has `widths[f]` columns and
    `cards[f]` values 0..cards[f]-1.
    """

    ids: np.ndarray
    codes: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.codes = np.asarray(self.codes, dtype=np.int64).reshape(len(self.ids), -1)
        if self.codes.shape[1] != len(self.names):
            raise DataError(f"side features: {self.codes.shape[1]} columns, {len(self.names)} names")
        if len(np.unique(self.ids)) != len(self.ids):
            raise DataError("side features: duplicate ids")
        if (self.codes < 0).any():
            raise DataError("side features: negative codes (0 is reserved for missing)")
        if len(set(self.names)) != len(self.widths):
            raise DataError(f"side features: a bag's columns must be consecutive (names {self.names})")

    @property
    def widths(self) -> tuple[int, ...]:
        """Columns per feature: runs of equal names."""
        starts = [i for i, n in enumerate(self.names) if i == 0 or n != self.names[i - 1]]
        return tuple(b - a for a, b in zip(starts, [*starts[1:], len(self.names)]))

    @property
    def cards(self) -> tuple[int, ...]:
        return feature_cards(self.codes, self.widths)


def feature_cards(codes: np.ndarray, widths: tuple[int, ...]) -> tuple[int, ...]:
    """Values per feature (codes 0..max) of a (n, sum(widths)) code table."""
    ends = np.cumsum(widths, dtype=np.int64)
    return tuple(int(codes[:, e - w:e].max(initial=0)) + 1 for w, e in zip(widths, ends))


@dataclass
class EventLog:
    """Interaction events in one schema. Columns are aligned numpy arrays of length N.

    user, item: raw int64 ids.  time: int64 seconds (or any monotone unit; sequence position
    for logs without timestamps).  labels: (N, T) {0,1} per task in `tasks`.  action: (N,)
    small non-negative ints used as a history feature (e.g. the rating), 0 when absent.
    scenario: (N,) small non-negative ints, 0 when the source has none.  implicit: every row
    is a positive interaction and negatives must be sampled to build ranking samples.
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    labels: np.ndarray
    tasks: tuple[str, ...]
    action: np.ndarray | None = None
    scenario: np.ndarray | None = None
    implicit: bool = False
    item_features: SideFeatures | None = None
    user_features: SideFeatures | None = None
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.user)
        if n == 0:  # before the reshapes below, which fail on empty arrays
            raise DataError(f"{self.name}: no events")
        self.user = np.asarray(self.user, dtype=np.int64)
        self.item = np.asarray(self.item, dtype=np.int64)
        self.time = np.asarray(self.time, dtype=np.int64)
        # Check 0/1 before the int8 cast, which would turn 0.5 or 256 into a valid-looking 0.
        if not np.isin(np.asarray(self.labels), (0, 1)).all():
            raise DataError(f"{self.name}: labels must be 0/1")
        self.labels = np.asarray(self.labels, dtype=np.int8).reshape(n, -1)
        self.action = (
            np.zeros(n, np.int64) if self.action is None else np.asarray(self.action, dtype=np.int64)
        )
        self.scenario = (
            np.zeros(n, np.int64) if self.scenario is None else np.asarray(self.scenario, dtype=np.int64)
        )
        self.tasks = tuple(self.tasks)
        for col in ("item", "time", "labels", "action", "scenario"):
            if len(getattr(self, col)) != n:
                raise DataError(f"{self.name}: column {col} has {len(getattr(self, col))} rows, user has {n}")
        if self.labels.shape[1] != len(self.tasks) or not self.tasks:
            raise DataError(f"{self.name}: {self.labels.shape[1]} label columns for tasks {self.tasks}")
        for col in ("action", "scenario"):
            if (getattr(self, col) < 0).any():
                raise DataError(f"{self.name}: negative {col} values")

    def __len__(self) -> int:
        return len(self.user)
