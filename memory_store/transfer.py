"""Portable export and import of one chat session: transcript, stored memory and window states.

`export_session` turns a session into a JSON-serialisable document; `import_session` validates
such a document completely and then inserts it as a new session (in the caller's transaction)::

    {"format": "memchat-session", "version": 1, "exported_at": "<ISO 8601>",
     "session": {<every chat_sessions column but id and tenant_id>},
     "tables": {"messages": [...], "memory_chunks": [...], "knn_chunks": [...],
                "memory_states": [...], "message_states": [...]},
     "checksum": "sha256:<hex>"}

The session carries every column of chat_sessions except its id and its owner (``tenant_id``, set by
the importer). Rows carry every column of their table except the reference to the session and an
autoincrement surrogate key (``messages.id``); they are written generically from the model's
columns, so a new column travels without a change here. Which tables belong to a session is listed
explicitly (`SESSION_TABLES`). Values: binary columns as base64 (standard alphabet, padded),
datetimes as ISO 8601 in UTC (SQLite's naive values are taken as UTC), JSON columns as they are. The
checksum is the sha256 of the canonical JSON (sorted keys, ``","``/``":"`` separators, ASCII) of the
document without its ``checksum`` field: it detects damage, it does not authenticate anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
    delete,
    insert,
    select,
)
from sqlalchemy.orm import Session

from .errors import CorruptMemory, InvalidExport, MemoryStoreError, SessionNotFound, ShapeError
from .models import Base, ChatSession, KnnChunk, MemoryChunk, MemoryState, Message, MessageState
from .persistence import load_memory, load_message_states

FORMAT = "memchat-session"
VERSION = 1

# The tables that belong to a session, in insert order, with the columns their rows are exported
# in order of. Their columns are found from the models.
SESSION_TABLES: dict[str, tuple[type[Base], tuple[str, ...]]] = {
    "messages": (Message, ("seq",)),
    "memory_chunks": (MemoryChunk, ("seq", "layer")),
    "knn_chunks": (KnnChunk, ("seq",)),
    "memory_states": (MemoryState, ("seq", "part")),
    "message_states": (MessageState, ("message_id",)),
}
_MEMORY_TABLES = ("memory_chunks", "knn_chunks", "memory_states")
# ChatSession columns that describe the stored memory rows: they travel as exported, never
# overridden, or the imported memory would not load (or not save again)
MEMORY_COLUMNS = (
    "memory_seq",
    "memory_turn",
    "memory_next_id",
    "memory_next_knn_id",
    "memory_shape",
)
# ChatSession columns that say who owns the session: not exported (an export is the content, not
# who had it); an import sets them (``tenant_id=...``) or they take their defaults
OWNER_COLUMNS = ("tenant_id",)
_DOC_KEYS = ("format", "version", "exported_at", "session", "tables", "checksum")
_SHAPE = ("L", "H", "D", "Dm")  # memory_shape, as named in _BLOB_SIZES

# Size of each blob: (bytes per item, factors); a factor is an integer column of the same row or a
# dimension of the session's memory_shape. Blob columns without a rule are not size-checked.
_BLOB_SIZES: dict[str, dict[str, tuple[int, tuple[str, ...]]]] = {
    "memory_chunks": {
        "heads": (1, ("n",)),
        "entry_ids": (8, ("n",)),
        "keys": (2, ("n", "D")),
        "values": (2, ("n", "D")),
        "message_ids": (8, ("n",)),
        "token_ids": (8, ("n",)),
        "positions": (4, ("n",)),
        "turn_written": (4, ("n",)),
        "s0": (4, ("n",)),
        "refreshed": (4, ("n",)),
        "attention": (4, ("n",)),
    },
    "knn_chunks": {
        "entry_ids": (8, ("n",)),
        "hidden": (2, ("n", "Dm")),
        "next_token_ids": (8, ("n",)),
        "message_ids": (8, ("n",)),
        "token_ids": (8, ("n",)),
        "positions": (4, ("n",)),
        "turn_written": (4, ("n",)),
        "s0": (4, ("n",)),
        "refreshed": (4, ("n",)),
    },
    "memory_states": {
        "slots": (2, ("n",)),
        "entry_ids": (8, ("n",)),
        "s0": (4, ("n",)),
        "refreshed": (4, ("n",)),
        "attention": (4, ("n",)),
        "drop_slots": (2, ("n_drop",)),
        "drop_ids": (8, ("n_drop",)),
    },
    "message_states": {
        "token_ids": (8, ("n_tokens",)),
        "keys": (2, ("n_layers", "n_kv_heads", "n_tokens", "head_dim")),
        "values": (2, ("n_layers", "n_kv_heads", "n_tokens", "head_dim")),
        "hidden": (2, ("n_tokens", "hidden_dim")),
    },
}
_EXPORT_TRIES = 3  # reads of a session that another writer keeps changing


# --- columns -------------------------------------------------------------------------------------


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


def _session_ref(table: Table) -> Column[Any]:
    """The column of `table` that refers to chat_sessions.id."""
    for col in table.columns:
        if any(fk.target_fullname == "chat_sessions.id" for fk in col.foreign_keys):
            return col
    raise TypeError(f"table {table.name} has no reference to chat_sessions")


def _session_columns() -> dict[str, Column[Any]]:
    """Exported columns of chat_sessions: all but the primary key and the owner
    (`OWNER_COLUMNS`)."""
    return {
        c.name: c
        for c in _table(ChatSession).columns
        if not c.primary_key and c.name not in OWNER_COLUMNS
    }


def _row_columns(table: Table) -> dict[str, Column[Any]]:
    """Exported columns of a session table: all but the session reference and a surrogate key."""
    skip = {_session_ref(table).name}
    if table.autoincrement_column is not None:
        skip.add(table.autoincrement_column.name)
    return {c.name: c for c in table.columns if c.name not in skip}


def _unique_keys(table: Table) -> list[tuple[str, ...]]:
    """Column tuples unique within one session (primary key and unique constraints, without the
    session reference); constraints on an unexported column are left to that column."""
    cols = _row_columns(table)
    ref = _session_ref(table).name
    keys = []
    for cons in table.constraints:
        if isinstance(cons, PrimaryKeyConstraint | UniqueConstraint):
            names = [c.name for c in cons.columns if c.name != ref]
            if names and all(n in cols for n in names):
                keys.append(tuple(names))
    return keys


# --- values --------------------------------------------------------------------------------------


class _Bad(Exception):
    """A value that does not fit its column (the reason)."""


def _iso(value: datetime) -> str:
    if value.tzinfo is None:  # SQLite gives back naive datetimes; memchat writes UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _jtype(value: Any) -> str:
    """JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _int_bits(col: Column[Any]) -> int:
    if isinstance(col.type, BigInteger):
        return 64
    if isinstance(col.type, SmallInteger):
        return 16
    return 32


