"""Deletion: after deleting a session, or forgetting a message's memory (or all of it), nothing of
it remains: no row in any table, no FAISS index entry, no tensor or buffer row in the process (the
engine's cached session, its window cache, its last-read report), on SQLite and PostgreSQL."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.engine import Engine, SessionOptions, SessionState
from memory_store import MemoryParams
from memory_store.store import EntryStore
from tests.api.support import FACT, filler
from tests.reliability.support import row_counts, stored_message_ids

FACT_ID = 1  # the fact is the first message after the system block


def _fill(client: TestClient, sid: str) -> None:
    """The fact, small talk that pushes it into memory, and one live turn that reads it."""
    history = [{"role": "user", "content": FACT}, {"role": "assistant", "content": "Lovely!"}]
    r = client.post(f"/v1/sessions/{sid}/messages", json={"messages": history + filler(4)})
    assert r.status_code == 200, r.text
    r = client.post(
        f"/v1/sessions/{sid}/chat", json={"message": "What is my cat called?", "max_tokens": 4}
    )
    assert r.status_code == 200, r.text


def _all_rows(store: EntryStore, name: str) -> np.ndarray:
    """Every row of a column's buffer, the spare capacity past the live rows included."""
    return np.asarray(store.table._buf[name])


def _vectors_of(st: SessionState, message_id: int) -> list[np.ndarray]:
    """The key vectors (every slot) and hidden states (kNN) memory holds of one message."""
    out = []
    for store in st.memory.stores():
        name = "hidden" if store is st.memory.knn else "key"
        out.append(np.array(store.col(name)[store.col("message_id") == message_id]))
    return out


def _ivf_labels(index: object) -> np.ndarray:
    """The labels an IVF index holds, read from its inverted lists."""
    import faiss

    inv = index.invlists  # type: ignore[attr-defined]
    out = [
        faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
        for i in range(inv.nlist)
        if inv.list_size(i)
    ]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _check_gone_from_ram(st: SessionState, vectors: list[np.ndarray], message_id: int) -> None:
    """No store row, spare buffer row or FAISS vector holds the message's vectors; no window
    buffer holds data past its live tokens; the last-read report does not name it."""
    for store, vecs in zip(st.memory.stores(), vectors, strict=True):
        assert message_id not in store.col("message_id")
        name = "hidden" if store is st.memory.knn else "key"
        buf = _all_rows(store, name)
        for v in vecs:
            assert not (buf == v).all(axis=1).any(), "a forgotten vector stays in a buffer"
        index = store.index._index
        if index is not None:  # FAISS holds exactly the live entries (no tombstones)
            assert index.ntotal == len(store), (index.ntotal, len(store))
            if len(vecs) and index.ntotal:
                if hasattr(index, "make_direct_map"):  # IVF: reconstructs through a direct map
                    index.make_direct_map()
                    held = np.stack([index.reconstruct(int(i)) for i in _ivf_labels(index)])
                else:
                    held = index.reconstruct_n(0, index.ntotal)
                for v in vecs:
                    assert not np.isclose(held, v.astype(np.float32)).all(axis=1).any()
    cache = st.cache
    for t in (cache.keys, cache.values, cache.keys_rot):
        assert not t[:, :, cache.length :].any(), "window buffer past its tokens not cleared"
    report = st.last_read
    if report is not None:
        assert message_id not in report.messages
        assert all(seq != message_id for seq, _ in report.tokens)
        assert all(seq != message_id for seq, _ in report.token_ids)


def _build_indexes(client: TestClient, sid: str) -> None:
    r = client.post(f"/v1/sessions/{sid}/memory/query", json={"text": "my cat"})
    assert r.status_code == 200, r.text


def _last_read_ids(client: TestClient, sid: str) -> set[int]:
    r = client.get(f"/v1/sessions/{sid}/memory/last-read")
    assert r.status_code == 200, r.text
    out = r.json()
    return {m["message_id"] for m in out["messages"]} | {t["message_id"] for t in out["tokens"]}


