"""Persistence on SQLite and PostgreSQL: bit-exact round trips, incremental saves, transactions."""

from __future__ import annotations

import numpy as np
import pytest
from ms_oracle import assert_same_memory, random_turn, recall, topk_ip
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from memory_store import (
    CorruptMemory,
    MemoryParams,
    SessionMemory,
    SessionNotFound,
    ShapeError,
    StaleMemory,
)
from memory_store import persistence as P
from memory_store.models import ChatSession, KnnChunk, MemoryChunk, MemoryState, MessageState
from memory_store.store import round_f16

L, H, D, DM = 3, 2, 8, 12
PARAMS = MemoryParams(merge_threshold=0.9, decay=0.8, floor=0.1, reinforce=0.3, capacity=60)


def load(engine: Engine, sid: str, params: MemoryParams = PARAMS) -> SessionMemory:
    with Session(engine) as db:
        return P.load_memory(db, sid, L, H, D, DM, params)


def save(engine: Engine, sid: str, mem: SessionMemory) -> None:
    with Session(engine) as db, db.begin():
        P.save_memory(db, sid, mem)


def play_turn(mem: SessionMemory, rng: np.random.Generator, turn: int, base: np.ndarray) -> None:
    """One turn's worth of changes: writes (many merge), reads reinforced, decay, eviction."""
    mem.set_turn(turn)
    random_turn(mem, rng, int(rng.integers(0, 12)), message_id=turn, base=base)
    for layer in range(L):
        r = mem.search(layer, rng.standard_normal((H, 4, D)).astype(np.float32), 3)
        for h in range(H):
            mem.reinforce(layer, h, r.ids[h].ravel(), rng.random(r.ids[h].size).astype(np.float32))
    mem.evict()


def row_counts(engine: Engine) -> tuple[int, ...]:
    with Session(engine) as db:
        return tuple(
            db.scalar(select(func.count()).select_from(m)) or 0
            for m in (MemoryChunk, KnnChunk, MemoryState)
        )


def test_round_trip_is_bit_exact(engine, session_id, rng):
    mem = SessionMemory(L, H, D, DM, PARAMS)
    base = rng.standard_normal((L, H, 6, D)).astype(np.float32)
    for turn in range(1, 5):
        play_turn(mem, rng, turn, base)
    assert mem.entry_count() > 0 and mem.token_count() > 0
    save(engine, session_id, mem)
    again = load(engine, session_id)
    assert_same_memory(mem, again, rng)
    # float32 input comes back as its float16 rounding, exactly
    keys = mem.slots[1][0].col("key")
    np.testing.assert_array_equal(keys, round_f16(keys))


@pytest.mark.parametrize("small_log", [False, True])
def test_incremental_saves_follow_every_change(engine, session_id, rng, monkeypatch, small_log):
    if small_log:  # snapshot often, so the snapshot paths run too
        monkeypatch.setattr(P, "_SNAPSHOT_SLACK", 0)
        monkeypatch.setattr(P, "_MAX_LOG_ROWS", 3)
    mem = SessionMemory(L, H, D, DM, PARAMS)
    base = rng.standard_normal((L, H, 5, D)).astype(np.float32)
    snapshots = set()
    for turn in range(1, 16):
        play_turn(mem, rng, turn, base)
        if turn == 7:
            mem.forget_message(3)
        if turn == 11:
            mem.forget_all()
        save(engine, session_id, mem)
        again = load(engine, session_id)
        assert_same_memory(mem, again, rng)
        assert again.storage.chunk_live == mem.storage.chunk_live
        assert all(v > 0 for v in mem.storage.chunk_live.values())
        snapshots.add(mem.storage.snapshot_seq)
        if turn % 4 == 0:
            mem = again  # go on from the reloaded copy: it must save just as well
    assert bool(snapshots - {-1}) == small_log