def _dump(col: Column[Any], value: Any) -> Any:
    """JSON form of a column value."""
    t = col.type
    if value is None or isinstance(t, JSON):
        return value
    if isinstance(t, LargeBinary):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(t, DateTime):
        return _iso(value)
    if isinstance(t, Boolean):
        return bool(value)
    if isinstance(t, Integer):
        return int(value)
    if isinstance(t, Float):
        return float(value)
    if isinstance(t, String):
        return str(value)
    raise NotImplementedError(f"column {col.table.name}.{col.name}: no JSON form for type {t!r}")


def _load(col: Column[Any], value: Any) -> Any:
    """Column value of a JSON value; raises _Bad with the reason."""
    t = col.type
    if value is None:
        if col.nullable:
            return None
        raise _Bad("is null, but the column is not nullable")

    def want(kind: str, ok: bool) -> None:
        if not ok:
            raise _Bad(f"expected {kind}, got {_jtype(value)}")

    if isinstance(t, JSON):
        return value  # anything JSON (the checksum's serialisation made sure of it)
    if isinstance(t, LargeBinary):
        want("a base64 string", isinstance(value, str))
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _Bad(f"is not valid base64 ({exc})") from None
    if isinstance(t, DateTime):
        want("an ISO 8601 string", isinstance(value, str))
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise _Bad(f"is not an ISO 8601 datetime: {value!r}") from None
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)
    if isinstance(t, Boolean):
        want("a boolean", isinstance(value, bool))
        return value
    if isinstance(t, Integer):
        want("an integer", isinstance(value, int) and not isinstance(value, bool))
        bits = _int_bits(col)
        if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
            raise _Bad(f"{value} does not fit a {bits}-bit integer")
        return value
    if isinstance(t, Float):
        want("a number", isinstance(value, int | float) and not isinstance(value, bool))
        if not math.isfinite(value):
            raise _Bad(f"{value} is not finite")
        return float(value)
    if isinstance(t, String):
        want("a string", isinstance(value, str))
        if t.length is not None and len(value) > t.length:
            raise _Bad(f"{len(value)} characters, the column holds at most {t.length}")
        return value
    raise NotImplementedError(f"column {col.table.name}.{col.name}: no JSON form for type {t!r}")