@pytest.mark.parametrize("approx", ["hnsw", "ivf"])
def test_forget_a_message_leaves_nothing_of_it(
    client: TestClient, db_url: str, approx: str
) -> None:
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    # exact_max 8: the slots' FAISS indexes are approximate (HNSW graphs, where removal leaves
    # tombstones, or IVF lists)
    params = MemoryParams.from_dict(
        engine.params.to_dict() | {"exact_max": 8, "approx_index": approx}
    )
    sid = engine.create_session(options=SessionOptions(window=96, params=params))
    keep = client.post("/v1/sessions", json={"window": 96}).json()["id"]
    for s in (sid, keep):
        _fill(client, s)
    _build_indexes(client, sid)
    st = engine.state(sid)
    assert FACT_ID in st.memory.message_stats(), "the fact should be in memory"
    assert FACT_ID in _last_read_ids(client, sid), "the turn should have read the fact"
    assert any(s.index.kind == approx for s in st.memory.stores())
    vectors = _vectors_of(st, FACT_ID)
    assert sum(len(v) for v in vectors) > 0
    assert FACT_ID in stored_message_ids(db_url, sid)["memory_chunks"]
    keep_rows = row_counts(db_url, keep)

    r = client.delete(f"/v1/sessions/{sid}/memory/messages/{FACT_ID}")
    assert r.status_code == 200 and r.json()["removed_entries"] > 0, r.text

    # the database: no chunk, kNN chunk or window state holds the message any more
    for table, ids in stored_message_ids(db_url, sid).items():
        assert FACT_ID not in ids, table
    # the process: the cached session (and its indexes once rebuilt) holds nothing of it
    _build_indexes(client, sid)
    st = engine.state(sid)
    _check_gone_from_ram(st, vectors, FACT_ID)
    assert FACT_ID not in _last_read_ids(client, sid)
    # after a reload from the database as well
    engine.drop_cached(sid)
    _build_indexes(client, sid)
    _check_gone_from_ram(engine.state(sid), vectors, FACT_ID)
    # the transcript keeps the text; the other session is untouched
    transcript = client.get(f"/v1/sessions/{sid}/messages").json()["data"]
    assert transcript[FACT_ID]["content"] == FACT
    assert transcript[FACT_ID]["location"] == "forgotten"
    assert row_counts(db_url, keep) == keep_rows

    # a message still in the window: its window state row and its window tensors go
    last = st.entries[-1].seq
    start, end = st.entries[-1].start, st.entries[-1].end
    window_keys = st.cache.keys[:, :, start:end].clone()
    assert last in stored_message_ids(db_url, sid)["message_states"]
    r = client.delete(f"/v1/sessions/{sid}/memory/messages/{last}")
    assert r.status_code == 200, r.text
    assert last not in stored_message_ids(db_url, sid)["message_states"]
    st = engine.state(sid)
    _check_gone_from_ram(st, _vectors_of(st, last), last)
    flat = st.cache.keys.permute(2, 0, 1, 3).reshape(st.cache.capacity, -1)
    for row in window_keys.permute(2, 0, 1, 3).reshape(end - start, -1):
        if row.any():
            assert not (flat == row).all(dim=1).any(), "a forgotten window key stays cached"


def test_forget_all_leaves_no_state(client: TestClient, db_url: str) -> None:
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    sid = client.post("/v1/sessions", json={"window": 96}).json()["id"]
    _fill(client, sid)
    _build_indexes(client, sid)
    st = engine.state(sid)
    seqs = [s for s in st.memory.message_stats()] + [e.seq for e in st.entries if not e.pinned]
    vectors = {seq: _vectors_of(st, seq) for seq in seqs}

    r = client.delete(f"/v1/sessions/{sid}/memory")
    assert r.status_code == 200 and r.json()["removed_entries"] > 0, r.text
    counts = row_counts(db_url, sid)
    assert counts["memory_chunks"] == counts["knn_chunks"] == counts["memory_states"] == 0
    assert stored_message_ids(db_url, sid)["message_states"] == {0}  # the pinned system block
    _build_indexes(client, sid)
    st = engine.state(sid)
    assert st.memory.entry_count() == 0 and [e.seq for e in st.entries] == [0]
    for seq, vecs in vectors.items():
        _check_gone_from_ram(st, vecs, seq)
    assert _last_read_ids(client, sid) == set()


def test_delete_session_leaves_no_row_and_nothing_in_the_process(
    client: TestClient, db_url: str
) -> None:
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    keep = client.post("/v1/sessions", json={"window": 96}).json()["id"]
    sid = client.post("/v1/sessions", json={"window": 96}).json()["id"]
    for s in (keep, sid):
        _fill(client, s)
        _build_indexes(client, s)
    keep_rows = row_counts(db_url, keep)
    keep_entries = engine.state(keep).memory.entry_count()
    st = engine.state(sid)
    assert all(n > 0 for t, n in row_counts(db_url, sid).items() if t != "memory_states")
    # weak references: once the session is deleted, nothing in the process may hold its state
    refs: list[weakref.ref[Any]] = [
        weakref.ref(st),
        weakref.ref(st.memory),
        weakref.ref(st.cache),
        weakref.ref(st.cache.keys),
        weakref.ref(st.cache.values),
        weakref.ref(st.entries[-1].hidden),
        *(weakref.ref(s) for s in st.memory.stores()),
    ]
    assert isinstance(st.cache.keys, torch.Tensor)
    del st
    assert engine.cached_memory_entries() > keep_entries

    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert set(row_counts(db_url, sid).values()) == {0}
    assert row_counts(db_url, keep) == keep_rows
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} objects of the deleted session are still referenced"
    assert sid not in engine._cache and sid not in engine._locks._locks
    assert engine.cached_memory_entries() == keep_entries
    assert client.get(f"/v1/sessions/{sid}/memory").status_code == 404
    assert client.get(f"/v1/sessions/{keep}/memory").status_code == 200
