"""Brute-force numpy oracles and comparison helpers for the memory_store tests."""

from __future__ import annotations

import numpy as np

from memory_store import SessionMemory


def topk_ip(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `x` [N, D] of highest inner product with each query [Q, D]: (rows, scores)."""
    rows = np.full((len(q), k), -1, dtype=np.int64)
    scores = np.zeros((len(q), k), dtype=np.float32)
    if len(x):
        s = q.astype(np.float64) @ x.astype(np.float64).T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        rows[:, : order.shape[1]] = order
        scores[:, : order.shape[1]] = np.take_along_axis(s, order, axis=1)
    return rows, scores


def topk_l2(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `x` nearest in squared L2 to each query: (rows, squared distances), -1 pads."""
    rows = np.full((len(q), k), -1, dtype=np.int64)
    dist = np.full((len(q), k), np.inf, dtype=np.float32)
    if len(x):
        d = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        rows[:, : order.shape[1]] = order
        dist[:, : order.shape[1]] = np.take_along_axis(d, order, axis=1)
    return rows, dist


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true neighbours (ignoring -1) that were found, per query row."""
    hits = total = 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t))
        total += len(t)
    return hits / max(total, 1)


def random_turn(
    mem: SessionMemory,
    rng: np.random.Generator,
    T: int,
    message_id: int,
    base: np.ndarray | None = None,
) -> None:
    """Write T random tokens to every slot and the kNN store (keys near `base` rows if given)."""
    L, H, D, Dm = mem.shape
    keys = rng.standard_normal((L, H, T, D)).astype(np.float32)
    if base is not None and T:
        keys = base[:, :, rng.integers(0, base.shape[2], T)] + 0.05 * keys
    values = rng.standard_normal((L, H, T, D)).astype(np.float32)
    tok = rng.integers(0, 1000, T)
    mid = np.full(T, message_id)
    pos = np.arange(T)
    mem.write(keys, values, tok, mid, pos)
    mem.write_knn(
        rng.standard_normal((T, Dm)).astype(np.float32), rng.integers(0, 1000, T), tok, mid, pos
    )


def assert_same_memory(
    a: SessionMemory, b: SessionMemory, rng: np.random.Generator, k: int = 6
) -> None:
    """Bit-for-bit equal stored entries and reads (every slot, the kNN store, the counters)."""
    assert a.shape == b.shape
    assert (a.turn, a.next_id, a.next_knn_id) == (b.turn, b.next_id, b.next_knn_id)
    for sa, sb in zip(a.stores(), b.stores(), strict=True):
        for name in sa.table.schema:
            if name in ("put", "state", "ref"):
                continue  # bookkeeping, not content
            np.testing.assert_array_equal(sa.col(name), sb.col(name), err_msg=name)
    L, H, D, Dm = a.shape
    for layer in range(L):
        q = rng.standard_normal((H, 7, D)).astype(np.float32)
        ra, rb = a.search(layer, q, k), b.search(layer, q, k)
        for f in ("ids", "scores", "log_strength", "values", "keys"):
            np.testing.assert_array_equal(getattr(ra, f), getattr(rb, f), err_msg=f)
    h = rng.standard_normal((5, Dm)).astype(np.float32)
    ka, kb = a.knn_search(h, k), b.knn_search(h, k)
    for f in ("ids", "next_token_ids", "distances", "log_strength"):
        np.testing.assert_array_equal(getattr(ka, f), getattr(kb, f), err_msg=f)
    assert a.message_stats() == b.message_stats()