# --- export --------------------------------------------------------------------------------------


def document_checksum(doc: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of the canonical JSON of `doc` without its ``checksum`` field.

    Raises TypeError/ValueError if the document is not JSON-serialisable."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    text = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def _read_session(db: Session, session_id: str) -> dict[str, Any]:
    t = _table(ChatSession)
    row = db.execute(select(t).where(t.c.id == session_id)).one_or_none()
    if row is None:
        raise SessionNotFound(f"no chat session {session_id!r}")
    return dict(row._mapping)


def _read_rows(db: Session, session_id: str, name: str) -> list[dict[str, Any]]:
    model, order = SESSION_TABLES[name]
    t = _table(model)
    cols = _row_columns(t)
    stmt = select(t).where(_session_ref(t) == session_id).order_by(*(t.c[c] for c in order))
    return [{n: _dump(c, r._mapping[c]) for n, c in cols.items()} for r in db.execute(stmt)]


def export_session(db: Session, session_id: str) -> dict[str, Any]:
    """A JSON-serialisable document of the session: its chat_sessions row (without id), the rows
    of every table in `SESSION_TABLES` and a checksum (see the module docstring). Flushes first.

    Reads in the caller's transaction; if the session row changes while the tables are read (a
    turn committed meanwhile under READ COMMITTED or SQLite's autocommit reads), it reads again.
    Raises SessionNotFound, or MemoryStoreError if the session kept changing.
    """
    db.flush()
    for _ in range(_EXPORT_TRIES):
        head = _read_session(db, session_id)
        tables = {name: _read_rows(db, session_id, name) for name in SESSION_TABLES}
        if _read_session(db, session_id) == head:
            break
    else:
        raise MemoryStoreError(
            f"session {session_id} changed during each of {_EXPORT_TRIES} export attempts"
        )
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": _iso(datetime.now(UTC)),
        "session": {n: _dump(c, head[n]) for n, c in _session_columns().items()},
        "tables": tables,
    }
    doc["checksum"] = document_checksum(doc)
    return doc


# --- validation ----------------------------------------------------------------------------------


def _where(table: str, i: int, raw: Mapping[str, Any]) -> str:
    """'memory_chunks row 3 (seq=5, layer=1)'."""
    keys = [f"{k}={raw[k]!r}" for k in SESSION_TABLES[table][1] if k in raw]
    return f"{table} row {i}" + (f" ({', '.join(keys)})" if keys else "")