def test_a_turn_writes_few_rows(engine, session_id, rng):
    mem = SessionMemory(L, H, D, DM, MemoryParams(merge_threshold=2.0, floor=0.0))
    for turn in range(5):
        mem.set_turn(turn)
        random_turn(mem, rng, 20, message_id=turn)
        save(engine, session_id, mem)
    before = row_counts(engine)
    mem.set_turn(5)
    random_turn(mem, rng, 20, message_id=5)
    mem.reinforce(0, 0, np.arange(50), np.ones(50, np.float32))
    save(engine, session_id, mem)
    after = row_counts(engine)
    assert np.subtract(after, before).tolist() == [L, 1, 1]  # a chunk per layer, kNN, state log
    with Session(engine) as db:
        assert db.scalar(select(ChatSession.memory_seq).where(ChatSession.id == session_id)) == 6


def test_empty_memory_and_forget_all_leave_no_rows(engine, session_id, rng):
    mem = SessionMemory(L, H, D, DM, PARAMS)
    save(engine, session_id, mem)
    assert load(engine, session_id).entry_count() == 0
    random_turn(mem, rng, 5, message_id=1)
    save(engine, session_id, mem)
    assert row_counts(engine)[:2] == (L, 1)
    mem.forget_all()
    save(engine, session_id, mem)
    assert row_counts(engine) == (0, 0, 0)
    assert_same_memory(mem, load(engine, session_id), rng)


def test_rollback_leaves_the_stored_memory_as_it_was(engine, session_id, rng):
    mem = SessionMemory(L, H, D, DM, PARAMS)
    base = rng.standard_normal((L, H, 5, D)).astype(np.float32)
    for turn in (1, 2):
        play_turn(mem, rng, turn, base)
    save(engine, session_id, mem)
    committed = load(engine, session_id)
    play_turn(mem, rng, 3, base)
    mem.forget_message(1)
    with pytest.raises(RuntimeError), Session(engine) as db, db.begin():
        P.save_memory(db, session_id, mem)
        db.execute(update(ChatSession).where(ChatSession.id == session_id).values(turn=3))
        raise RuntimeError("the turn failed after the memory was saved")
    after = load(engine, session_id)
    assert_same_memory(committed, after, rng)
    # the object ran ahead of the database: saving it again must not write a partial history
    with pytest.raises(StaleMemory):
        save(engine, session_id, mem)
    play_turn(after, rng, 3, base)  # the reloaded copy carries on normally
    save(engine, session_id, after)
    assert_same_memory(after, load(engine, session_id), rng)


def test_two_writers_cannot_both_save(engine, session_id, rng):
    a = load(engine, session_id)
    b = load(engine, session_id)
    random_turn(a, rng, 3, message_id=1)
    random_turn(b, rng, 3, message_id=2)
    save(engine, session_id, a)
    with pytest.raises(StaleMemory):
        save(engine, session_id, b)


def test_missing_session_shape_mismatch_and_corruption(engine, session_id, rng):
    mem = SessionMemory(L, H, D, DM, PARAMS)
    with pytest.raises(SessionNotFound):
        save(engine, "nope", mem)
    with pytest.raises(SessionNotFound):
        load(engine, "nope")
    random_turn(mem, rng, 4, message_id=1)
    save(engine, session_id, mem)
    with Session(engine) as db, pytest.raises(ShapeError):
        P.load_memory(db, session_id, L, H, D + 1, DM)
    with pytest.raises(ShapeError):
        save(engine, session_id, SessionMemory(L + 1, H, D, DM))
    with Session(engine) as db, db.begin():
        db.execute(update(MemoryChunk).where(MemoryChunk.layer == 1).values(keys=b"\x00" * 10))
    with pytest.raises(CorruptMemory, match="memory_chunks"):
        load(engine, session_id)


