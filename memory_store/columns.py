"""`ColumnTable`: parallel numpy columns of one length, amortized O(1) appends, mask compaction.

The memory keeps every per-entry field (key, value, ids, strength, ...) as one column; rows are
entries in insertion order, which is also ascending entry id, so ``np.searchsorted`` maps ids to
rows. A `ColumnGroup` keeps the columns of several tables of one schema (the KV heads of a layer)
as members of shared ``(tables, capacity, ...)`` arrays, so that one numpy call can read every
table at once (one matmul and one gather per column for a layer's search instead of one per head).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Schema = Mapping[str, tuple[np.dtype, tuple[int, ...]]]  # name -> (dtype, shape of one row)


class ColumnTable:
    """Named columns sharing a row count; `col(name)` returns a writable view of the live rows."""

    def __init__(
        self, schema: Schema, capacity: int = 0, group: ColumnGroup | None = None, member: int = 0
    ):
        self.schema = dict(schema)
        self.n = 0
        self.group = group  # when set, the buffers are rows `member` of the group's arrays
        if group is not None:
            self._buf = {name: arr[member] for name, arr in group.arrays.items()}
        else:
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
        if self.group is not None:
            self.group.shrink_if_sparse()
        elif self.capacity > 4 * max(self.n, 64):  # give memory back after a large eviction
            self._resize(max(self.n, 64))

    def nbytes(self) -> int:
        """Bytes held by the buffers (live rows and spare capacity)."""
        return sum(buf.nbytes for buf in self._buf.values())

    def _reserve(self, n: int) -> None:
        if n > self.capacity:
            # 1.25x growth: appends stay amortized O(1) without doubling the RAM of a large memory
            cap = max(n, self.capacity + self.capacity // 4 + 64)
            if self.group is not None:
                self.group.resize(cap)
            else:
                self._resize(cap)

    def _resize(self, cap: int) -> None:
        for name, buf in self._buf.items():
            new = np.zeros((cap, *buf.shape[1:]), dtype=buf.dtype)
            new[: self.n] = buf[: self.n]
            self._buf[name] = new


class ColumnGroup:
    """``count`` tables of one schema whose columns are members of shared arrays
    ``arrays[name]`` of shape ``(count, capacity, *row shape)``: member ``i`` of every array is
    table ``i``'s buffer, so rows ``>= tables[i].n`` of member ``i`` are spare. The capacity is
    shared: it grows when any table needs room and shrinks when all are sparse."""

    def __init__(self, schema: Schema, count: int):
        self.schema = dict(schema)
        self.arrays = {
            name: np.zeros((count, 0, *shape), dtype=dt) for name, (dt, shape) in schema.items()
        }
        self.tables = [ColumnTable(schema, group=self, member=i) for i in range(count)]

    @property
    def capacity(self) -> int:
        return int(next(iter(self.arrays.values())).shape[1])

    def resize(self, cap: int) -> None:
        """Reallocate every array to ``cap`` rows per table (at least each table's rows)."""
        cap = max(cap, max(t.n for t in self.tables))
        for name, arr in self.arrays.items():
            new = np.zeros((len(self.tables), cap, *arr.shape[2:]), dtype=arr.dtype)
            for i, t in enumerate(self.tables):
                new[i, : t.n] = arr[i, : t.n]
            self.arrays[name] = new
        for i, t in enumerate(self.tables):
            t._buf = {name: arr[i] for name, arr in self.arrays.items()}

    def shrink_if_sparse(self) -> None:
        """Give memory back once every table uses under a quarter of the capacity."""
        most = max(max(t.n for t in self.tables), 64)
        if self.capacity > 4 * most:
            self.resize(most)