def _load_row(
    raw: Any, cols: dict[str, Column[Any]], where: str, table: str, i: int | None
) -> dict[str, Any]:
    """Typed values of one exported row (exactly the known columns); raises InvalidExport."""
    if not isinstance(raw, Mapping):
        raise InvalidExport(f"{where}: expected an object, got {_jtype(raw)}", table=table, row=i)
    missing = sorted(set(cols) - set(raw))
    unknown = sorted(str(k) for k in set(raw) - set(cols))
    if missing or unknown:
        parts = ([f"missing column(s) {missing}"] if missing else []) + (
            [f"unknown column(s) {unknown}"] if unknown else []
        )
        column = (missing or unknown)[0]
        raise InvalidExport(f"{where}: {'; '.join(parts)}", table=table, row=i, column=column)
    out = {}
    for name, col in cols.items():
        try:
            out[name] = _load(col, raw[name])
        except _Bad as exc:
            raise InvalidExport(
                f"{where}, column {name!r}: {exc}", table=table, row=i, column=name
            ) from None
    return out


def _check_blob_sizes(
    table: str, i: int, where: str, row: dict[str, Any], dims: dict[str, int]
) -> None:
    for name, (itemsize, factors) in _BLOB_SIZES.get(table, {}).items():
        blob = row[name]
        if blob is None:
            continue
        sizes = []
        for f in factors:
            v = row[f] if f in row else dims[f]
            if v < 0:
                raise InvalidExport(
                    f"{where}, column {f!r} is negative", table=table, row=i, column=f
                )
            sizes.append(v)
        expected = itemsize * math.prod(sizes)
        if len(blob) != expected:
            formula = " x ".join([str(itemsize), *factors])
            values = " x ".join(str(v) for v in [itemsize, *sizes])
            raise InvalidExport(
                f"{where}, column {name!r}: {len(blob)} bytes, expected {formula} = {values}"
                f" = {expected}",
                table=table,
                row=i,
                column=name,
            )


def _check_unique(table: str, rows: list[dict[str, Any]]) -> None:
    for key in _unique_keys(_table(SESSION_TABLES[table][0])):
        seen: dict[tuple[Any, ...], int] = {}
        for i, r in enumerate(rows):
            v = tuple(r[k] for k in key)
            if v in seen:
                desc = ", ".join(f"{k}={x!r}" for k, x in zip(key, v, strict=True))
                raise InvalidExport(
                    f"{table} rows {seen[v]} and {i} have the same ({desc})",
                    table=table,
                    row=i,
                    column=key[0],
                )
            seen[v] = i


def _check_memory(session: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> None:
    """Consistency of the memory rows with the session's bookkeeping columns."""
    shape = session["memory_shape"]
    if shape is not None and not (
        isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape)
    ):
        raise InvalidExport(
            f"session, column 'memory_shape': expected null or [L, H, D, Dm] of positive integers,"
            f" got {shape!r}",
            table="session",
            column="memory_shape",
        )
    if shape is None:
        for name in _MEMORY_TABLES:
            if tables[name]:
                raise InvalidExport(
                    f"{name}: {len(tables[name])} row(s), but the session's memory_shape is null"
                    " (it holds no memory)",
                    table=name,
                    row=0,
                )
    dims = dict(zip(_SHAPE, shape or (), strict=False))
    for name, rows in tables.items():
        for i, r in enumerate(rows):
            where = _where(name, i, r)
            _check_blob_sizes(name, i, where, r, dims)
            if name in _MEMORY_TABLES and r["seq"] > session["memory_seq"]:
                raise InvalidExport(
                    f"{where}: seq {r['seq']} is after the session's last memory save"
                    f" (memory_seq {session['memory_seq']})",
                    table=name,
                    row=i,
                    column="seq",
                )
            if name == "memory_chunks" and not 0 <= r["layer"] < dims["L"]:
                raise InvalidExport(
                    f"{where}: layer {r['layer']} outside the memory's {dims['L']} layers",
                    table=name,
                    row=i,
                    column="layer",
                )
            if name == "memory_states" and r["kind"] not in ("log", "snapshot"):
                raise InvalidExport(
                    f"{where}: kind {r['kind']!r}, expected 'log' or 'snapshot'",
                    table=name,
                    row=i,
                    column="kind",
                )
            if name in ("memory_chunks", "knn_chunks") and r["n"]:
                counter = "memory_next_id" if name == "memory_chunks" else "memory_next_knn_id"
                ids = np.frombuffer(r["entry_ids"], "<i8")
                if ids.min() < 0 or ids.max() >= session[counter]:
                    raise InvalidExport(
                        f"{where}, column 'entry_ids': ids {int(ids.min())}..{int(ids.max())}"
                        f" outside 0..{counter} ({session[counter]})",
                        table=name,
                        row=i,
                        column="entry_ids",
                    )
        _check_unique(name, rows)
    # load_memory would silently drop the entries of a missing snapshot part
    states = tables["memory_states"]
    snaps = [r for r in states if r["kind"] == "snapshot"]
    if snaps:
        snap_seq = max(r["seq"] for r in snaps)
        parts = sorted(r["part"] for r in snaps if r["seq"] == snap_seq)
        if parts != list(range(dims["L"] + 1)):
            raise InvalidExport(
                f"memory_states: the snapshot of save {snap_seq} has parts {parts}, expected"
                f" 0..{dims['L']} (one per layer, then the kNN store)",
                table="memory_states",
                column="part",
            )
    for i, r in enumerate(states):
        if r["kind"] == "log" and r["part"] != 0:
            raise InvalidExport(
                f"{_where('memory_states', i, r)}: a log row has part {r['part']}, expected 0",
                table="memory_states",
                row=i,
                column="part",
            )


