"""Save and load a `SessionMemory` through SQLAlchemy (SQLite and PostgreSQL).

Layout (tables in `memory_store.models`): entries are written in *chunks*, one row per (session,
save, layer) holding every entry of that layer the save had to write, all KV heads together, as
fp16 / int blobs; the kNN-LM store has one chunk row per save. Small per-entry state (s0, refreshed
turn, attention) that changes without the payload goes to a per-save *log* row in
``memory_states``, with the ids of stored entries that were removed. So a turn that adds ~100
tokens writes ~L + 2 rows, however large the memory is.

Rules a save follows (``seq`` numbers the saves of a session; ChatSession.memory_seq holds the
last):

- an entry is written to this save's chunk when it is new, merged (payload changed), or when the
  chunk that holds its current payload has become mostly dead (fewer than half its records
  current): that chunk is then deleted and its current records move. A chunk with no current record
  is deleted. Chunk rows are never updated.
- an entry whose state alone changed gets a state record in the save's log row; a stored entry that
  was removed gets a drop record there.
- when the log since the last snapshot outgrows what a snapshot of all live states would take (or
  has too many rows), the save writes a *snapshot* instead of its log row: the state of every live
  entry, one row per layer plus one for the kNN store, and deletes all older state rows.

Load replays this: for each entry the chunk record of the highest seq gives the payload; a record
in a chunk at or before the snapshot is live only if the snapshot lists its entry; drop records
after the snapshot remove entries; the newest of (chunk record, snapshot, log) gives the state.
Entries are sorted by id, which is the order they had in memory, so the rebuilt exact indexes
answer bit-for-bit the same (IVF lists and HNSW graphs are rebuilt, so approximate reads agree
only up to their recall).

Transactions: `save_memory` flushes and never commits. It first moves ChatSession.memory_seq from
the memory's last save to the next with a conditional UPDATE; if the database does not hold the
save the object expects (an earlier save was rolled back, or another writer saved), it raises
`StaleMemory`: after a failed turn, reload the memory with `load_memory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from sqlalchemy import Engine, Table, delete, event, insert, select, update
from sqlalchemy.orm import Session

from .errors import CorruptMemory, SessionNotFound, ShapeError, StaleMemory
from .models import Base, ChatSession, KnnChunk, MemoryChunk, MemoryState, MessageState
from .params import MemoryParams
from .store import EntryStore, SessionMemory

_STATE_BYTES = (
    22  # one state record: slot int16 + id int64 + s0 f32 + refreshed i32 + attention f32
)
_DROP_BYTES = 10  # one drop record: slot int16 + id int64
_SNAPSHOT_SLACK = 1 << 16  # log bytes allowed beyond a snapshot's size before snapshotting
_MAX_LOG_ROWS = 200  # bounds the rows a load reads
_KNN = -1  # slot code and chunk layer of the kNN store
Group = tuple[int, list[tuple[int, EntryStore]]]  # (chunk layer, [(slot code, store), ...])

# blob dtypes (explicitly little-endian, so files move between machines)
_F16, _F32, _I8, _I16, _I32, _I64 = (np.dtype(t) for t in ("<f2", "<f4", "i1", "<i2", "<i4", "<i8"))


def _table(model: type[Base]) -> Table:
    """The Core table of a model (Core statements skip the ORM unit of work for bulk rows)."""
    return cast(Table, model.__table__)


# --- blobs ---------------------------------------------------------------------------------------


def _blob(x: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(x, dtype=dtype).tobytes()


def _arr(
    blob: bytes | memoryview | None, dtype: np.dtype, shape: tuple[int, ...], what: str
) -> np.ndarray:
    """Decode a blob of `shape`; a size mismatch raises CorruptMemory."""
    buf = b"" if blob is None else blob
    n = int(np.prod(shape))
    if len(buf) != n * dtype.itemsize:
        raise CorruptMemory(f"{what}: {len(buf)} bytes, expected {n} x {dtype} for shape {shape}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


# --- chunk refs ----------------------------------------------------------------------------------


def chunk_ref(seq: int, layer: int) -> int:
    """Integer naming the chunk row (seq, layer); layer -1 is the kNN store."""
    return (seq << 16) | (layer + 1)


def _ref_layer(ref: int) -> int:
    return (ref & 0xFFFF) - 1


def _ref_seq(ref: int) -> int:
    return ref >> 16


# --- engine / schema -----------------------------------------------------------------------------


def create_schema(engine: Engine) -> None:
    """Create every table (Alembic migrations come later)."""
    Base.metadata.create_all(engine)


def configure_engine(engine: Engine) -> Engine:
    """Turn on SQLite's foreign keys (off by default) so deleting a session cascades; no-op
    on other databases."""
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _fk_on(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


# --- save ----------------------------------------------------------------------------------------


def _claim(db: Session, session_id: str, mem: SessionMemory, seq: int) -> None:
    """Move ChatSession.memory_seq from the memory's last save to `seq`, or raise."""
    row = db.execute(
        select(ChatSession.memory_seq, ChatSession.memory_shape).where(ChatSession.id == session_id)
    ).one_or_none()
    if row is None:
        raise SessionNotFound(f"no chat session {session_id!r}")
    if row.memory_shape is not None and list(row.memory_shape) != list(mem.shape):
        raise ShapeError(
            f"session {session_id} stores a memory of shape {row.memory_shape},"
            f" not {list(mem.shape)}"
        )
    held = mem.storage.seq
    res = db.execute(
        update(_table(ChatSession))
        .where(_table(ChatSession).c.id == session_id, _table(ChatSession).c.memory_seq == held)
        .values(
            memory_seq=seq,
            memory_turn=mem.turn,
            memory_next_id=mem.next_id,
            memory_next_knn_id=mem.next_knn_id,
            memory_shape=list(mem.shape),
        )
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise StaleMemory(
            f"session {session_id}: the database holds memory save {row.memory_seq},"
            f" this object expects {held};"
            " reload it with load_memory"
        )


def _decrement(live: dict[int, int], refs: np.ndarray) -> None:
    uniq, counts = np.unique(refs, return_counts=True)
    for r, c in zip(uniq.tolist(), counts.tolist(), strict=True):
        live[r] -= c
        if live[r] < 0:
            raise CorruptMemory(f"chunk {r}: more records left it than it held")


def _layer_stores(mem: SessionMemory) -> list[Group]:
    """[(chunk layer, [(slot code, store), ...])]: each layer's heads, then the kNN store."""
    H = mem.n_kv_heads
    out: list[Group] = [
        (layer, [(layer * H + h, mem.slots[layer][h]) for h in range(H)])
        for layer in range(mem.n_layers)
    ]
    out.append((_KNN, [(_KNN, mem.knn)]))
    return out


def _chunk_row(
    session_id: str, seq: int, layer: int, parts: list[tuple[int, EntryStore, np.ndarray]]
) -> dict[str, Any]:
    """Insert parameters of one chunk row from (head, store, rows) parts."""

    def cat(name: str) -> np.ndarray:
        return np.concatenate([s.col(name)[m] for _, s, m in parts])

    n = sum(len(m) for _, _, m in parts)
    common = {
        "session_id": session_id,
        "seq": seq,
        "n": n,
        "entry_ids": _blob(cat("id"), _I64),
        "message_ids": _blob(cat("message_id"), _I64),
        "token_ids": _blob(cat("token_id"), _I64),
        "positions": _blob(cat("position"), _I32),
        "turn_written": _blob(cat("turn_written"), _I32),
        "s0": _blob(cat("s0"), _F32),
        "refreshed": _blob(cat("refreshed"), _I32),
    }
    if layer == _KNN:
        return common | {
            "hidden": _blob(cat("hidden"), _F16),
            "next_token_ids": _blob(cat("next_token_id"), _I64),
        }
    heads = np.concatenate([np.full(len(m), h, _I8) for h, _, m in parts])
    return common | {
        "layer": layer,
        "heads": _blob(heads, _I8),
        "keys": _blob(cat("key"), _F16),
        "values": _blob(cat("value"), _F16),
        "attention": _blob(cat("attention"), _F32),
    }


def _state_row(
    session_id: str,
    seq: int,
    part: int,
    kind: str,
    recs: list[tuple[int, EntryStore, np.ndarray]],
    drops: list[tuple[int, np.ndarray]],
) -> dict[str, Any]:
    """Insert parameters of a memory_states row from (slot code, store, rows) records and
    (slot code, ids) drops."""

    def cat(name: str, dtype: np.dtype) -> bytes:
        return _blob(
            np.concatenate([s.col(name)[m] for _, s, m in recs] or [np.zeros(0, dtype)]), dtype
        )

    slots = np.concatenate([np.full(len(m), c, _I16) for c, _, m in recs] or [np.zeros(0, _I16)])
    drop_slots = np.concatenate([np.full(len(i), c, _I16) for c, i in drops] or [np.zeros(0, _I16)])
    drop_ids = np.concatenate([i for _, i in drops] or [np.zeros(0, _I64)])
    return {
        "session_id": session_id,
        "seq": seq,
        "part": part,
        "kind": kind,
        "n": len(slots),
        "slots": _blob(slots, _I16),
        "entry_ids": cat("id", _I64),
        "s0": cat("s0", _F32),
        "refreshed": cat("refreshed", _I32),
        "attention": cat("attention", _F32),
        "n_drop": len(drop_ids),
        "drop_slots": _blob(drop_slots, _I16),
        "drop_ids": _blob(drop_ids, _I64),
    }


def save_memory(db: Session, session_id: str, mem: SessionMemory) -> None:
    """Write what changed in `mem` since its last save or load; flush, never commit.

    Raises SessionNotFound (no session row), StaleMemory (the database does not hold the save this
    object continues: reload it), ShapeError (the session stores a memory of other dimensions).
    """
    db.flush()
    st = mem.storage
    seq = st.seq + 1
    _claim(db, session_id, mem, seq)
    groups = _layer_stores(mem)
    chunk_n, chunk_live = dict(st.chunk_n), dict(st.chunk_live)
    drops = _release_chunks(groups, chunk_live)
    # dead chunks go; mostly-dead ones go too and their current records are written again
    gone = [r for r, live in chunk_live.items() if 2 * live < chunk_n[r]]
    moving = {r for r in gone if chunk_live[r] > 0}
    for r in gone:
        del chunk_n[r], chunk_live[r]
    chunk_rows, new_refs, state_recs = _plan_chunks(session_id, seq, mem, groups, moving)
    for ref, (_, n) in new_refs.items():
        chunk_n[ref] = chunk_live[ref] = n

    live_total = sum(len(s) for _, members in groups for _, s in members)
    n_state = sum(len(m) for _, _, m in state_recs)
    n_drop = sum(len(i) for _, i in drops)
    log_bytes = st.log_bytes + n_state * _STATE_BYTES + n_drop * _DROP_BYTES
    # a snapshot of every live state once the log since the last one has grown past its size
    snapshot = (n_state + n_drop) > 0 and (
        log_bytes > live_total * _STATE_BYTES + _SNAPSHOT_SLACK or st.log_rows + 1 > _MAX_LOG_ROWS
    )
    if live_total == 0:  # nothing live: nothing stored is needed
        for model in (MemoryChunk, KnnChunk, MemoryState):
            db.execute(delete(_table(model)).where(_table(model).c.session_id == session_id))
        chunk_n, chunk_live, gone, snapshot = {}, {}, [], False
    _delete_chunks(db, session_id, gone)
    for model, rows in ((MemoryChunk, chunk_rows[0]), (KnnChunk, chunk_rows[_KNN])):
        if rows:
            db.execute(insert(_table(model)), rows)
    if snapshot:
        _write_snapshot(db, session_id, seq, groups)
    elif live_total and (n_state or n_drop):
        row = _state_row(session_id, seq, 0, "log", state_recs, drops)
        db.execute(insert(_table(MemoryState)), [row])
    db.flush()

    # the database now holds save `seq`: bring the bookkeeping along
    for ref, (parts, _) in new_refs.items():
        for s, rows_idx in parts:
            s.col("ref")[rows_idx] = ref
    for _, members in groups:
        for _, s in members:
            s.col("put")[:] = False
            s.col("state")[:] = False
            s.dropped.clear()
    st.seq, st.chunk_n, st.chunk_live = seq, chunk_n, chunk_live
    if live_total == 0 or snapshot:
        st.snapshot_seq = seq if snapshot else -1
        st.log_bytes, st.log_rows = 0, 0
    elif n_state or n_drop:
        st.log_bytes, st.log_rows = log_bytes, st.log_rows + 1


def _release_chunks(
    groups: list[Group], chunk_live: dict[int, int]
) -> list[tuple[int, np.ndarray]]:
    """Count out of `chunk_live` the records that stop being current (payloads written again,
    stored entries removed); return the drop records (slot code, ids)."""
    leaving, drops = [], []
    for _, members in groups:
        for code, s in members:
            ref = s.col("ref")
            leaving.append(ref[s.col("put") & (ref >= 0)])
            for ids, refs in s.dropped:
                leaving.append(refs)
                drops.append((code, ids))
    _decrement(chunk_live, np.concatenate(leaving))
    return drops


def _plan_chunks(
    session_id: str, seq: int, mem: SessionMemory, groups: list[Group], moving: set[int]
) -> tuple[
    dict[int, list[dict[str, Any]]],
    dict[int, tuple[list[tuple[EntryStore, np.ndarray]], int]],
    list[tuple[int, EntryStore, np.ndarray]],
]:
    """This save's chunk rows (memory layers under key 0, kNN under -1), the new chunk refs with
    the (store, rows) they hold and their size, and the state-only records (code, store, rows)."""
    moving_by_layer: dict[int, list[int]] = {}
    for r in moving:
        moving_by_layer.setdefault(_ref_layer(r), []).append(r)
    chunk_rows: dict[int, list[dict[str, Any]]] = {0: [], _KNN: []}
    new_refs: dict[int, tuple[list[tuple[EntryStore, np.ndarray]], int]] = {}
    state_recs = []
    for layer, members in groups:
        parts = []
        for code, s in members:
            put = s.col("put").copy()
            if layer in moving_by_layer:
                put |= np.isin(s.col("ref"), moving_by_layer[layer])
            head = code - layer * mem.n_kv_heads if layer != _KNN else 0
            parts.append((head, s, np.flatnonzero(put)))
            state_only = s.col("state") & ~put & (s.col("ref") >= 0)
            state_recs.append((code, s, np.flatnonzero(state_only)))
        n = sum(len(m) for _, _, m in parts)
        if n:
            chunk_rows[0 if layer != _KNN else _KNN].append(
                _chunk_row(session_id, seq, layer, parts)
            )
            new_refs[chunk_ref(seq, layer)] = ([(s, m) for _, s, m in parts], n)
    return chunk_rows, new_refs, state_recs


def _write_snapshot(db: Session, session_id: str, seq: int, groups: list[Group]) -> None:
    """Replace every state row of the session by the state of every live entry."""
    t = _table(MemoryState)
    db.execute(delete(t).where(t.c.session_id == session_id))
    rows = [
        _state_row(
            session_id, seq, i, "snapshot", [(c, s, np.arange(len(s))) for c, s in members], []
        )
        for i, (_, members) in enumerate(groups)
    ]
    db.execute(insert(t), rows)


def _delete_chunks(db: Session, session_id: str, refs: list[int]) -> None:
    by_layer: dict[int, list[int]] = {}
    for r in refs:
        by_layer.setdefault(_ref_layer(r), []).append(_ref_seq(r))
    for layer, seqs in by_layer.items():
        if layer == _KNN:
            t = _table(KnnChunk)
            db.execute(delete(t).where(t.c.session_id == session_id, t.c.seq.in_(seqs)))
        else:
            t = _table(MemoryChunk)
            db.execute(
                delete(t).where(t.c.session_id == session_id, t.c.layer == layer, t.c.seq.in_(seqs))
            )


# --- load ----------------------------------------------------------------------------------------


@dataclass
class _States:
    """State records of one slot: ids, seq, s0, refreshed, attention."""

    ids: list[np.ndarray]
    seq: list[np.ndarray]
    s0: list[np.ndarray]
    refreshed: list[np.ndarray]
    attention: list[np.ndarray]

    @classmethod
    def empty(cls) -> _States:
        return cls([], [], [], [], [])


def _read_states(
    db: Session, session_id: str, mem: SessionMemory
) -> tuple[dict[int, _States], dict[int, list[np.ndarray]], int]:
    """(state records by slot code, dropped ids by slot code, snapshot seq); sets the log
    bookkeeping of `mem.storage`."""
    t = _table(MemoryState)
    rows = db.execute(
        select(t).where(t.c.session_id == session_id).order_by(t.c.seq, t.c.part)
    ).all()
    snap_seq = max((r.seq for r in rows if r.kind == "snapshot"), default=-1)
    states: dict[int, _States] = {}
    drops: dict[int, list[np.ndarray]] = {}
    st = mem.storage
    st.snapshot_seq = snap_seq
    for r in rows:
        if r.kind not in ("log", "snapshot"):
            raise CorruptMemory(f"memory_states row ({r.seq}, {r.part}): unknown kind {r.kind!r}")
        if r.seq < snap_seq or (r.kind == "log" and r.seq == snap_seq):
            continue  # superseded by the snapshot
        what = f"memory_states ({session_id}, {r.seq}, {r.part})"
        slots = _arr(r.slots, _I16, (r.n,), what)
        cols = (
            _arr(r.entry_ids, _I64, (r.n,), what),
            _arr(r.s0, _F32, (r.n,), what),
            _arr(r.refreshed, _I32, (r.n,), what),
            _arr(r.attention, _F32, (r.n,), what),
        )
        for code in np.unique(slots).tolist():
            m = slots == code
            rec = states.setdefault(code, _States.empty())
            rec.ids.append(cols[0][m])
            rec.seq.append(np.full(int(m.sum()), r.seq, np.int64))
            rec.s0.append(cols[1][m])
            rec.refreshed.append(cols[2][m])
            rec.attention.append(cols[3][m])
        dslots = _arr(r.drop_slots, _I16, (r.n_drop,), what)
        dids = _arr(r.drop_ids, _I64, (r.n_drop,), what)
        for code in np.unique(dslots).tolist():
            drops.setdefault(code, []).append(dids[dslots == code])
        if r.kind == "log":
            st.log_rows += 1
            st.log_bytes += r.n * _STATE_BYTES + r.n_drop * _DROP_BYTES
    return states, drops, snap_seq


def _last_per_id(ids: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Indices of the highest-seq record of each id, in ascending id order."""
    order = np.lexsort((seq, ids))
    sid = ids[order]
    last = np.ones(len(sid), dtype=bool)
    last[:-1] = sid[1:] != sid[:-1]
    return order[last]


def _assemble(
    store: EntryStore,
    recs: dict[str, list[np.ndarray]],
    states: _States | None,
    dropped: list[np.ndarray],
    snap_seq: int,
    layer: int,
    what: str,
) -> None:
    """Rebuild one store from its chunk records, state records and drops."""
    gone = np.concatenate(dropped) if dropped else np.zeros(0, np.int64)
    in_snap = np.zeros(0, np.int64)
    if states is not None and states.ids:
        sids, sseq = np.concatenate(states.ids), np.concatenate(states.seq)
        in_snap = sids[sseq == snap_seq]
    # every entry the snapshot lists, unless dropped since, must have a payload somewhere
    chunk_ids = np.concatenate(recs["id"]) if recs["id"] else np.zeros(0, np.int64)
    if not np.isin(in_snap[~np.isin(in_snap, gone)], chunk_ids).all():
        raise CorruptMemory(f"{what}: the state snapshot lists entries no chunk holds")
    if not recs["id"]:
        return
    cols = {name: np.concatenate(parts) for name, parts in recs.items()}
    pick = _last_per_id(cols["id"], cols["seq"])
    cols = {name: x[pick] for name, x in cols.items()}
    ids, cseq = cols["id"], cols["seq"]
    live = ((cseq > snap_seq) | np.isin(ids, in_snap)) & ~np.isin(ids, gone)
    cols = {name: x[live] for name, x in cols.items()}
    ids, cseq = cols["id"], cols["seq"]
    if states is not None and states.ids:
        sids, sseq = np.concatenate(states.ids), np.concatenate(states.seq)
        keep = np.isin(sids, ids)
        lst = _last_per_id(sids[keep], sseq[keep])
        sel = np.flatnonzero(keep)[lst]
        rows = np.searchsorted(ids, sids[sel])
        newer = sseq[sel] > cseq[rows]
        rows, sel = rows[newer], sel[newer]
        for name, parts in (
            ("s0", states.s0),
            ("refreshed", states.refreshed),
            ("attention", states.attention),
        ):
            if name in cols:
                cols[name][rows] = np.concatenate(parts)[sel]
    n = len(ids)
    cols["ref"] = (cseq << 16) | (layer + 1)  # chunk_ref, vectorized
    cols["put"] = np.zeros(n, bool)
    cols["state"] = np.zeros(n, bool)
    if "key" in cols:
        cols["knorm"] = np.linalg.norm(cols["key"].astype(np.float32), axis=1).astype(np.float32)
    else:
        cols["attention"] = np.zeros(n, np.float32)
    del cols["seq"]
    store.load_rows(cols)


def load_memory(
    db: Session,
    session_id: str,
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    hidden_dim: int,
    params: MemoryParams | None = None,
) -> SessionMemory:
    """Rebuild a session's memory from SQL (indexes are built lazily at the first search).

    Raises SessionNotFound, ShapeError (stored dimensions differ), CorruptMemory (undecodable rows).
    """
    row = db.execute(
        select(_table(ChatSession)).where(_table(ChatSession).c.id == session_id)
    ).one_or_none()
    if row is None:
        raise SessionNotFound(f"no chat session {session_id!r}")
    shape = [n_layers, n_kv_heads, head_dim, hidden_dim]
    if row.memory_shape is not None and list(row.memory_shape) != shape:
        raise ShapeError(
            f"session {session_id} stores a memory of shape {row.memory_shape}, not {shape}"
        )
    mem = SessionMemory(n_layers, n_kv_heads, head_dim, hidden_dim, params)
    mem.turn, mem.next_id, mem.next_knn_id = (
        row.memory_turn,
        row.memory_next_id,
        row.memory_next_knn_id,
    )
    mem.storage.seq = row.memory_seq
    states, drops, snap_seq = _read_states(db, session_id, mem)
    L, H, D, Dm = n_layers, n_kv_heads, head_dim, hidden_dim

    names = (
        "id",
        "seq",
        "message_id",
        "token_id",
        "position",
        "turn_written",
        "s0",
        "refreshed",
        "attention",
        "key",
        "value",
    )
    recs: list[dict[str, list[np.ndarray]]] = [{k: [] for k in names} for _ in range(L * H)]
    t = _table(MemoryChunk)
    for r in db.execute(select(t).where(t.c.session_id == session_id).order_by(t.c.seq, t.c.layer)):
        what = f"memory_chunks ({session_id}, {r.seq}, {r.layer})"
        if not 0 <= r.layer < L:
            raise CorruptMemory(f"{what}: layer out of range")
        n = r.n
        heads = _arr(r.heads, _I8, (n,), what)
        if n and (heads.min() < 0 or heads.max() >= H):
            raise CorruptMemory(f"{what}: head out of range")
        arrays = {
            "id": _arr(r.entry_ids, _I64, (n,), what),
            "message_id": _arr(r.message_ids, _I64, (n,), what),
            "token_id": _arr(r.token_ids, _I64, (n,), what),
            "position": _arr(r.positions, _I32, (n,), what),
            "turn_written": _arr(r.turn_written, _I32, (n,), what),
            "s0": _arr(r.s0, _F32, (n,), what),
            "refreshed": _arr(r.refreshed, _I32, (n,), what),
            "attention": _arr(r.attention, _F32, (n,), what),
            "key": _arr(r.keys, _F16, (n, D), what),
            "value": _arr(r.values, _F16, (n, D), what),
            "seq": np.full(n, r.seq, np.int64),
        }
        mem.storage.chunk_n[chunk_ref(r.seq, r.layer)] = n
        for h in np.unique(heads).tolist():
            m = heads == h
            for name, x in arrays.items():
                recs[r.layer * H + h][name].append(x[m])

    knames = (
        "id",
        "seq",
        "message_id",
        "token_id",
        "position",
        "turn_written",
        "s0",
        "refreshed",
        "hidden",
        "next_token_id",
    )
    krecs: dict[str, list[np.ndarray]] = {k: [] for k in knames}
    t = _table(KnnChunk)
    for r in db.execute(select(t).where(t.c.session_id == session_id).order_by(t.c.seq)):
        what = f"knn_chunks ({session_id}, {r.seq})"
        n = r.n
        arrays = {
            "id": _arr(r.entry_ids, _I64, (n,), what),
            "message_id": _arr(r.message_ids, _I64, (n,), what),
            "token_id": _arr(r.token_ids, _I64, (n,), what),
            "position": _arr(r.positions, _I32, (n,), what),
            "turn_written": _arr(r.turn_written, _I32, (n,), what),
            "s0": _arr(r.s0, _F32, (n,), what),
            "refreshed": _arr(r.refreshed, _I32, (n,), what),
            "hidden": _arr(r.hidden, _F16, (n, Dm), what),
            "next_token_id": _arr(r.next_token_ids, _I64, (n,), what),
            "seq": np.full(n, r.seq, np.int64),
        }
        mem.storage.chunk_n[chunk_ref(r.seq, _KNN)] = n
        for name, x in arrays.items():
            krecs[name].append(x)

    for layer in range(L):
        for h in range(H):
            code = layer * H + h
            _assemble(
                mem.slots[layer][h],
                recs[code],
                states.get(code),
                drops.get(code, []),
                snap_seq,
                layer,
                f"session {session_id} slot ({layer}, {h})",
            )
    _assemble(
        mem.knn,
        krecs,
        states.get(_KNN),
        drops.get(_KNN, []),
        snap_seq,
        _KNN,
        f"session {session_id} kNN store",
    )

    live = {r: 0 for r in mem.storage.chunk_n}
    for s in mem.stores():
        uniq, counts = np.unique(s.col("ref"), return_counts=True)
        for r, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            live[r] += c
    mem.storage.chunk_live = live
    return mem


def delete_memory(db: Session, session_id: str) -> None:
    """Delete a session's stored memory (entries, states; not message states). Flushes, no commit.

    Bumps ChatSession.memory_seq, so an in-memory copy can no longer be saved (StaleMemory): get the
    now empty memory with `load_memory`.
    """
    db.flush()
    sess = _table(ChatSession)
    res = db.execute(
        update(sess)
        .where(sess.c.id == session_id)
        .values(memory_seq=sess.c.memory_seq + 1, memory_shape=None)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise SessionNotFound(f"no chat session {session_id!r}")
    for model in (MemoryChunk, KnnChunk, MemoryState):
        t = _table(model)
        db.execute(delete(t).where(t.c.session_id == session_id))
    db.flush()


# --- message states ------------------------------------------------------------------------------


@dataclass
class MessageStateArrays:
    """Captured states of one message still in the window (float16 as stored)."""

    keys: np.ndarray  # float16 [L, H, T, D], pre-RoPE
    values: np.ndarray  # float16 [L, H, T, D]
    hidden: np.ndarray | None  # float16 [T, Dm], or None if not stored
    token_ids: np.ndarray  # int64 [T]


def save_message_state(
    db: Session,
    session_id: str,
    message_id: int,
    keys: np.ndarray,
    values: np.ndarray,
    hidden: np.ndarray | None,
    token_ids: np.ndarray,
) -> None:
    """Store (replace) a message's captured keys/values [L, H, T, D], hidden [T, Dm] (or None) and
    token ids [T]; float arrays are stored as fp16. Flushes, never commits."""
    keys, values, token_ids = np.asarray(keys), np.asarray(values), np.asarray(token_ids)
    if keys.ndim != 4 or values.shape != keys.shape or token_ids.shape != (keys.shape[2],):
        raise ShapeError(
            f"message state: keys {keys.shape}, values {values.shape}, token_ids {token_ids.shape}"
        )
    L, H, T, D = keys.shape
    if hidden is not None:
        hidden = np.asarray(hidden)
        if hidden.ndim != 2 or hidden.shape[0] != T:
            raise ShapeError(f"message state: hidden {hidden.shape} for {T} tokens")
    db.flush()
    t = _table(MessageState)
    db.execute(delete(t).where(t.c.session_id == session_id, t.c.message_id == int(message_id)))
    db.execute(
        insert(t),
        [
            {
                "message_id": int(message_id),
                "session_id": session_id,
                "n_tokens": T,
                "n_layers": L,
                "n_kv_heads": H,
                "head_dim": D,
                "hidden_dim": 0 if hidden is None else hidden.shape[1],
                "token_ids": _blob(token_ids, _I64),
                "keys": _blob(keys, _F16),
                "values": _blob(values, _F16),
                "hidden": None if hidden is None else _blob(hidden, _F16),
            }
        ],
    )
    db.flush()


def load_message_states(db: Session, session_id: str) -> dict[int, MessageStateArrays]:
    """Captured states of the session's messages by message id (CorruptMemory on bad sizes)."""
    t = _table(MessageState)
    out: dict[int, MessageStateArrays] = {}
    for r in db.execute(select(t).where(t.c.session_id == session_id).order_by(t.c.message_id)):
        what = f"message_states {r.message_id}"
        shape = (r.n_layers, r.n_kv_heads, r.n_tokens, r.head_dim)
        hidden = (
            None
            if r.hidden is None
            else _arr(r.hidden, _F16, (r.n_tokens, r.hidden_dim), what).copy()
        )
        out[r.message_id] = MessageStateArrays(
            keys=_arr(r.keys, _F16, shape, what).copy(),
            values=_arr(r.values, _F16, shape, what).copy(),
            hidden=hidden,
            token_ids=_arr(r.token_ids, _I64, (r.n_tokens,), what).copy(),
        )
    return out


def delete_message_state(db: Session, session_id: str, message_id: int) -> None:
    """Delete a message's captured states (it left the window). Flushes, never commits."""
    t = _table(MessageState)
    db.execute(delete(t).where(t.c.session_id == session_id, t.c.message_id == int(message_id)))
    db.flush()
