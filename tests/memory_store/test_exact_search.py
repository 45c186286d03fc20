"""The exact (batched, below exact_max) read path against numpy brute force and the FAISS index."""

from __future__ import annotations

import numpy as np
import pytest
from ms_oracle import recall, topk_ip

from memory_store import MemoryParams, SearchResult, SessionMemory
from memory_store import store as store_mod
from memory_store.store import log_strength, topk_layout, topk_rows

L, H, D, DM = 2, 3, 8, 12


@pytest.mark.parametrize("n", [1, 5, 16, 17, 100, 127, 128, 300, 1450, 5000])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_rows_matches_sort(n: int, k: int) -> None:
    if k > n:
        return
    rng = np.random.default_rng(n * 100 + k)
    groups, width = topk_layout(n, k)
    assert width >= n and (groups == 0 or (width % groups == 0 and groups >= k))
    s = np.full((7, width), -np.inf, dtype=np.float32)
    s[:, :n] = rng.standard_normal((7, n)).astype(np.float32)
    s[2, min(n, 3) :] = -np.inf  # a row with at most 3 finite entries
    s[4] = -np.inf  # a row without any
    cols, vals = topk_rows(s, k, groups)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    want = np.take_along_axis(s, order, axis=1)
    np.testing.assert_array_equal(vals, want)
    np.testing.assert_array_equal(np.take_along_axis(s, cols, axis=1), vals)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(cols[finite], order[finite])  # no ties among finite floats
    for row in cols:
        assert len(np.unique(row)) == k  # distinct columns, also among the -inf padding


def test_topk_rows_ties_keep_the_top_values() -> None:
    rng = np.random.default_rng(5)
    n, k = 2000, 16
    groups, width = topk_layout(n, k)
    s = np.full((4, width), -np.inf, dtype=np.float32)
    s[:, :n] = rng.integers(0, 20, (4, n)).astype(np.float32)  # many equal scores
    cols, vals = topk_rows(s, k, groups)
    np.testing.assert_array_equal(vals, -np.sort(-s, axis=1)[:, :k])
    np.testing.assert_array_equal(np.take_along_axis(s, cols, axis=1), vals)
    assert all(len(np.unique(c)) == k for c in cols)


def _fill(
    mem: SessionMemory, rng: np.random.Generator, turns: int, T: int, knn: bool = False
) -> None:
    """Random turns from the current one; head 2's keys are near one direction, so it merges
    into few entries. With `knn`, the tokens' hidden states too."""
    base = rng.standard_normal(D).astype(np.float32)
    first = mem.turn
    for turn in range(first, first + turns):
        mem.set_turn(turn)
        keys = rng.standard_normal((L, H, T, D)).astype(np.float32)
        keys[:, 2] = base + 0.01 * keys[:, 2]
        values = rng.standard_normal((L, H, T, D)).astype(np.float32)
        mem.write(keys, values, np.arange(T), np.full(T, turn), np.arange(T))
        if knn:
            hidden = rng.standard_normal((T, DM)).astype(np.float32)
            mem.write_knn(hidden, np.arange(T), np.arange(T), np.full(T, turn), np.arange(T))