def _validate(doc: Any) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(session column values, rows by table) of a valid document; raises InvalidExport."""
    if not isinstance(doc, Mapping):
        raise InvalidExport(f"an export is a JSON object, got {_jtype(doc)}")
    if doc.get("format") != FORMAT:
        raise InvalidExport(
            f"not a memchat session export: format {doc.get('format')!r}, expected {FORMAT!r}"
        )
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        raise InvalidExport(
            f"unsupported export version {version!r} (this memchat reads {VERSION})"
        )
    missing = [k for k in _DOC_KEYS if k not in doc]
    unknown = sorted(str(k) for k in doc if k not in _DOC_KEYS)
    if missing or unknown:
        raise InvalidExport(f"document: missing field(s) {missing}, unknown field(s) {unknown}")
    if not isinstance(doc["checksum"], str):
        raise InvalidExport(f"checksum: expected a string, got {_jtype(doc['checksum'])}")
    try:
        actual = document_checksum(doc)
    except (TypeError, ValueError) as exc:
        raise InvalidExport(f"the document is not JSON-serialisable: {exc}") from None
    if actual != doc["checksum"]:
        raise InvalidExport(
            f"checksum mismatch: the document says {doc['checksum']}, its content hashes to"
            f" {actual} (it was altered or damaged after export)"
        )
    if not isinstance(doc["exported_at"], str):
        raise InvalidExport(f"exported_at: expected a string, got {_jtype(doc['exported_at'])}")
    session = _load_row(doc["session"], _session_columns(), "session", "session", None)
    if not isinstance(session["params"], Mapping):
        raise InvalidExport(
            f"session, column 'params': expected an object, got {_jtype(session['params'])}",
            table="session",
            column="params",
        )
    raw_tables = doc["tables"]
    if not isinstance(raw_tables, Mapping):
        raise InvalidExport(f"tables: expected an object, got {_jtype(raw_tables)}")
    missing = [t for t in SESSION_TABLES if t not in raw_tables]
    unknown = sorted(str(t) for t in raw_tables if t not in SESSION_TABLES)
    if missing or unknown:
        raise InvalidExport(
            f"tables: missing table(s) {missing}, unknown table(s) {unknown}"
            f" (a session has {list(SESSION_TABLES)})",
            table=(unknown or missing)[0],
        )
    tables: dict[str, list[dict[str, Any]]] = {}
    for name, (model, _) in SESSION_TABLES.items():
        raw_rows = raw_tables[name]
        if not isinstance(raw_rows, list):
            raise InvalidExport(
                f"tables.{name}: expected an array of rows, got {_jtype(raw_rows)}", table=name
            )
        cols = _row_columns(_table(model))
        tables[name] = [
            _load_row(raw, cols, _where(name, i, raw if isinstance(raw, Mapping) else {}), name, i)
            for i, raw in enumerate(raw_rows)
        ]
    _check_memory(session, tables)
    return session, tables


# --- import --------------------------------------------------------------------------------------


def _remove(db: Session, session_id: str) -> None:
    """Delete what an import inserted (no cascade needed: SQLite may run without foreign keys)."""
    for model, _ in reversed(SESSION_TABLES.values()):
        t = _table(model)
        db.execute(delete(t).where(_session_ref(t) == session_id))
    t = _table(ChatSession)
    db.execute(delete(t).where(t.c.id == session_id))
    db.flush()


def import_session(
    db: Session, doc: Mapping[str, Any], new_id: str | None = None, **overrides: Any
) -> str:
    """Insert the session of an export document as a new session; return its id.

    The whole document is validated before anything is inserted (InvalidExport names the table,
    row and column at fault). The session gets `new_id` (a uuid4 hex if None) and ``name`` None
    unless ``name=...`` is among `overrides`, which set other chat_sessions columns too (not ``id``
    nor the memory bookkeeping columns `MEMORY_COLUMNS`; the values go in as given), its owner
    among them (``tenant_id=...``; the column's default otherwise). Rows are
    inserted in the caller's transaction and flushed, never committed. Finally the imported memory
    and message states are loaded to prove the rows are usable; if they are not, the inserted rows
    are deleted again and InvalidExport is raised.

    Raises InvalidExport (the document), TypeError (an override that is not a column), ValueError
    (an override of id or memory bookkeeping, `new_id` or the overridden name already taken by
    a session of the same tenant).
    A database error leaves the transaction to be rolled back by the caller, as always.
    """
    session, tables = _validate(doc)
    cols = _session_columns()
    for key in overrides:
        if key not in cols and key not in OWNER_COLUMNS:
            raise TypeError(f"import_session: {key!r} is not a column of chat_sessions")
        if key in MEMORY_COLUMNS:
            raise ValueError(f"import_session: {key!r} describes the memory rows; it cannot be set")
    sid = uuid.uuid4().hex if new_id is None else new_id
    id_len = cast(String, _table(ChatSession).c.id.type).length
    if not isinstance(sid, str) or not sid or (id_len is not None and len(sid) > id_len):
        raise ValueError(f"import_session: new_id must be a string of 1..{id_len} characters")
    values = session | {"name": None} | overrides | {"id": sid}

    db.flush()
    t = _table(ChatSession)
    if db.execute(select(t.c.id).where(t.c.id == sid)).first() is not None:
        raise ValueError(f"import_session: a chat session with id {sid!r} exists")
    if "tenant_id" not in values:  # the column's default, applied here to check the name
        default = t.c.tenant_id.default
        values["tenant_id"] = getattr(default, "arg", None)
    same_name = (t.c.name == values["name"]) & (t.c.tenant_id == values["tenant_id"])
    if values["name"] is not None and db.execute(select(t.c.id).where(same_name)).first():
        raise ValueError(f"import_session: a chat session named {values['name']!r} exists")
    db.execute(insert(t), [values])
    for name, (model, _) in SESSION_TABLES.items():
        if tables[name]:
            mt = _table(model)
            ref = _session_ref(mt).name
            db.execute(insert(mt), [r | {ref: sid} for r in tables[name]])
    db.flush()

    shape = values["memory_shape"]
    try:
        if shape is not None:
            load_memory(db, sid, *shape)
        load_message_states(db, sid)
    except (CorruptMemory, ShapeError) as exc:
        _remove(db, sid)
        raise InvalidExport(f"the imported rows do not load: {exc}") from exc
    return sid


__all__ = [
    "FORMAT",
    "MEMORY_COLUMNS",
    "OWNER_COLUMNS",
    "SESSION_TABLES",
    "VERSION",
    "document_checksum",
    "export_session",
    "import_session",
]
