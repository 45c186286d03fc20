"""Helpers of the reliability tests: what the database holds of a session, decoded."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import create_engine, select

from memory_store.models import Base, ChatSession


def session_rows(url: str, sid: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the session in every table that holds a session's rows (``chat_sessions``
    by its id, the others by ``session_id``), each table's rows sorted: a full picture to compare
    before and after an event."""
    engine = create_engine(url)
    try:
        out: dict[str, list[tuple[Any, ...]]] = {}
        with engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                col = table.c.get("session_id")
                if col is None and table.name == ChatSession.__tablename__:
                    col = table.c.id
                if col is None:
                    continue
                rows = conn.execute(select(table).where(col == sid)).all()
                out[table.name] = sorted(
                    (tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows),
                    key=repr,
                )
        return out
    finally:
        engine.dispose()


def stored_message_ids(url: str, sid: str) -> dict[str, set[int]]:
    """Message ids whose hidden states the database still holds: in memory chunks (decoded from
    their blobs), kNN chunks and window message states."""
    engine = create_engine(url)
    try:
        found: dict[str, set[int]] = {"memory_chunks": set(), "knn_chunks": set()}
        with engine.connect() as conn:
            for name in found:
                table = Base.metadata.tables[name]
                for blob in conn.scalars(
                    select(table.c.message_ids).where(table.c.session_id == sid)
                ):
                    found[name] |= set(np.frombuffer(bytes(blob), dtype="<i8").tolist())
            states = Base.metadata.tables["message_states"]
            found["message_states"] = set(
                conn.scalars(select(states.c.message_id).where(states.c.session_id == sid))
            )
        return found
    finally:
        engine.dispose()


def row_counts(url: str, sid: str) -> dict[str, int]:
    """Rows of the session in each table that holds a session's rows."""
    return {name: len(rows) for name, rows in session_rows(url, sid).items()}