def _check_exact(mem: SessionMemory, rng: np.random.Generator, k: int) -> None:
    """Every flat slot's read equals a float64 brute force over its live entries, and FAISS,
    with a few queries (a decoding step: the compiled kernel) and with more (BLAS)."""
    many = store_mod._KERNEL_MAX_QUERIES + 1
    for layer, Q in [(layer, Q) for layer in range(L) for Q in (2, 9, many)]:
        q = rng.standard_normal((H, Q, D)).astype(np.float32)
        r = mem.search(layer, q, k)
        r_nokeys = mem.search(layer, q, k, with_keys=False)
        assert r_nokeys.keys is None
        for name in ("ids", "scores", "log_strength", "values"):
            np.testing.assert_array_equal(getattr(r, name), getattr(r_nokeys, name), name)
        assert r.keys is not None
        for h in range(H):
            slot = mem.slots[layer][h]
            if slot.index.kind != "flat":
                continue
            if len(slot) == 0:
                assert (r.ids[h] == -1).all() and (r.scores[h] == 0).all()
                assert np.isneginf(r.log_strength[h]).all() and (r.values[h] == 0).all()
                continue
            rows, scores = topk_ip(q[h], slot.col("key"), k)
            hit = rows >= 0
            r_ = np.maximum(rows, 0)
            np.testing.assert_array_equal(r.ids[h], np.where(hit, slot.col("id")[r_], -1))
            np.testing.assert_allclose(r.scores[h], np.where(hit, scores, 0), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(
                r.values[h], np.where(hit[..., None], slot.col("value")[r_].astype(np.float32), 0)
            )
            np.testing.assert_array_equal(
                r.keys[h], np.where(hit[..., None], slot.col("key")[r_], 0)
            )
            ls = log_strength(
                slot.col("s0")[r_], slot.col("refreshed")[r_], mem.turn, mem.params.decay
            )
            # the kernel's log may differ from numpy's in the last bit
            np.testing.assert_allclose(r.log_strength[h], np.where(hit, ls, -np.inf), rtol=1e-6)
            dist, frows = slot.index.search(q[h], k)  # the slot's FAISS flat index agrees
            np.testing.assert_array_equal(
                r.ids[h], np.where(frows >= 0, slot.col("id")[np.maximum(frows, 0)], -1)
            )
            np.testing.assert_allclose(r.scores[h], np.where(frows >= 0, dist, 0), atol=1e-5)


def test_exact_read_matches_brute_force_through_merges_and_evictions(rng) -> None:
    mem = SessionMemory(L, H, D, DM, MemoryParams(merge_threshold=0.9, decay=0.9, floor=0.5))
    _check_exact(mem, rng, 6)  # empty memory
    _fill(mem, rng, 3, 40)
    sizes = [[len(s) for s in layer] for layer in mem.slots]
    assert min(sizes[0][:2]) > 16 and max(s[2] for s in sizes) < 16  # head 2 below k
    for k in (1, 6, 16, 200):  # 200: more than any slot holds
        _check_exact(mem, rng, k)
    mem.slots[1][0].forget_all()  # an empty slot beside non-empty ones
    _check_exact(mem, rng, 16)
    # merges into existing entries (updated keys and values) and new entries
    mem.set_turn(3)
    again = np.stack([mem.slots[layer][1].col("key")[:10] for layer in range(L)])[:, None]
    keys = np.repeat(again, H, axis=1) + 0.001
    mem.write(keys, keys, np.arange(10), np.full(10, 9), np.arange(10))
    _check_exact(mem, rng, 16)
    # evictions (the first turns fall below the floor) compact every slot
    before = mem.entry_count()
    mem.set_turn(8)
    assert mem.evict() > 0 and mem.entry_count() < before
    _check_exact(mem, rng, 16)
    _fill(mem, rng, 1, 25)
    _check_exact(mem, rng, 16)


def test_exact_read_blocks_and_chunks(rng, monkeypatch) -> None:
    """Query blocks (bounded score buffer) and row chunks (bounded matmuls) change nothing but
    rounding."""
    mem = SessionMemory(L, H, D, DM, MemoryParams(merge_threshold=2.0))
    _fill(mem, rng, 2, 400)
    q = rng.standard_normal((H, store_mod._KERNEL_MAX_QUERIES + 20, D)).astype(np.float32)
    whole = mem.search(1, q, 16)  # beyond the kernel's queries: the BLAS read
    monkeypatch.setattr(store_mod, "_SCORE_BLOCK", 1)  # one query per block
    monkeypatch.setattr(store_mod, "_GEMM_MNK", 1)  # 256 key rows per matmul
    parts = mem.search(1, q, 16)
    for name in ("ids", "log_strength", "values", "keys"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(parts, name), name)
    np.testing.assert_allclose(whole.scores, parts.scores, rtol=1e-6, atol=1e-6)
    _check_exact(mem, rng, 16)


@pytest.mark.parametrize("approx", ["ivf", "hnsw"])
def test_mixed_layer_exact_and_approximate(rng, approx) -> None:
    """Heads above exact_max go through the approximate index, the others through the exact
    path, in one call."""
    params = MemoryParams(merge_threshold=0.9, exact_max=60, hnsw_m=16, approx_index=approx)
    mem = SessionMemory(L, H, D, DM, params)
    _fill(mem, rng, 4, 50)
    kinds = [s.index.kind for s in mem.slots[0]]
    assert kinds == [approx, approx, "flat"]
    _check_exact(mem, rng, 8)
    q = rng.standard_normal((H, 20, D)).astype(np.float32)
    r = mem.search(0, q, 8, with_keys=False)
    assert isinstance(r, SearchResult) and r.keys is None
    for h in (0, 1):
        keys = mem.slots[0][h].col("key")
        truth = mem.slots[0][h].col("id")[topk_ip(q[h], keys, 8)[0]]
        assert recall(r.ids[h], truth) >= 0.9


def test_search_rejects_a_layer_outside_the_model() -> None:
    mem = SessionMemory(L, H, D, DM)
    with pytest.raises(IndexError):
        mem.search(L, np.zeros((H, 1, D), np.float32), 4)


@pytest.mark.parametrize("queries", [3, 50, store_mod._KERNEL_MAX_QUERIES])
def test_kernel_and_blas_reads_agree_and_ties_go_to_the_older_entry(
    rng, monkeypatch, queries: int
) -> None:
    """The compiled read (up to _KERNEL_MAX_QUERIES queries) and the BLAS read give the same
    entries; among equal scores the kernel keeps the older entries (lower rows), as a stable sort
    would."""
    mem = SessionMemory(L, H, D, DM, MemoryParams(merge_threshold=2.0))
    _fill(mem, rng, 3, 120)
    q = rng.standard_normal((H, queries, D)).astype(np.float32)
    kernel = mem.search(0, q, 16)
    monkeypatch.setattr(store_mod, "_KERNEL_MAX_QUERIES", 0)
    blas = mem.search(0, q, 16)
    for name in ("ids", "values", "keys"):
        np.testing.assert_array_equal(getattr(kernel, name), getattr(blas, name), name)
    np.testing.assert_allclose(kernel.scores, blas.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernel.log_strength, blas.log_strength, rtol=1e-6)
    monkeypatch.undo()
    # ties: keys from four distinct vectors, so every query sees runs of equal scores
    tied = SessionMemory(1, 1, D, DM, MemoryParams(merge_threshold=2.0))
    basis = rng.integers(-3, 4, (4, D)).astype(np.float32)
    keys = basis[rng.integers(0, 4, 300)][None, None]
    tied.write(keys, keys, np.arange(300), np.zeros(300, np.int64), np.arange(300))
    qt = rng.integers(-3, 4, (1, 2, D)).astype(np.float32)
    r = tied.search(0, qt, 16)
    scores = keys[0, 0] @ qt[0].T  # [300, 2], exact in float32 (small integers)
    for g in range(2):
        order = np.argsort(-scores[:, g], kind="stable")[:16]  # equal scores: lower row first
        np.testing.assert_array_equal(r.ids[0, g], tied.slots[0][0].col("id")[order])


@pytest.mark.parametrize("queries", [1, 24, 63])
def test_kernel_equals_the_blas_read_on_slots_of_unequal_sizes(
    rng, monkeypatch, queries: int
) -> None:
    """A turn's first pass (many queries per head) through the kernel's blocked scan: the same
    entries as the BLAS read, slots of unequal sizes, misses past the small slot's entries."""
    mem = SessionMemory(L, H, D, DM)  # merging on: head 2 holds far fewer entries (`_fill`)
    _fill(mem, rng, 3, 120)
    sizes = [len(s) for s in mem.slots[0]]
    assert min(sizes) < 16 < max(sizes)
    q = rng.standard_normal((H, queries, D)).astype(np.float32)
    kernel = mem.search(0, q, 16)
    monkeypatch.setattr(store_mod, "_KERNEL_MAX_QUERIES", 0)
    blas = mem.search(0, q, 16)
    for name in ("ids", "values", "keys"):
        np.testing.assert_array_equal(getattr(kernel, name), getattr(blas, name), name)
    np.testing.assert_allclose(kernel.scores, blas.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernel.log_strength, blas.log_strength, rtol=1e-6)


@pytest.mark.parametrize("widen", ["_f16_bits_to_f32", "_f16_bits_to_f32_portable"])
def test_kernel_float16_conversion_is_exact_for_every_bit_pattern(widen: str) -> None:
    """The widening the kernels use (F16C's where the CPU has it) and the portable one."""
    import numba

    from memory_store import kernels
    from memory_store.kernels import _f32_to_f16_bits

    to_f32 = getattr(kernels, widen)

    @numba.njit
    def convert(bits: np.ndarray, out: np.ndarray, back: np.ndarray) -> None:
        for i in range(bits.shape[0]):
            out[i] = to_f32(bits[i])
            back[i] = _f32_to_f16_bits(out[i])

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(1 << 16, dtype=np.float32)
    back = np.empty(1 << 16, dtype=np.uint16)
    convert(bits, out, back)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    # zeros, subnormals, inf: bit for bit, and back again
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    np.testing.assert_array_equal(back[~nan], bits[~nan])
    assert np.isnan(out[nan]).all()


def _check_blocked(mem: SessionMemory) -> None:
    """Every slot's blocked keys are its key column's bits, and the kNN store's blocked codes
    its hidden states' rint(x / step), within half a step of each value, block by block; the
    rows past their entries (the last block's padding and the spare blocks) are zero; a store
    above exact_max keeps none; the kNN store's squared norms are its rows'."""
    from memory_store.kernels import BLOCK, blocks_for

    for store in mem.stores():
        n = len(store)
        col = store.col(store.blocked_column)
        if store.index.kind != "flat":  # FAISS serves the reads: no copy kept
            assert store.blocked.n == 0 and store.blocked._buf.size == 0
            continue
        if store is mem.knn:
            x, step = col.astype(np.float32), mem.knn.blocked.scale
            rows = np.rint(x * (np.float32(1) / step)).astype(np.int8)
            assert (np.abs(rows * step - x) <= step * (0.5 + 1e-5)).all()
        else:
            rows = col.view(np.uint16)
        padded = np.zeros((blocks_for(n) * BLOCK, col.shape[1]), rows.dtype)
        padded[:n] = rows
        want = padded.reshape(-1, BLOCK, col.shape[1]).transpose(0, 2, 1)
        np.testing.assert_array_equal(store.blocked.view(), want)
        assert not store.blocked._buf[blocks_for(n) :].any()
    hidden = mem.knn.col("hidden").astype(np.float64)
    np.testing.assert_allclose(mem.knn._norms2, (hidden**2).sum(1), rtol=1e-6)


def test_blocked_copies_follow_writes_merges_evictions_forgets_and_loads(rng) -> None:
    params = MemoryParams(merge_threshold=0.9, decay=0.9, floor=0.5)
    mem = SessionMemory(L, H, D, DM, params)
    _check_blocked(mem)
    _fill(mem, rng, 3, 40, knn=True)  # appends and merges within and across writes
    _check_blocked(mem)
    mem.set_turn(3)
    again = np.stack([mem.slots[layer][1].col("key")[:10] for layer in range(L)])[:, None]
    keys = np.repeat(again, H, axis=1) + 0.001  # merges into old entries, in place
    mem.write(keys, keys, np.arange(10), np.full(10, 9), np.arange(10))
    _check_blocked(mem)
    mem.set_turn(8)
    assert mem.evict() > 0  # compaction from the first evicted row
    _check_blocked(mem)
    rows = {name: mem.knn.col(name).copy() for name in mem.knn.table.schema}
    assert mem.knn.forget_all() > 0 and not mem.knn.blocked._buf.any()
    mem.knn.load_rows(rows)
    _check_blocked(mem)
    ids = mem.slots[0][0].col("message_id")
    assert mem.forget_message(int(ids[len(ids) // 2])) > 0
    _check_blocked(mem)
    slot = mem.slots[1][1]
    before = slot.blocked._buf.copy()
    assert slot.forget_all() > 0 and not slot.blocked._buf.any()  # nothing forgotten stays
    assert before.any()
    slot.load_rows({name: mem.slots[1][0].col(name).copy() for name in slot.table.schema})
    _check_blocked(mem)
    _fill(mem, rng, 2, 300, knn=True)  # growth past the buffer's capacity
    _check_blocked(mem)


@pytest.mark.parametrize("dim", [64, 67])
@pytest.mark.parametrize("n", [1, 16, 50])
@pytest.mark.parametrize("queries", [1, 2, 3, 4, 7])
def test_block_scores_match_float64_on_both_paths(rng, queries: int, n: int, dim: int) -> None:
    """The blocked scan's scores and block maxima (F16C vector code where the CPU has it) and the
    portable loop's, against float64 products of the same float16 keys, head size 64 as the
    model's and one the vector code's accumulator chains do not divide; scores all negative, so
    the last block's zero padding must not count as its max."""
    import numba

    from memory_store import kernels

    blocks = kernels.blocks_for(n)
    # positive queries, negative keys: every score below zero
    q = (np.abs(rng.standard_normal((queries, dim))) + 0.5).astype(np.float32)
    keys = (-np.abs(rng.standard_normal((n, dim))) * 3 - 1).astype(np.float16)
    padded = np.zeros((blocks * kernels.BLOCK, dim), np.float16)
    padded[:n] = keys
    blocked = np.ascontiguousarray(
        padded.view(np.uint16).reshape(-1, kernels.BLOCK, dim).transpose(0, 2, 1)
    )
    want = q.astype(np.float64) @ keys.astype(np.float64).T
    assert (want < 0).all()

    @numba.njit
    def portable(blocked: np.ndarray, n: int, q: np.ndarray, dots: np.ndarray, maxima) -> None:
        for b in range(blocked.shape[0]):
            kernels._score_block_portable(blocked, b, q, 0, q.shape[0], dots, maxima)
        for g in range(q.shape[0]):  # the last block's maximum over its keys only, as the kernel
            maxima[g, -1] = dots[g, (blocked.shape[0] - 1) * kernels.BLOCK : n].max()

    for score in (kernels._score_blocks, portable):
        dots = np.full((queries, len(padded)), np.nan, np.float32)
        maxima = np.full((queries, blocks), np.nan, np.float32)
        score(blocked, n, q, dots, maxima)
        np.testing.assert_allclose(dots[:, :n], want, rtol=1e-5, atol=1e-4)
        assert (dots[:, n:] == 0).all()  # zero padding scores zero
        for b in range(blocks):
            rows = slice(b * kernels.BLOCK, min(n, (b + 1) * kernels.BLOCK))
            np.testing.assert_array_equal(maxima[:, b], dots[:, rows].max(axis=1))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 255, 256, 257, 1000])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_block_skipping_top_k_equals_the_full_scan(rng, n: int, k: int) -> None:
    """`_top_rows_blocked` returns `_top_rows`' rows in its order: random scores, scores with
    many ties (small integers: ties go to the lower row), and the best rows crowded in one block."""
    from memory_store import kernels

    crowded = np.arange(n) // kernels.BLOCK == (n // kernels.BLOCK) // 2
    cases = [
        rng.standard_normal(n).astype(np.float32),
        rng.integers(-2, 3, n).astype(np.float32),
        (np.where(crowded, 5.0, -1.0) + rng.standard_normal(n) * 0.01).astype(np.float32),
    ]
    for scores in cases:
        blocks = kernels.blocks_for(n)
        padded = np.concatenate([scores, np.full(blocks * kernels.BLOCK - n, 99, np.float32)])
        maxima = np.array(
            [scores[b * kernels.BLOCK : (b + 1) * kernels.BLOCK].max() for b in range(blocks)],
            np.float32,
        )
        want_rows, want_best = np.empty(k, np.int64), np.empty(k, np.float32)
        kernels._top_rows(scores, n, k, want_rows, want_best)
        rows, best = np.empty(k, np.int64), np.empty(k, np.float32)
        kernels._top_rows_blocked(padded, maxima, n, k, rows, best)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(best, want_best)
        top = np.argsort(-scores, kind="stable")[:k]  # and both are the stable sort's
        np.testing.assert_array_equal(rows[: len(top)], top)


@pytest.mark.parametrize("queries", [1, 3, 4, 50])
def test_knn_exact_scan_matches_float64_brute_force(rng, queries: int) -> None:
    """The kNN read's scan of int8 codes with exact rescoring (`kernels.nearest_l2`, queries in
    blocks of `_KNN_QUERY_BLOCK`) against float64 distances to the same float16 hidden states,
    model width, with a few dimensions far larger than the rest (as real hidden states) and a
    turn whose states outgrow the codes' steps: the same rows in the same order, distances to
    1e-4; a query equal to a stored state finds it first at distance ~0 (never below); near
    neighbours at nearly equal distances in the right order; k past the entries gives -1 and
    +inf. The FAISS index is not built while the store is exact."""
    dm = 576
    mem = SessionMemory(L, H, D, dm, MemoryParams(decay=0.9, floor=0.5))

    def check(q: np.ndarray, k: int = 8) -> None:
        x = mem.knn.col("hidden").astype(np.float64)
        found = mem.knn_search(q, k)
        d2 = ((q.astype(np.float64)[:, None, :] - x[None]) ** 2).sum(-1)
        want = np.argsort(d2, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(found.ids, mem.knn.col("id")[want])
        # the expansion |q|^2 + |x|^2 - 2 q.x rounds at float32 precision of |q|^2
        atol = 1e-5 * float((q.astype(np.float64) ** 2).sum(1).max())
        np.testing.assert_allclose(
            found.distances, np.take_along_axis(d2, want, 1), rtol=1e-4, atol=atol
        )

    for turn in range(3):
        mem.set_turn(turn)
        hidden = rng.standard_normal((300, dm)) * rng.uniform(0.5, 4, (300, 1))
        hidden[:, [7, 300]] *= 40 * (turn + 1)  # outlier dimensions, growing: steps grow
        hidden = hidden.astype(np.float32)
        mem.write_knn(hidden, np.arange(300), np.arange(300), np.full(300, turn), np.arange(300))
        check(rng.standard_normal((queries, dm)).astype(np.float32) * 3)
    assert mem.knn.blocked.requantized >= 2
    mem.set_turn(7)
    assert mem.evict() == 300  # the first turn's: a compaction from row 0, codes and norms moved
    x = mem.knn.col("hidden").astype(np.float32)
    q = rng.standard_normal((queries, dm)).astype(np.float32) * 3
    q[0] = x[17]  # a stored state itself
    if queries > 1:  # a point between two states, a hair nearer the second
        q[1] = 0.5 * (x[40] + x[41]) + 1e-3 * (x[41] - x[40])
    check(q)
    found = mem.knn_search(q, 8)
    assert found.ids[0, 0] == mem.knn.col("id")[17]
    assert 0 <= found.distances[0, 0] < 1e-5 * (q[0] ** 2).sum()
    n = len(mem.knn)
    wide = mem.knn_search(q[:2], n + 5)
    assert (wide.ids[:, n:] == -1).all() and np.isinf(wide.distances[:, n:]).all()
    assert (np.diff(wide.distances[:, :n], axis=1) >= 0).all()
    assert not mem.knn.index.built


def test_blocked_copies_released_above_exact_max_and_made_again_below(rng) -> None:
    """A store past exact_max (FAISS reads) gives its blocked copy back, merges into it meanwhile
    touch no copy, and once a removal (from a row past 0) takes it back to exact_max or below
    the copy is made again from row 0: reads are the exact scan's again (brute force), kNN
    included."""
    params = MemoryParams(merge_threshold=0.9, decay=0.9, floor=0.5, exact_max=70)
    mem = SessionMemory(L, H, D, DM, params)
    _fill(mem, rng, 1, 40, knn=True)
    _check_blocked(mem)
    assert mem.knn.blocked.nbytes > 0
    flat_bytes = mem.nbytes()
    mem.set_turn(5)
    _fill(mem, rng, 1, 40, knn=True)  # 80 rows: above exact_max
    assert mem.knn.index.kind == "ivf" and mem.slots[0][0].index.kind == "ivf"
    _check_blocked(mem)
    assert mem.slots[0][0].blocked.nbytes == 0
    mem.set_turn(6)
    again = np.stack([mem.slots[layer][1].col("key")[:10] for layer in range(L)])[:, None]
    keys = np.repeat(again, H, axis=1) + 0.001  # merges in place while approximate
    mem.write(keys, keys, np.arange(10), np.full(10, 9), np.arange(10))
    _check_blocked(mem)
    q = rng.standard_normal((H, 3, D)).astype(np.float32)
    assert (mem.search(0, q, 4).ids[:2] >= 0).all()  # read through FAISS
    # the second turn's entries forgotten (rows from the middle on): back below exact_max
    assert mem.forget_message(5) > 0
    assert mem.knn.index.kind == "flat" and mem.slots[0][0].index.kind == "flat"
    _check_blocked(mem)
    assert mem.nbytes() < 2 * flat_bytes
    for layer in range(L):
        r = mem.search(layer, q, 4)
        for h in range(H):
            slot = mem.slots[layer][h]
            rows, _ = topk_ip(q[h], slot.col("key"), 4)
            np.testing.assert_array_equal(r.ids[h], slot.col("id")[rows])
    hq = rng.standard_normal((2, DM)).astype(np.float32)
    x = mem.knn.col("hidden").astype(np.float64)
    d2 = ((hq.astype(np.float64)[:, None] - x[None]) ** 2).sum(-1)
    want = mem.knn.col("id")[np.argsort(d2, axis=1, kind="stable")[:, :5]]
    np.testing.assert_array_equal(mem.knn_search(hq, 5).ids, want)


@pytest.mark.parametrize("dim", [576, 67])
@pytest.mark.parametrize("queries", [1, 3, 4])
def test_code_block_scores_match_float64(rng, queries: int, dim: int) -> None:
    """The int8 codes' scan (`_score_code_blocks`: one query in four accumulator chains, three
    in two, any remainder of the dimensions) against float64 products of the same codes, with
    block maxima over the real rows only."""
    import numba

    from memory_store import kernels

    n = 37
    blocks = kernels.blocks_for(n)
    codes = rng.integers(-127, 128, (n, dim)).astype(np.int8)
    padded = np.zeros((blocks * kernels.BLOCK, dim), np.int8)
    padded[:n] = codes
    blocked = np.ascontiguousarray(padded.reshape(-1, kernels.BLOCK, dim).transpose(0, 2, 1))
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    q[:, 0] = -1000.0  # with codes[:, 0] >= 1 below: every score negative, padding's zero above
    codes[:, 0] = np.abs(codes[:, 0]) + 1
    blocked[:, 0, :] = np.abs(blocked[:, 0, :]) + 1
    blocked[-1, 0, n % kernels.BLOCK or kernels.BLOCK :] = 0
    want = q.astype(np.float64) @ codes.astype(np.float64).T

    @numba.njit
    def score(blocked: np.ndarray, n: int, q: np.ndarray, dots: np.ndarray, maxima) -> None:
        kernels._score_code_blocks(blocked, n, q, dots, maxima)

    dots = np.full((queries, len(padded)), np.nan, np.float32)
    maxima = np.full((queries, blocks), np.nan, np.float32)
    score(blocked, n, q, dots, maxima)
    np.testing.assert_allclose(dots[:, :n], want, rtol=1e-5, atol=1e-2)
    assert (dots[:, n:] == 0).all()
    for b in range(blocks):
        rows = slice(b * kernels.BLOCK, min(n, (b + 1) * kernels.BLOCK))
        np.testing.assert_array_equal(maxima[:, b], dots[:, rows].max(axis=1))
