"""`ColumnTable`: parallel numpy columns of one length, amortized O(1) appends, mask compaction.

The memory keeps every per-entry field (key, value, ids, strength, ...) as one column; rows are
entries in insertion order, which is also ascending entry id, so ``np.searchsorted`` maps ids to
rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

Schema = Mapping[str, tuple[np.dtype, tuple[int, ...]]]  # name -> (dtype, shape of one row)
_versions = itertools.count(1)  # shared by all tables: a version names one table's one state


class ColumnTable:
    """Named columns sharing a row count; `col(name)` returns a writable view of the live rows."""

    def __init__(self, schema: Schema, capacity: int = 0):
        self.schema = dict(schema)
        self.n = 0
        # changes whenever the views `col` returns would change (rows added or removed, buffers
        # reallocated): views kept under a version stay valid while it holds
        self.version = next(_versions)
        self._buf = {
            name: np.zeros((capacity, *shape), dtype=dt)
            for name, (dt, shape) in self.schema.items()
        }

    def __len__(self) -> int:
        return self.n

    @property
    def capacity(self) -> int:
        return len(next(iter(self._buf.values())))

    def col(self, name: str) -> np.ndarray:
        """View of column `name` over the live rows (writes go to the table)."""
        return self._buf[name][: self.n]

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append m rows; `rows` must give every column, each with a leading dimension m."""
        if set(rows) != set(self.schema):
            raise KeyError(f"columns {sorted(rows)} differ from the schema {sorted(self.schema)}")
        m = len(next(iter(rows.values())))
        if m == 0:
            return
        self._reserve(self.n + m)
        for name, x in rows.items():
            assert len(x) == m, (name, len(x), m)
            self._buf[name][self.n : self.n + m] = x
        self.n += m
        self.version = next(_versions)

    def keep(self, mask: np.ndarray) -> None:
        """Keep the rows where `mask` is True, in order."""
        assert mask.shape == (self.n,) and mask.dtype == np.bool_
        first = int(np.argmin(mask)) if not mask.all() else self.n
        if first == self.n:
            return
        m = first + int(mask[first:].sum())
        for buf in self._buf.values():
            buf[first:m] = buf[first : self.n][mask[first:]]
        self.n = m
        self.version = next(_versions)
        if self.capacity > 4 * max(self.n, 64):  # give memory back after a large eviction
            self._resize(max(self.n, 64))

    def zero_spare(self) -> None:
        """Zero the buffer rows past the live ones (removed rows are left there by `keep`)."""
        for buf in self._buf.values():
            buf[self.n :] = 0

    def nbytes(self) -> int:
        """Bytes held by the buffers (live rows and spare capacity)."""
        return sum(buf.nbytes for buf in self._buf.values())

    def _reserve(self, n: int) -> None:
        if n > self.capacity:
            # 1.25x growth: appends stay amortized O(1) without doubling the RAM of a large memory
            self._resize(max(n, self.capacity + self.capacity // 4 + 64))

    def _resize(self, cap: int) -> None:
        for name, buf in self._buf.items():
            new = np.zeros((cap, *buf.shape[1:]), dtype=buf.dtype)
            new[: self.n] = buf[: self.n]
            self._buf[name] = new
        self.version = next(_versions)