def test_delete_memory(engine, session_id, rng):
    mem = SessionMemory(L, H, D, DM, PARAMS)
    random_turn(mem, rng, 4, message_id=1)
    save(engine, session_id, mem)
    with Session(engine) as db, db.begin():
        P.delete_memory(db, session_id)
    assert row_counts(engine) == (0, 0, 0)
    with pytest.raises(StaleMemory):  # the cached copy is no longer what is stored
        save(engine, session_id, mem)
    fresh = load(engine, session_id)
    assert fresh.entry_count() == 0 and fresh.next_id == mem.next_id  # ids are never reused
    random_turn(fresh, rng, 2, message_id=2)
    save(engine, session_id, fresh)
    assert_same_memory(fresh, load(engine, session_id), rng)
    with Session(engine) as db, pytest.raises(SessionNotFound):
        P.delete_memory(db, "nope")


@pytest.mark.parametrize("approx", ["ivf", "hnsw"])
def test_approximate_slots_reload_exact_entries(engine, session_id, rng, approx):
    params = MemoryParams(merge_threshold=2.0, exact_max=40, hnsw_m=16, approx_index=approx)
    mem = SessionMemory(L, H, D, DM, params)
    random_turn(mem, rng, 200, message_id=1)
    save(engine, session_id, mem)
    again = load(engine, session_id, params)
    for a, b in zip(mem.stores(), again.stores(), strict=True):
        for name in ("id", "key", "value", "s0", "refreshed"):
            if name in a.table.schema:
                np.testing.assert_array_equal(a.col(name), b.col(name))
    q = rng.standard_normal((H, 30, D)).astype(np.float32)
    r = again.search(0, q, 5)
    assert again.slots[0][0].index.kind == approx
    for h in range(H):
        truth = topk_ip(q[h], again.slots[0][h].col("key"), 5)[0]
        assert recall(r.ids[h], truth) >= 0.9  # ids = rows here: one write, no merges


def test_message_states_round_trip(engine, session_id, rng):
    keys = rng.standard_normal((L, H, 5, D)).astype(np.float32)
    values = rng.standard_normal((L, H, 5, D)).astype(np.float32)
    hidden = rng.standard_normal((5, DM)).astype(np.float32)
    tok = rng.integers(0, 1000, 5)
    with Session(engine) as db, db.begin():
        P.save_message_state(db, session_id, 0, keys, values, hidden, tok)
        P.save_message_state(db, session_id, 1, keys[:, :, :2], values[:, :, :2], None, tok[:2])
        P.save_message_state(db, session_id, 1, keys[:, :, :3], values[:, :, :3], None, tok[:3])
    with Session(engine) as db:
        states = P.load_message_states(db, session_id)
    assert sorted(states) == [0, 1]
    s = states[0]
    assert s.keys.dtype == np.float16 and s.keys.shape == (L, H, 5, D)
    np.testing.assert_array_equal(s.keys, keys.astype(np.float16))
    np.testing.assert_array_equal(s.values, values.astype(np.float16))
    np.testing.assert_array_equal(s.hidden, hidden.astype(np.float16))
    np.testing.assert_array_equal(s.token_ids, tok)
    assert states[1].hidden is None and states[1].keys.shape == (L, H, 3, D)  # replaced
    with Session(engine) as db, db.begin():
        P.delete_message_state(db, session_id, 0)
    with Session(engine) as db:
        assert sorted(P.load_message_states(db, session_id)) == [1]
    with pytest.raises(ShapeError), Session(engine) as db:
        P.save_message_state(db, session_id, 2, keys, values[:, :, :2], None, tok)


def test_deleting_the_session_cascades(engine, session_id, rng):
    mem = SessionMemory(L, H, D, DM, PARAMS)
    random_turn(mem, rng, 3, message_id=1)
    save(engine, session_id, mem)
    with Session(engine) as db, db.begin():
        k = np.zeros((L, H, 1, D), np.float32)
        P.save_message_state(db, session_id, 1, k, k, None, np.zeros(1, int))
    with Session(engine) as db, db.begin():
        db.execute(delete(ChatSession).where(ChatSession.id == session_id))
    assert row_counts(engine) == (0, 0, 0)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(MessageState)) == 0
