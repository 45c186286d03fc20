"""Database engine, session factory and schema migrations (SQLite file by default, PostgreSQL by
URL).

The schema is owned by the Alembic migrations in ``migrations/versions``; `make_sessionmaker`
brings the database to the newest revision before handing out sessions. A database whose tables
were made by the old ``create_all`` (`memory_store.persistence.create_schema`) and that has no
Alembic revision is stamped at `INITIAL_REVISION` (the schema it holds) and then upgraded.

Each upgrade (with its stamp) or downgrade runs in one transaction that also serializes concurrent
migrators (several workers starting at once): a transaction-level advisory lock on PostgreSQL,
``BEGIN IMMEDIATE`` (the write lock) on SQLite. Both have transactional DDL, so a failed migration
leaves the database as it was. Within a process, Alembic commands run one at a time (its
``context``/``op`` proxies are globals).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
INITIAL_REVISION = "0001"
# The tables `create_schema` made before migrations existed: exactly what INITIAL_REVISION creates.
LEGACY_TABLES = frozenset(
    {
        "chat_sessions",
        "messages",
        "memory_chunks",
        "knn_chunks",
        "memory_states",
        "message_states",
    }
)
# pg_advisory_xact_lock key of memchat's migrations (any constant; "memchat" in ASCII)
_PG_LOCK_KEY = 0x6D656D63686174
# Alembic's `context` and `op` are process-wide proxies: one command at a time per process.
_ALEMBIC_LOCK = threading.Lock()


class SchemaError(RuntimeError):
    """The database holds a schema the migrations cannot take over."""


def make_engine(url: str) -> Engine:
    """An SQLAlchemy engine; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if not _is_sqlite_memory(url):
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_sessionmaker(url: str, migrate: bool = True) -> sessionmaker[Session]:
    """Session factory over ``url``; when ``migrate``, first upgrades the schema to the newest
    revision (`upgrade_database`)."""
    engine = make_engine(url)
    if migrate:
        if _is_sqlite_memory(url):
            # a private in-memory database exists only on the engine's own connection
            with engine.begin() as conn:
                _upgrade(conn, "head")
        else:
            upgrade_database(url)
    return sessionmaker(engine, expire_on_commit=False)


# --- migrations ----------------------------------------------------------------------------------


def upgrade_database(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest).

    An unversioned database that holds memchat's tables (made by the old ``create_all``) is
    stamped at `INITIAL_REVISION` first. Raises `SchemaError` when it holds only some of them.
    """
    with _migration_connection(url) as conn:
        _upgrade(conn, revision)


def downgrade_database(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"``: drop every memchat table)."""
    with _migration_connection(url) as conn, _ALEMBIC_LOCK:
        command.downgrade(_alembic_config(conn), revision)


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at; None when unversioned (empty, or made
    by the old ``create_all``)."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest revision in ``migrations/versions``."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise SchemaError(f"no migration in {MIGRATIONS_DIR / 'versions'}")
    return head


def is_legacy_schema(conn: Connection) -> bool:
    """Whether the database has memchat's tables but no Alembic revision (made by the old
    ``create_all``). Raises `SchemaError` when only some of the tables are there."""
    if MigrationContext.configure(conn).get_current_revision() is not None:
        return False
    present = LEGACY_TABLES & set(inspect(conn).get_table_names())
    if not present:
        return False
    if present != LEGACY_TABLES:
        raise SchemaError(
            "the database has some of memchat's tables but no Alembic revision: "
            f"present {sorted(present)}, missing {sorted(LEGACY_TABLES - present)}; "
            "cannot tell which schema it holds"
        )
    return True


def _upgrade(conn: Connection, revision: str) -> None:
    """Stamp a legacy database, then upgrade; on ``conn``, inside its (caller's) transaction."""
    config = _alembic_config(conn)
    with _ALEMBIC_LOCK:
        if is_legacy_schema(conn):
            command.stamp(config, INITIAL_REVISION)
        command.upgrade(config, revision)


def _alembic_config(conn: Connection | None = None) -> Config:
    """Alembic configuration built in code (alembic.ini is for the ``alembic`` command line).

    env.py runs on ``conn`` when given (so no URL is needed); the connection's transaction stays
    the caller's to commit.
    """
    config = Config()
    # configparser interpolation: a literal % must be written %%
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if conn is not None:
        config.attributes["connection"] = conn
    return config


@contextmanager
def _migration_connection(url: str) -> Iterator[Connection]:
    """A connection in a transaction that commits on success and holds the migration lock.

    SQLite: foreign keys stay off (batch migrations drop and re-create tables, which would
    otherwise cascade), and the transaction is a real ``BEGIN IMMEDIATE`` (pysqlite's own
    transaction handling would commit before each DDL statement).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, poolclass=pool.NullPool, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # sqlite3 leaves BEGIN/COMMIT to us
            dbapi_conn.execute("PRAGMA foreign_keys=OFF")

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    else:
        engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            yield conn
    finally:
        engine.dispose()


def _is_sqlite_memory(url: str) -> bool:
    """Whether ``url`` is a private in-memory SQLite database."""
    u = make_url(url)
    return u.get_backend_name() == "sqlite" and (
        not u.database or ":memory:" in u.database or u.query.get("mode") == "memory"
    )
