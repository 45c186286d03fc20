"""Export and import of a whole session (transcript, memory, window states) across databases."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ms_oracle import assert_same_memory, random_turn
from sqlalchemy import Engine, LargeBinary, create_engine, delete, func, select, update
from sqlalchemy.orm import Session

from memory_store import (
    InvalidExport,
    MemoryParams,
    SessionMemory,
    SessionNotFound,
    export_session,
    import_session,
)
from memory_store import persistence as P
from memory_store import transfer as X
from memory_store.models import (
    LOCAL_TENANT_ID,
    Base,
    ChatSession,
    KnnChunk,
    MemoryChunk,
    MemoryState,
    Message,
    MessageState,
    Tenant,
)

L, H, D, DM = 3, 2, 8, 12
PARAMS = MemoryParams(merge_threshold=0.9, decay=0.8, floor=0.1, reinforce=0.3, capacity=60)
ALL_MODELS = (ChatSession, Message, MemoryChunk, KnnChunk, MemoryState, MessageState)


# --- helpers -------------------------------------------------------------------------------------


def new_engine(url: str) -> Engine:
    eng = P.configure_engine(create_engine(url))
    P.create_schema(eng)
    return eng


def load(engine: Engine, sid: str) -> SessionMemory:
    with Session(engine) as db:
        return P.load_memory(db, sid, L, H, D, DM, PARAMS)


def export(engine: Engine, sid: str) -> dict[str, Any]:
    with Session(engine) as db:
        return export_session(db, sid)


def do_import(engine: Engine, doc: Any, **kw: Any) -> str:
    with Session(engine) as db, db.begin():
        return import_session(db, doc, **kw)


def row_counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as db:
        return {
            m.__tablename__: db.scalar(select(func.count()).select_from(m)) or 0 for m in ALL_MODELS
        }


def play_turn(mem: SessionMemory, rng: np.random.Generator, turn: int, base: np.ndarray) -> None:
    """Writes (many merge), reinforced reads, decay and eviction."""
    mem.set_turn(turn)
    random_turn(mem, rng, int(rng.integers(1, 12)), message_id=2 * turn, base=base)
    for layer in range(L):
        r = mem.search(layer, rng.standard_normal((H, 4, D)).astype(np.float32), 3)
        for h in range(H):
            mem.reinforce(layer, h, r.ids[h].ravel(), rng.random(r.ids[h].size).astype(np.float32))
    mem.evict()


def build_session(
    engine: Engine, rng: np.random.Generator, turns: int = 10
) -> tuple[str, SessionMemory]:
    """A session with a transcript, a memory saved over `turns` turns (chunk rows, a state
    snapshot and log rows after it) and the window states of its last two messages."""
    with Session(engine) as db, db.begin():
        row = ChatSession(
            name="source",
            title="Trip to Iceland \u2708",
            system_prompt="Be brief.",
            window=64,
            params={"memory": PARAMS.to_dict(), "read": {"alpha": 0.5}},
            model="test-model",
        )
        db.add(row)
        db.flush()
        sid = row.id
    mem = SessionMemory(L, H, D, DM, PARAMS)
    base = rng.standard_normal((L, H, 5, D)).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "_MAX_LOG_ROWS", 3)  # a snapshot every few saves
        for turn in range(1, turns + 1):
            play_turn(mem, rng, turn, base)
            if turn == 5:
                mem.forget_message(4)
            with Session(engine) as db, db.begin():
                for seq, role in ((2 * turn, "user"), (2 * turn + 1, "assistant")):
                    db.add(
                        Message(
                            session_id=sid,
                            seq=seq,
                            role=role,
                            content=f"{role} says {seq} \u00fcn\u00efc\u00f6de \U0001f600\n",
                            turn=turn,
                            n_tokens=seq % 7,
                            location="memory" if turn < turns - 1 else "window",
                        )
                    )
                P.save_memory(db, sid, mem)
                db.execute(update(ChatSession).where(ChatSession.id == sid).values(turn=turn))
        # state-only changes: a snapshot, then a log row after it (with drop records)
        for max_log_rows in (0, 1000):
            mp.setattr(P, "_MAX_LOG_ROWS", max_log_rows)
            mem.reinforce(0, 0, mem.slots[0][0].col("id")[:3], np.ones(3, np.float32))
            if max_log_rows:
                mem.forget_message(2 * turns)
            with Session(engine) as db, db.begin():
                P.save_memory(db, sid, mem)
    with Session(engine) as db, db.begin():
        for seq, with_hidden in ((2 * turns, True), (2 * turns + 1, False)):
            T = 3 + seq % 3
            P.save_message_state(
                db,
                sid,
                seq,
                rng.standard_normal((L, H, T, D)),
                rng.standard_normal((L, H, T, D)),
                rng.standard_normal((T, DM)) if with_hidden else None,
                rng.integers(0, 1000, T),
            )
    return sid, mem


def assert_same_reads(a: SessionMemory, b: SessionMemory, rng: np.random.Generator) -> None:
    """Top-k reads of random queries per (layer, head) and of the kNN store agree: scores, values,
    keys, strengths and the message ids of the entries found."""
    for layer in range(L):
        q = rng.standard_normal((H, 9, D)).astype(np.float32)
        ra, rb = a.search(layer, q, 5), b.search(layer, q, 5)
        for f in ("scores", "values", "keys", "log_strength"):
            np.testing.assert_array_equal(getattr(ra, f), getattr(rb, f), err_msg=f)
        for h in range(H):
            np.testing.assert_array_equal(
                a.entry_info(layer, h, ra.ids[h])[0], b.entry_info(layer, h, rb.ids[h])[0]
            )
    hq = rng.standard_normal((6, DM)).astype(np.float32)
    ka, kb = a.knn_search(hq, 5), b.knn_search(hq, 5)
    for f in ("next_token_ids", "distances", "log_strength"):
        np.testing.assert_array_equal(getattr(ka, f), getattr(kb, f), err_msg=f)


def transcript(engine: Engine, sid: str) -> list[tuple[Any, ...]]:
    with Session(engine) as db:
        rows = db.scalars(select(Message).where(Message.session_id == sid).order_by(Message.seq))
        return [
            (
                m.seq,
                m.role,
                m.content,
                m.turn,
                m.n_tokens,
                m.location,
                m.created_at.replace(tzinfo=m.created_at.tzinfo or UTC).astimezone(UTC),
            )
            for m in rows
        ]


def message_states(engine: Engine, sid: str) -> dict[int, tuple[Any, ...]]:
    with Session(engine) as db:
        states = P.load_message_states(db, sid)
    return {
        k: (
            s.keys.tobytes(),
            s.values.tobytes(),
            None if s.hidden is None else s.hidden.tobytes(),
            s.token_ids.tolist(),
        )
        for k, s in states.items()
    }


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(
    params=[("sqlite", "postgresql"), ("postgresql", "sqlite"), ("sqlite", "sqlite")],
    ids=lambda p: f"{p[0]}-to-{p[1]}",
)
def two_engines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """(source, target): engines on two different databases, schema created."""
    urls = {"sqlite": [f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"]}
    if "postgresql" in request.param:
        urls["postgresql"] = [request.getfixturevalue("pg_url")]
    src = new_engine(urls[request.param[0]].pop(0))
    dst = new_engine(urls[request.param[1]].pop(0))
    yield src, dst
    src.dispose()
    dst.dispose()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], SessionMemory]:
    """(export document, the memory it holds) of a full session, built once on SQLite."""
    eng = new_engine(f"sqlite:///{tmp_path_factory.mktemp('source') / 'src.db'}")
    sid, mem = build_session(eng, np.random.default_rng(99))
    doc = export(eng, sid)
    eng.dispose()
    return doc, mem


def fresh_doc(source: tuple[dict[str, Any], SessionMemory]) -> dict[str, Any]:
    return copy.deepcopy(source[0])


# --- round trips ---------------------------------------------------------------------------------


def test_round_trip_to_another_database(two_engines, rng):
    src, dst = two_engines
    sid, mem = build_session(src, rng)
    doc = export(src, sid)
    kinds = {r["kind"] for r in doc["tables"]["memory_states"]}
    assert kinds == {"log", "snapshot"}  # the replay of logs after a snapshot travels too
    assert any(r["n_drop"] for r in doc["tables"]["memory_states"])
    assert all(doc["tables"][t] for t in X.SESSION_TABLES)

    new_id = do_import(dst, json.loads(json.dumps(doc)))
    assert new_id != sid and len(new_id) == 32
    imported = load(dst, new_id)
    assert_same_reads(mem, imported, rng)
    assert_same_memory(load(src, sid), imported, rng)
    assert transcript(dst, new_id) == transcript(src, sid)
    assert message_states(dst, new_id) == message_states(src, sid)
    with Session(dst) as db:
        row = db.get_one(ChatSession, new_id)
        assert (row.name, row.title, row.turn, row.params) == (
            None,
            "Trip to Iceland \u2708",
            10,
            {"memory": PARAMS.to_dict(), "read": {"alpha": 0.5}},
        )
    # exporting the copy gives the same document, up to the (unique) name
    again = export(dst, new_id)
    assert again["session"] == doc["session"] | {"name": None}
    assert again["tables"] == doc["tables"]

    # the bookkeeping travelled: the copy saves and reloads like the original
    base = rng.standard_normal((L, H, 5, D)).astype(np.float32)
    play_turn(imported, rng, 11, base)
    with Session(dst) as db, db.begin():
        P.save_memory(db, new_id, imported)
    assert_same_memory(imported, load(dst, new_id), rng)


def test_importing_twice_gives_independent_sessions(engine, source, rng):
    doc, mem = source
    a = do_import(engine, doc)
    b = do_import(engine, doc, title="second copy")
    assert a != b
    assert_same_reads(mem, load(engine, a), rng)
    assert_same_reads(mem, load(engine, b), rng)
    with Session(engine) as db:
        assert db.get_one(ChatSession, b).title == "second copy"
        assert db.get_one(ChatSession, a).title == doc["session"]["title"]
    # changing one leaves the other alone
    mb = load(engine, b)
    play_turn(mb, rng, 11, rng.standard_normal((L, H, 5, D)).astype(np.float32))
    mb.forget_message(6)
    with Session(engine) as db, db.begin():
        P.save_memory(db, b, mb)
        P.delete_message_state(db, b, 20)
    assert_same_reads(mem, load(engine, a), rng)
    assert_same_memory(mb, load(engine, b), rng)
    assert export(engine, a)["tables"] == doc["tables"]
    with Session(engine) as db, db.begin():
        db.execute(delete(ChatSession).where(ChatSession.id == a))
    assert_same_memory(mb, load(engine, b), rng)
    assert row_counts(engine)["chat_sessions"] == 1


@pytest.mark.parametrize("saved", [False, True], ids=["never-saved", "saved-empty"])
def test_session_with_an_empty_memory(engine, saved):
    with Session(engine) as db, db.begin():
        row = ChatSession(title="empty", params={})
        db.add(row)
        db.flush()
        sid = row.id
        db.add(Message(session_id=sid, seq=0, role="user", content="hi"))
        if saved:
            P.save_memory(db, sid, SessionMemory(L, H, D, DM))
    doc = export(engine, sid)
    assert doc["session"]["memory_shape"] == ([L, H, D, DM] if saved else None)
    assert [len(doc["tables"][t]) for t in X.SESSION_TABLES] == [1, 0, 0, 0, 0]
    new_id = do_import(engine, json.loads(json.dumps(doc)))
    assert load(engine, new_id).entry_count() == 0
    assert transcript(engine, new_id) == transcript(engine, sid)
    assert export(engine, new_id)["tables"] == doc["tables"]


# --- the document --------------------------------------------------------------------------------


def test_document_shape(source):
    doc = fresh_doc(source)
    assert list(doc) == ["format", "version", "exported_at", "session", "tables", "checksum"]
    assert (doc["format"], doc["version"]) == ("memchat-session", 1)
    assert doc["checksum"].startswith("sha256:") and len(doc["checksum"]) == 7 + 64
    assert doc["checksum"] == X.document_checksum(doc)
    body = {k: v for k, v in doc.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert doc["checksum"] == "sha256:" + hashlib.sha256(canon).hexdigest()
    assert "id" not in doc["session"] and doc["session"]["name"] == "source"
    assert doc["session"]["created_at"].endswith("+00:00")
    assert list(doc["tables"]) == list(X.SESSION_TABLES)
    msg = doc["tables"]["messages"][0]
    assert "id" not in msg and "session_id" not in msg
    assert [m["seq"] for m in doc["tables"]["messages"]] == list(range(2, 22))
    chunk = doc["tables"]["memory_chunks"][0]
    assert "session_id" not in chunk
    assert len(base64.b64decode(chunk["keys"])) == chunk["n"] * D * 2
    assert doc["tables"]["message_states"][1]["hidden"] is None


def test_every_blob_column_has_a_size_rule():
    for name, (model, order) in X.SESSION_TABLES.items():
        cols = model.__table__.columns
        blobs = {c.name for c in cols if isinstance(c.type, LargeBinary)}
        rules = X._BLOB_SIZES.get(name, {})
        assert set(rules) == blobs, name
        for _, factors in rules.values():
            assert all(f in cols or f in X._SHAPE for f in factors)
        assert all(c in cols for c in order)


def test_unknown_session_and_overrides(engine, source):
    with Session(engine) as db, pytest.raises(SessionNotFound):
        export_session(db, "nope")
    doc = fresh_doc(source)
    sid = do_import(engine, doc, new_id="b" * 32, name="copy")
    assert sid == "b" * 32
    with Session(engine) as db:
        assert db.get_one(ChatSession, sid).name == "copy"
    with pytest.raises(ValueError, match="named 'copy' exists"):
        do_import(engine, doc, name="copy")
    with pytest.raises(ValueError, match="id 'bbbb"):
        do_import(engine, doc, new_id="b" * 32)
    with pytest.raises(ValueError, match="new_id"):
        do_import(engine, doc, new_id="x" * 33)
    with pytest.raises(TypeError, match="'colour' is not a column"):
        do_import(engine, doc, colour="red")
    with pytest.raises(ValueError, match="memory_seq"):
        do_import(engine, doc, memory_seq=0)
    assert row_counts(engine)["chat_sessions"] == 1
    # names are unique per tenant: another tenant's import may take it; the owner is the importer's
    with Session(engine) as db, db.begin():
        db.add(Tenant(id="t2", name="second"))
    other = do_import(engine, doc, name="copy", tenant_id="t2")
    with Session(engine) as db:
        assert db.get_one(ChatSession, other).tenant_id == "t2"
        assert db.get_one(ChatSession, sid).tenant_id == LOCAL_TENANT_ID
    assert "tenant_id" not in export(engine, other)["session"]


def test_import_is_part_of_the_callers_transaction(engine, source):
    with Session(engine) as db:
        sid = import_session(db, fresh_doc(source))
        assert db.scalar(select(func.count()).select_from(Message)) == 20  # visible inside
        db.rollback()
    assert set(row_counts(engine).values()) == {0}
    with Session(engine) as db:
        with pytest.raises(SessionNotFound):
            export_session(db, sid)


# --- invalid documents ---------------------------------------------------------------------------


def _set_blob_byte(row: dict[str, Any], column: str, index: int, value: int) -> None:
    raw = bytearray(base64.b64decode(row[column]))
    raw[index] = value
    row[column] = base64.b64encode(bytes(raw)).decode()


def _flip_char(row: dict[str, Any], column: str) -> None:
    s = row[column]
    row[column] = ("B" if s[0] != "B" else "C") + s[1:]


Mutation = Callable[[dict[str, Any]], Any]
T = "tables"
# (id, mutation, recompute the checksum, error match)
CASES: list[tuple[str, Mutation, bool, str]] = [
    (
        "blob-byte-stale-checksum",
        lambda d: _flip_char(d[T]["memory_chunks"][0], "keys"),
        False,
        r"checksum mismatch",
    ),
    (
        "blob-byte-recomputed-checksum",  # caught when the copy is loaded: head out of range
        lambda d: _set_blob_byte(d[T]["memory_chunks"][0], "heads", 0, H),
        True,
        r"do not load: memory_chunks .*head out of range",
    ),
    (
        "blob-not-base64",
        lambda d: d[T]["memory_chunks"][1].update(keys="!" + d[T]["memory_chunks"][1]["keys"][1:]),
        True,
        r"memory_chunks row 1 \(seq=\d+, layer=\d+\), column 'keys': is not valid base64",
    ),
    (
        "blob-truncated",
        lambda d: d[T]["knn_chunks"][0].update(hidden=d[T]["knn_chunks"][0]["hidden"][:-4]),
        True,
        r"knn_chunks row 0 \(seq=\d+\), column 'hidden': \d+ bytes, expected 2 x n x Dm",
    ),
    (
        "removed-column",
        lambda d: d[T]["messages"][3].pop("content"),
        True,
        r"messages row 3 \(seq=5\): missing column\(s\) \['content'\]",
    ),
    (
        "removed-session-column",
        lambda d: d["session"].pop("memory_next_id"),
        True,
        r"session: missing column\(s\) \['memory_next_id'\]",
    ),
    (
        "extra-column",
        lambda d: d[T]["messages"][0].update(id=7),
        True,
        r"messages row 0 \(seq=2\): unknown column\(s\) \['id'\]",
    ),
    (
        "wrong-n",
        lambda d: d[T]["memory_chunks"][0].update(n=d[T]["memory_chunks"][0]["n"] + 1),
        True,
        r"memory_chunks row 0 .*column 'heads': \d+ bytes, expected 1 x n = ",
    ),
    (
        "wrong-n-drop",
        lambda d: d[T]["memory_states"][0].update(n_drop=d[T]["memory_states"][0]["n_drop"] + 1),
        True,
        r"memory_states row 0 .*column 'drop_slots': \d+ bytes, expected 2 x n_drop",
    ),
    (
        "message-state-tokens",
        lambda d: d[T]["message_states"][0].update(n_tokens=1),
        True,
        r"message_states row 0 \(message_id=20\), column 'token_ids'",
    ),
    (
        "wrong-shape",
        lambda d: d["session"].update(memory_shape=[L, H, D + 1, DM]),
        True,
        r"memory_chunks row 0 .*column 'keys': .* expected 2 x n x D",
    ),
    (
        "bad-shape",
        lambda d: d["session"].update(memory_shape=[L, H, D]),
        True,
        r"memory_shape",
    ),
    (
        "memory-without-shape",
        lambda d: d["session"].update(memory_shape=None),
        True,
        r"memory_chunks: \d+ row\(s\), but the session's memory_shape is null",
    ),
    (
        "unknown-table",
        lambda d: d[T].update(users=[]),
        True,
        r"unknown table\(s\) \['users'\]",
    ),
    (
        "missing-table",
        lambda d: d[T].pop("knn_chunks"),
        True,
        r"missing table\(s\) \['knn_chunks'\]",
    ),
    ("wrong-format", lambda d: d.update(format="other"), True, r"not a memchat session export"),
    ("wrong-version", lambda d: d.update(version=2), True, r"unsupported export version 2"),
    ("version-as-text", lambda d: d.update(version="1"), True, r"unsupported export version '1'"),
    (
        "missing-field",
        lambda d: d.pop("exported_at"),
        True,
        r"missing field\(s\) \['exported_at'\]",
    ),
    ("no-checksum", lambda d: d.pop("checksum"), False, r"missing field\(s\) \['checksum'\]"),
    (
        "int-as-string",
        lambda d: d[T]["messages"][1].update(turn="1"),
        True,
        r"messages row 1 \(seq=3\), column 'turn': expected an integer, got string",
    ),
    (
        "int-as-bool",
        lambda d: d[T]["memory_chunks"][0].update(layer=True),
        True,
        r"column 'layer': expected an integer, got boolean",
    ),
    (
        "int-as-float",
        lambda d: d[T]["knn_chunks"][0].update(n=1.0),
        True,
        r"knn_chunks row 0 .*column 'n': expected an integer, got number",
    ),
    (
        "int-too-large",
        lambda d: d[T]["messages"][0].update(seq=1 << 40),
        True,
        r"column 'seq': 1099511627776 does not fit a 32-bit integer",
    ),
    (
        "null-content",
        lambda d: d[T]["messages"][0].update(content=None),
        True,
        r"column 'content': is null, but the column is not nullable",
    ),
    (
        "string-too-long",
        lambda d: d[T]["messages"][0].update(role="x" * 21),
        True,
        r"column 'role': 21 characters, the column holds at most 20",
    ),
    (
        "bad-datetime",
        lambda d: d[T]["messages"][0].update(created_at="yesterday"),
        True,
        r"column 'created_at': is not an ISO 8601 datetime",
    ),
    (
        "params-not-object",
        lambda d: d["session"].update(params=[1]),
        True,
        r"session, column 'params': expected an object, got array",
    ),
    (
        "duplicate-message-seq",
        lambda d: d[T]["messages"][4].update(seq=d[T]["messages"][2]["seq"]),
        True,
        r"messages rows 2 and 4 have the same \(seq=4\)",
    ),
    (
        "duplicate-chunk",
        lambda d: d[T]["memory_chunks"].append(dict(d[T]["memory_chunks"][0])),
        True,
        r"memory_chunks rows 0 and \d+ have the same \(seq=\d+, layer=0\)",
    ),
    (
        "layer-out-of-range",
        lambda d: d[T]["memory_chunks"][0].update(layer=L),
        True,
        rf"layer {L} outside the memory's {L} layers",
    ),
    (
        "seq-after-last-save",
        lambda d: d["session"].update(memory_seq=1),
        True,
        r"is after the session's last memory save \(memory_seq 1\)",
    ),
    (
        "entry-id-beyond-counter",
        lambda d: d["session"].update(memory_next_knn_id=1),
        True,
        r"knn_chunks row 0 .*column 'entry_ids': ids \d+\.\.\d+ outside 0\.\.memory_next_knn_id",
    ),
    (
        "unknown-state-kind",
        lambda d: d[T]["memory_states"][0].update(kind="diff"),
        True,
        r"memory_states row 0 .*kind 'diff', expected 'log' or 'snapshot'",
    ),
    (
        "snapshot-part-removed",  # load_memory alone would drop that layer's entries silently
        lambda d: d[T]["memory_states"].pop(1),
        True,
        rf"the snapshot of save \d+ has parts \[0, 2, 3\], expected 0\.\.{L}",
    ),
    (
        "log-row-part",
        lambda d: d[T]["memory_states"][-1].update(part=5),
        True,
        r"memory_states row \d+ .*: a log row has part 5, expected 0",
    ),
    ("rows-not-array", lambda d: d[T].update(messages={}), True, r"tables.messages: expected an"),
    ("row-not-object", lambda d: d[T]["messages"].append(3), True, r"expected an object, got num"),
]


@pytest.mark.parametrize(
    ("mutate", "recompute", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_invalid_document_is_refused_and_leaves_no_rows(engine, source, mutate, recompute, match):
    doc = fresh_doc(source)
    mutate(doc)
    if recompute:
        doc["checksum"] = X.document_checksum(doc)
    before = row_counts(engine)
    with Session(engine) as db:
        with pytest.raises(InvalidExport, match=match):
            import_session(db, doc)
        db.commit()  # even a caller that commits after the error keeps nothing
    assert row_counts(engine) == before
    # the unchanged document still imports
    do_import(engine, fresh_doc(source))


def test_invalid_export_locates_the_fault(engine, source):
    doc = fresh_doc(source)
    doc[T]["memory_states"][1]["n"] = -1
    doc["checksum"] = X.document_checksum(doc)
    with Session(engine) as db, pytest.raises(InvalidExport) as info:
        import_session(db, doc)
    err = info.value
    assert (err.table, err.row, err.column) == ("memory_states", 1, "n")
    assert "memory_states row 1" in str(err) and "negative" in str(err)
    with Session(engine) as db, pytest.raises(InvalidExport, match="got array"):
        import_session(db, [doc])  # type: ignore[arg-type]
    assert set(row_counts(engine).values()) == {0}


def test_rows_carry_every_model_column(source):
    """Exported columns come from the models: every column but the session reference and the
    surrogate key is in each row; every table that refers to a session is exported."""
    doc = fresh_doc(source)
    for name, (model, _) in X.SESSION_TABLES.items():
        table = model.__table__
        skip = {"session_id"} | ({"id"} if name == "messages" else set())
        assert set(doc[T][name][0]) == {c.name for c in table.columns} - skip, name
    owner = set(X.OWNER_COLUMNS)  # who owns a session does not travel: the importer does
    assert set(doc["session"]) == {c.name for c in ChatSession.__table__.columns} - {"id"} - owner
    referring = {
        t.name
        for t in Base.metadata.tables.values()
        if any(fk.target_fullname == "chat_sessions.id" for c in t.columns for fk in c.foreign_keys)
    }
    assert referring == set(X.SESSION_TABLES)
