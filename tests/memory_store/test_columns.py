"""`ColumnTable` and `ColumnGroup`: rows survive growth, compaction and shrinking, and a group's
tables are the members of its shared arrays."""

from __future__ import annotations

import numpy as np

from memory_store.columns import ColumnGroup, ColumnTable

SCHEMA = {"id": (np.dtype(np.int64), ()), "vec": (np.dtype(np.float32), (4,))}


def _rows(start: int, m: int) -> dict[str, np.ndarray]:
    ids = np.arange(start, start + m, dtype=np.int64)
    return {"id": ids, "vec": np.repeat(ids[:, None], 4, axis=1).astype(np.float32)}


def test_group_tables_keep_their_rows_and_share_the_arrays() -> None:
    group = ColumnGroup(SCHEMA, 3)
    a, b, c = group.tables
    want: list[list[int]] = [[], [], []]
    rng = np.random.default_rng(0)
    for _ in range(40):  # appends of random sizes to random tables: many shared resizes
        i, m = int(rng.integers(3)), int(rng.integers(1, 30))
        group.tables[i].append(_rows(1000 * i + len(want[i]), m))
        want[i] += list(range(1000 * i + len(want[i]), 1000 * i + len(want[i]) + m))
        for t, w in zip(group.tables, want, strict=True):
            np.testing.assert_array_equal(t.col("id"), w)
            np.testing.assert_array_equal(t.col("vec")[:, 2], w)
    cap = group.capacity
    assert cap >= max(len(w) for w in want) and all(t.capacity == cap for t in group.tables)
    for i, t in enumerate(group.tables):  # member i of the shared array is table i
        np.testing.assert_array_equal(group.arrays["id"][i, : len(t)], t.col("id"))
    t = group.tables[0]
    t.col("vec")[0] = -1.0  # writes through a table land in the shared array
    assert (group.arrays["vec"][0, 0] == -1.0).all()
    # compaction in one table leaves the others; shrinking waits until all are sparse
    keep = np.zeros(len(a), dtype=bool)
    keep[:3] = True
    a.keep(keep)
    assert len(a) == 3 and group.capacity == cap
    for t in (b, c):
        t.keep(np.zeros(len(t), dtype=bool))
    assert group.capacity == 64 and len(b) == len(c) == 0
    np.testing.assert_array_equal(a.col("id"), want[0][:3])


def test_a_table_of_its_own_grows_and_shrinks() -> None:
    t = ColumnTable(SCHEMA)
    t.append(_rows(0, 500))
    assert t.capacity >= 500 and t.group is None
    t.keep(np.arange(500) < 10)
    assert t.capacity == 64
    np.testing.assert_array_equal(t.col("id"), np.arange(10))
