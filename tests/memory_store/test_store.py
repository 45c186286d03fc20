"""SessionMemory against numpy oracles: read, merge, decay, reinforcement, eviction, forgetting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ms_oracle import random_turn, recall, topk_ip, topk_l2

from memory_store import MemoryParams, SessionMemory, ShapeError
from memory_store.store import batch_roots, round_f16

L, H, D, DM = 3, 2, 8, 12
NO_MERGE = 2.0  # merge_threshold above any cosine


def make(**kw) -> SessionMemory:
    return SessionMemory(L, H, D, DM, MemoryParams(**kw))


def write(
    mem: SessionMemory, keys: np.ndarray, values: np.ndarray | None = None, message_id: int = 0
):
    """Write keys [L, H, T, D] (values random if None) for message `message_id`."""
    T = keys.shape[2]
    if values is None:
        values = np.random.default_rng(T).standard_normal(keys.shape).astype(np.float32)
    return mem.write(keys, values, np.arange(T) + 100, np.full(T, message_id), np.arange(T))


def test_search_matches_brute_force(rng):
    mem = make(merge_threshold=NO_MERGE, decay=0.9)
    keys, values = [], []
    for turn in range(4):
        mem.set_turn(turn)
        k = rng.standard_normal((L, H, 30, D)).astype(np.float32)
        v = rng.standard_normal((L, H, 30, D)).astype(np.float32)
        stats = write(mem, k, v, message_id=turn)
        assert (stats.added, stats.merged) == (L * H * 30, 0)
        keys.append(round_f16(k))
        values.append(round_f16(v))
    K, V = np.concatenate(keys, axis=2), np.concatenate(values, axis=2)  # (L, H, 120, D)
    turn_of = np.repeat(np.arange(4), 30)
    for layer in range(L):
        q = rng.standard_normal((H, 40, D)).astype(np.float32)
        r = mem.search(layer, q, 10)
        assert r.ids.shape == (H, 40, 10) and r.values.shape == (H, 40, 10, D)
        assert r.ids.dtype == np.int64 and r.scores.dtype == np.float32
        assert r.values.dtype == np.float32 and r.keys.dtype == np.float32
        for h in range(H):
            rows, scores = topk_ip(q[h], K[layer, h], 10)
            np.testing.assert_array_equal(r.ids[h], rows)  # ids = write order here
            np.testing.assert_allclose(r.scores[h], scores, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(r.values[h], V[layer, h][rows])
            np.testing.assert_array_equal(r.keys[h], K[layer, h][rows])
            want = (3 - turn_of[rows]) * math.log(0.9)
            np.testing.assert_allclose(r.log_strength[h], want, rtol=1e-6, atol=1e-6)


def test_missing_neighbours_are_padded():
    mem = make(merge_threshold=NO_MERGE)
    r = mem.search(0, np.ones((H, 2, D), np.float32), 4)
    assert (r.ids == -1).all() and (r.scores == 0).all() and np.isneginf(r.log_strength).all()
    write(mem, np.random.default_rng(0).standard_normal((L, H, 3, D)).astype(np.float32))
    r = mem.search(1, np.ones((H, 2, D), np.float32), 5)
    assert (r.ids[..., 3:] == -1).all() and (r.ids[..., :3] >= 0).all()
    assert (r.values[..., 3:, :] == 0).all() and (r.keys[..., 3:, :] == 0).all()
    assert np.isneginf(r.log_strength[..., 3:]).all() and (r.scores[..., 3:] == 0).all()


@pytest.mark.parametrize("approx", ["ivf", "hnsw"])
def test_approximate_path_recall(rng, approx):
    mem = make(merge_threshold=NO_MERGE, exact_max=100, hnsw_m=16, approx_index=approx)
    k = rng.standard_normal((L, H, 600, D)).astype(np.float32)
    write(mem, k)
    q = rng.standard_normal((H, 50, D)).astype(np.float32)
    r = mem.search(2, q, 8)
    assert mem.slots[2][0].index.kind == approx
    for h in range(H):
        assert recall(r.ids[h], topk_ip(q[h], round_f16(k[2, h]), 8)[0]) >= 0.9
        np.testing.assert_array_equal(r.keys[h], round_f16(k[2, h])[r.ids[h]])
    # removals and merges (tombstones in HNSW, dropped from the IVF lists); reads stay right
    mem.forget_message(0)
    write(mem, k[:, :, :300], message_id=1)
    r = mem.search(2, q, 8)
    for h in range(H):
        rows = np.where(r.ids[h] >= 0, r.ids[h] - 600, -1)  # ids go on from 600
        assert recall(rows, topk_ip(q[h], round_f16(k[2, h, :300]), 8)[0]) >= 0.9


def test_merge_rule_math():
    mem = make(merge_threshold=0.98, merge_weight=0.25)
    rng = np.random.default_rng(3)
    k0 = rng.standard_normal((L, H, 1, D)).astype(np.float32)
    v0 = rng.standard_normal((L, H, 1, D)).astype(np.float32)
    write(mem, k0, v0, message_id=7)
    mem.set_turn(5)
    k1 = k0 * 1.5 + 0.001  # cosine ~1, different norm
    v1 = rng.standard_normal((L, H, 1, D)).astype(np.float32)
    far = -k0  # cosine -1: a new entry
    stats = mem.write(
        np.concatenate([k1, far], 2), np.concatenate([v1, v1], 2),
        np.array([1, 2]), np.array([9, 9]), np.array([0, 1]),
    )  # fmt: skip
    assert (stats.added, stats.merged) == (L * H, L * H)
    for layer in range(L):
        for h in range(H):
            s = mem.slots[layer][h]
            m0, want_v = round_f16(k0[layer, h, 0]), round_f16(v0[layer, h, 0])
            want_k = round_f16(m0 + 0.25 * (round_f16(k1[layer, h, 0]) - m0))
            want_v = (want_v + 0.25 * (round_f16(v1[layer, h, 0]) - want_v)).astype(np.float16)
            np.testing.assert_array_equal(s.col("key")[0], want_k)
            np.testing.assert_array_equal(s.col("value")[0], want_v)
            assert s.col("s0")[0] == 1.0 and s.col("refreshed")[0] == 5
            assert s.col("message_id")[0] == 7 and s.col("turn_written")[0] == 0  # creator's
            assert s.col("message_id")[1] == 9 and len(s) == 2


def test_merges_into_one_entry_apply_in_token_order():
    mem = make(merge_threshold=0.95, merge_weight=0.5)
    base = np.zeros((L, H, 1, D), np.float32)
    base[..., 0] = 1.0
    write(mem, base, np.zeros((L, H, 1, D), np.float32))
    a, b = base.copy(), base.copy()
    a[..., 1], b[..., 2] = 0.1, 0.2  # both within cosine 0.95 of base
    va, vb = np.full_like(a, 2.0), np.full_like(b, 4.0)
    stats = write(mem, np.concatenate([a, b], 2), np.concatenate([va, vb], 2))
    assert (stats.added, stats.merged) == (0, 2 * L * H)
    m1 = round_f16(base + 0.5 * (round_f16(a) - base))
    m2 = round_f16(m1 + 0.5 * (round_f16(b) - m1))
    np.testing.assert_array_equal(mem.slots[0][0].col("key")[0], m2[0, 0, 0])
    # values 0 -> 0 + (2 - 0) / 2 = 1 -> 1 + (4 - 1) / 2 = 2.5
    np.testing.assert_array_equal(mem.slots[0][0].col("value")[0], np.full(D, 2.5, np.float16))


def test_merge_within_one_write():
    mem = make(merge_threshold=0.98, merge_weight=0.5)
    rng = np.random.default_rng(4)
    k = rng.standard_normal((L, H, 1, D)).astype(np.float32)
    other = rng.standard_normal((L, H, 1, D)).astype(np.float32)
    stats = write(mem, np.concatenate([k, other, k * 2], 2))  # third repeats the first
    assert (stats.added, stats.merged) == (2 * L * H, L * H)
    assert mem.slot_size(0, 0) == 2 and mem.token_count() == 0


def test_below_threshold_is_a_new_entry():
    mem = make(merge_threshold=0.98)
    k = np.zeros((L, H, 1, D), np.float32)
    k[..., 0] = 1.0
    write(mem, k)
    k2 = k.copy()
    k2[..., 1] = 0.3  # cosine 0.958
    assert write(mem, k2).added == L * H and mem.slot_size(1, 1) == 2


def test_decay_is_computed_from_age(rng):
    mem = make(merge_threshold=NO_MERGE, decay=0.8)
    write(mem, rng.standard_normal((L, H, 2, D)).astype(np.float32))
    s0 = mem.slots[0][0].col("s0").copy()
    mem.set_turn(3)
    write(mem, rng.standard_normal((L, H, 1, D)).astype(np.float32))
    mem.set_turn(10)
    np.testing.assert_array_equal(mem.slots[0][0].col("s0")[:2], s0)  # nothing rewritten
    r = mem.search(0, rng.standard_normal((H, 1, D)).astype(np.float32), 3)
    turn_of = np.where(r.ids[0, 0] == 2, 3, 0)
    np.testing.assert_allclose(r.log_strength[0, 0], (10 - turn_of) * math.log(0.8), rtol=1e-6)
    with pytest.raises(ValueError):
        mem.set_turn(9)


def test_later_write_is_stronger():
    mem = make(merge_threshold=NO_MERGE, decay=0.9)
    k = np.ones((L, H, 1, D), np.float32)
    write(mem, k, message_id=1)
    mem.set_turn(4)
    write(mem, k * 1.0001, message_id=2)  # a correction: same key, later
    r = mem.search(0, np.ones((H, 1, D), np.float32), 2)
    mids, _, _ = mem.entry_info(0, 0, r.ids[0, 0])
    by_mid = dict(zip(mids.tolist(), r.log_strength[0, 0].tolist(), strict=True))
    assert by_mid[2] > by_mid[1]


def test_reinforce_adds_attention_and_refreshes():
    mem = make(merge_threshold=NO_MERGE, decay=0.5, reinforce=0.5)
    write(mem, np.random.default_rng(5).standard_normal((L, H, 4, D)).astype(np.float32))
    mem.set_turn(2)  # strength now 0.25
    ids = np.array([1, 1, 3, -1, 99])  # repeats add up; -1 and unknown ids are skipped
    assert mem.reinforce(0, 1, ids, np.array([0.2, 0.3, 0.1, 5.0, 5.0], np.float32)) == 2
    s = mem.slots[0][1]
    np.testing.assert_allclose(s.col("attention"), [0, 0.5, 0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(s.col("s0"), [1, 0.5, 1, 0.3], rtol=1e-6)  # 0.25 + 0.5 * mass
    np.testing.assert_array_equal(s.col("refreshed"), [0, 2, 0, 2])
    assert (mem.slots[0][0].col("attention") == 0).all()
    mem.reinforce(0, 1, np.array([1]), np.array([10.0], np.float32))
    assert s.col("s0")[1] == 1.0  # capped


def test_reinforce_without_refresh_only_counts_attention():
    mem = make(merge_threshold=NO_MERGE, decay=0.5, reinforce=0.0)
    write(mem, np.random.default_rng(6).standard_normal((L, H, 2, D)).astype(np.float32))
    mem.set_turn(3)
    mem.reinforce(2, 0, np.array([0]), np.array([0.7], np.float32))
    s = mem.slots[2][0]
    assert s.col("attention")[0] == np.float32(0.7)
    assert s.col("s0")[0] == 1.0 and s.col("refreshed")[0] == 0


def test_evict_below_floor(rng):
    mem = make(merge_threshold=NO_MERGE, decay=0.5, floor=0.2)
    random_turn(mem, rng, 3, message_id=0)
    mem.set_turn(2)
    random_turn(mem, rng, 2, message_id=1)
    assert mem.evict() == 0  # 0.25 >= 0.2
    mem.set_turn(3)  # turn-0 entries at 0.125
    assert mem.evict() == 3 * (L * H + 1)
    assert mem.entry_count() == 2 * L * H and mem.token_count() == 2
    assert set(mem.message_stats()) == {1}


def test_evict_over_capacity_weakest_first(rng):
    mem = make(merge_threshold=NO_MERGE, decay=0.9, capacity=4, floor=0.0)
    for turn in range(3):  # 2 entries per turn, 6 in all
        mem.set_turn(turn)
        random_turn(mem, rng, 2, message_id=turn)
    mem.reinforce(0, 0, np.array([0]), np.ones(1, np.float32))  # no refresh (reinforce=0)
    assert mem.evict() == 2 * (L * H + 1)
    for store in mem.stores():
        np.testing.assert_array_equal(store.col("id"), [2, 3, 4, 5])  # turn 0 was weakest
    # equal strengths: the oldest goes first
    mem2 = make(merge_threshold=NO_MERGE, capacity=3, floor=0.0)
    random_turn(mem2, rng, 5, message_id=0)
    mem2.evict()
    np.testing.assert_array_equal(mem2.slots[1][1].col("id"), [2, 3, 4])


def test_forget_message_and_all(rng):
    mem = make(merge_threshold=NO_MERGE)
    random_turn(mem, rng, 4, message_id=10)
    random_turn(mem, rng, 3, message_id=11)
    assert mem.forget_message(10) == 4 * (L * H + 1)
    assert mem.entry_count() == 3 * L * H and mem.token_count() == 3
    r = mem.search(0, rng.standard_normal((H, 5, D)).astype(np.float32), 7)
    mids, _, _ = mem.entry_info(0, 0, r.ids[0])
    assert set(mids[r.ids[0] >= 0].tolist()) == {11} and (r.ids[0][:, 3:] == -1).all()
    assert mem.forget_message(10) == 0
    assert mem.forget_all() == 3 * (L * H + 1)
    assert mem.entry_count() == 0 and mem.token_count() == 0
    assert (mem.search(1, np.ones((H, 1, D), np.float32), 2).ids == -1).all()


def test_knn_matches_brute_force(rng):
    mem = make(decay=0.9)
    hidden = rng.standard_normal((50, DM)).astype(np.float32)
    nxt = rng.integers(0, 500, 50)
    mem.write_knn(hidden[:30], nxt[:30], np.arange(30), np.zeros(30, int), np.arange(30))
    mem.set_turn(2)
    mem.write_knn(hidden[30:], nxt[30:], np.arange(20), np.ones(20, int), np.arange(20))
    q = rng.standard_normal((9, DM)).astype(np.float32)
    kr = mem.knn_search(q, 6)
    rows, dist = topk_l2(q, round_f16(hidden), 6)
    np.testing.assert_array_equal(kr.ids, rows)
    np.testing.assert_array_equal(kr.next_token_ids, nxt[rows])
    np.testing.assert_allclose(kr.distances, dist, rtol=1e-4)
    np.testing.assert_allclose(
        kr.log_strength, np.where(rows < 30, 2 * math.log(0.9), 0), atol=1e-6
    )
    assert kr.next_token_ids.dtype == np.int64 and kr.distances.dtype == np.float32
    kr = mem.knn_search(q[:2], 60)
    assert (kr.next_token_ids[:, 50:] == -1).all() and np.isinf(kr.distances[:, 50:]).all()
    assert np.isneginf(kr.log_strength[:, 50:]).all()
    assert mem.token_count() == 50 and mem.entry_count() == 0


def test_entry_info_and_stats(rng):
    mem = make(merge_threshold=NO_MERGE, decay=0.5)
    random_turn(mem, rng, 3, message_id=5)
    mem.set_turn(1)
    random_turn(mem, rng, 2, message_id=6)
    mid, tok, pos = mem.entry_info(1, 1, np.array([[0, 4], [-1, 77]]))
    assert mid.tolist() == [[5, 6], [-1, -1]] and pos.tolist() == [[0, 1], [-1, -1]]
    assert tok.dtype == np.int64 and pos.dtype == np.int32
    mem.reinforce(0, 0, np.array([0, 1]), np.array([0.5, 0.25], np.float32))
    stats = mem.message_stats()
    assert stats[5].entries == 3 * L * H and stats[5].tokens == 3 and stats[5].turn_written == 0
    assert stats[5].mean_strength == pytest.approx(0.5) and stats[6].min_strength == 1.0
    assert stats[5].attention == pytest.approx(0.75) and stats[6].attention == 0
    assert mem.nbytes() > 0


def test_bad_shapes_raise_shape_error():
    mem = make()
    with pytest.raises(ShapeError):
        mem.search(0, np.zeros((H + 1, 2, D), np.float32))
    k2, k3, i2 = np.zeros((L, H, 2, D)), np.zeros((L, H, 3, D)), np.zeros(2, int)
    with pytest.raises(ShapeError):  # values of another length
        mem.write(k2, k3, i2, i2, i2)
    with pytest.raises(ShapeError):  # float token ids
        mem.write(k2, k2, np.zeros(2), i2, i2)
    with pytest.raises(ShapeError):
        mem.knn_search(np.zeros((2, DM + 1), np.float32))
    with pytest.raises(IndexError):
        mem.search(L, np.zeros((H, 1, D), np.float32))
    assert mem.write(np.zeros((L, H, 0, D)), np.zeros((L, H, 0, D)), [], [], []).added == 0


def test_batch_roots_matches_a_plain_loop():
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((20, D))
    x = centers[rng.integers(0, 20, 700)] + 0.08 * rng.standard_normal((700, D))
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    got = batch_roots(unit, 0.98)  # 700 rows: more than one block
    sims = unit @ unit.T
    starts = [not (sims[j, :j] >= 0.98).any() for j in range(700)]
    want = [
        -1 if starts[j] else next((i for i in range(j) if starts[i] and sims[j, i] >= 0.98), -1)
        for j in range(700)
    ]
    assert got.tolist() == want
    assert (got >= 0).sum() > 100  # the case is not trivial


def test_nearest_cosine_matches_brute_force(rng):
    mem = make(merge_threshold=NO_MERGE)
    write(mem, rng.standard_normal((L, H, 300, D)).astype(np.float32) * rng.random((1, 1, 300, 1)))
    slot = mem.slots[1][0]
    q = rng.standard_normal((600, D)).astype(np.float32)  # more than one block of queries
    unit = q / np.linalg.norm(q, axis=1, keepdims=True)
    best, cos = slot.nearest_cosine(unit)
    keys = slot.col("key").astype(np.float64)
    sims = unit @ (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(best, sims.argmax(axis=1))
    np.testing.assert_allclose(cos, sims.max(axis=1), rtol=1e-5, atol=1e-6)


def test_mass_by_entry_sums_repeats_and_drops_missing_ids(rng):
    mem = make(merge_threshold=NO_MERGE)
    write(mem, rng.standard_normal((L, H, 30, D)).astype(np.float32))
    live = mem.slots[1][0].col("id")
    ids = np.concatenate([rng.choice(live, 200), [-1, -1, live.max() + 5]])  # misses, unknown id
    mass = rng.random(len(ids))
    got_ids, got = mem.mass_by_entry(1, 0, ids, mass)
    keep = np.isin(ids, live)
    want_ids, inv = np.unique(ids[keep], return_inverse=True)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got, np.bincount(inv, weights=mass[keep]))
    assert mem.mass_by_entry(1, 0, np.zeros(0, np.int64), np.zeros(0))[0].size == 0


def test_tally_reads_sums_reinforces_and_says_where_entries_came_from(rng):
    mem = make(merge_threshold=NO_MERGE, reinforce=0.5)
    write(mem, rng.standard_normal((L, H, 30, D)).astype(np.float32))
    mem.set_turn(mem.turn + 3)
    live = mem.slots[1][0].col("id")
    ids = np.concatenate([rng.choice(live[:10], 80), [-1, live.max() + 5]])
    mass = rng.random(len(ids)) * 0.01
    got = mem.tally_reads(1, 0, ids, mass, reinforce=True)
    keep = np.isin(ids, live)
    want_ids, inv = np.unique(ids[keep], return_inverse=True)
    np.testing.assert_array_equal(got.ids, want_ids)
    np.testing.assert_allclose(got.mass, np.bincount(inv, weights=mass[keep]))
    msg, tok, pos = mem.entry_info(1, 0, got.ids)
    np.testing.assert_array_equal(got.message_ids, msg)
    np.testing.assert_array_equal(got.token_ids, tok)
    np.testing.assert_array_equal(got.positions, pos)
    # reinforced as `reinforce` would: the read entries were refreshed this turn, the rest not
    refreshed = mem.slots[1][0].col("refreshed")
    read_rows = np.searchsorted(live, got.ids)
    assert (refreshed[read_rows] == mem.turn).all()
    assert (np.delete(refreshed, read_rows) < mem.turn).all()
    # without reinforce nothing changes
    before = mem.slots[1][0].col("s0").copy()
    mem.tally_reads(1, 0, ids, mass)
    np.testing.assert_array_equal(mem.slots[1][0].col("s0"), before)
    with pytest.raises(ShapeError):  # a mass per id, or nothing is summed
        mem.tally_reads(1, 0, ids, mass[:-1])
    with pytest.raises(ShapeError):
        mem.mass_by_entry(1, 0, ids[:3], mass)
