"""Database engine and session factory (SQLite file by default, PostgreSQL by URL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from memory_store.persistence import create_schema


def make_engine(url: str) -> Engine:
    """An SQLAlchemy engine; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if ":memory:" not in url and url not in ("sqlite://", "sqlite:///"):
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_sessionmaker(url: str, create: bool = True) -> sessionmaker[Session]:
    """Session factory over ``url``; creates the tables when ``create`` (until migrations run)."""
    engine = make_engine(url)
    if create:
        create_schema(engine)
    return sessionmaker(engine, expire_on_commit=False)
