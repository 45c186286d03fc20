"""Fixtures of the memory_store tests: a database engine on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session

from memory_store.models import ChatSession
from memory_store.persistence import configure_engine, create_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine with the schema created, on an SQLite file and on a fresh PostgreSQL database."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    eng = configure_engine(create_engine(url))
    if request.param == "sqlite":  # no fsync per commit: the tests need atomicity, not durability
        event.listen(eng, "connect", lambda conn, _: conn.execute("PRAGMA synchronous=OFF"))
    create_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture()
def session_id(engine: Engine) -> str:
    """Id of a new, committed chat session."""
    with Session(engine) as db:
        row = ChatSession(title="test")
        db.add(row)
        db.commit()
        return row.id


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
