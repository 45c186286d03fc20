"""Alembic migrations (app.db, migrations/versions) on SQLite and PostgreSQL: the migrated schema
is the models' schema, downgrade removes it, an old ``create_all`` database is taken over, and the
``python -m app db`` command works."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import (
    Connection,
    Engine,
    MetaData,
    Table,
    UniqueConstraint,
    create_engine,
    delete,
    func,
    insert,
    inspect,
    pool,
    select,
)
from sqlalchemy.exc import IntegrityError

from app.db import (
    INITIAL_REVISION,
    LEGACY_TABLES,
    SchemaError,
    current_revision,
    downgrade_database,
    head_revision,
    make_sessionmaker,
    upgrade_database,
)
from memory_store.models import LOCAL_TENANT_ID, Base, ChatSession, Message, MessageState, Tenant
from memory_store.persistence import create_schema

ROOT = Path(__file__).resolve().parents[1]
ALL_TABLES = frozenset(Base.metadata.tables)


def legacy_metadata() -> MetaData:
    """The tables the old ``create_all`` made before migrations (the schema of revision 0001):
    today's, without tenants and keys, ``chat_sessions.name`` unique on its own."""
    md = MetaData()
    sessions = Base.metadata.tables["chat_sessions"]
    Table(
        "chat_sessions",
        md,
        *[c._copy() for c in sessions.columns if c.name != "tenant_id"],
        UniqueConstraint("name"),
    )
    for name in sorted(LEGACY_TABLES - {"chat_sessions"}):
        Base.metadata.tables[name].to_metadata(md)
    return md


def legacy_create_all(engine: Engine) -> None:
    """What ``memory_store.persistence.create_schema`` did before revision 0002 (unnamed
    constraints on SQLite included)."""
    legacy_metadata().create_all(engine)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """URL of an empty database: an SQLite file, then a fresh PostgreSQL database."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture()
def connect(db_url: str) -> Iterator[Any]:
    """Opens short-lived connections to ``db_url`` (NullPool: nothing held after the test)."""
    engines: list[Engine] = []

    def make() -> Connection:
        engine = create_engine(db_url, poolclass=pool.NullPool)
        engines.append(engine)
        return engine.connect()

    yield make
    for engine in engines:
        engine.dispose()


def _diff(conn: Connection) -> list[Any]:
    """What autogenerate would change to make the database match the models (types included)."""
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def _reflect(conn: Connection, tables: frozenset[str] = ALL_TABLES) -> dict[str, list[str]]:
    """Every reflected detail of memchat's tables, as sorted strings. Constraint names are kept
    on PostgreSQL only: ``create_all`` leaves them unnamed, which SQLite keeps unnamed."""
    insp = inspect(conn)
    named = conn.dialect.name != "sqlite"

    def drop_name(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if named or k != "name"}

    out: dict[str, list[str]] = {}
    for t in sorted(tables):
        rows = [
            repr((c["name"], c["type"].compile(dialect=conn.dialect), c["nullable"], c["default"]))
            for c in insp.get_columns(t)
        ]
        rows.append(repr(sorted(drop_name(dict(insp.get_pk_constraint(t))).items())))
        for kind, items in (
            ("fk", insp.get_foreign_keys(t)),
            ("uq", insp.get_unique_constraints(t)),
            ("ix", insp.get_indexes(t)),
        ):
            rows += [repr((kind, sorted(drop_name(dict(i)).items()))) for i in items]
        out[t] = sorted(rows)
    return out


def test_upgrade_gives_the_models_schema(db_url: str, connect: Any) -> None:
    with connect() as conn:  # compare_metadata sees an empty database: it does compare
        assert {d[1].name for d in _diff(conn) if d[0] == "add_table"} == ALL_TABLES
    assert current_revision(db_url) is None
    upgrade_database(db_url)
    assert current_revision(db_url) == head_revision()
    with connect() as conn:
        assert _diff(conn) == []
    upgrade_database(db_url)  # already at head: nothing to do
    assert current_revision(db_url) == head_revision()


def test_migration_and_create_all_make_the_same_tables(db_url: str, connect: Any) -> None:
    """Same columns, types, keys, ON DELETE CASCADE, uniques, indexes (and names on PostgreSQL)
    as ``create_all``, at head and at the initial revision (against the old ``create_all``), so
    a stamped old database is indistinguishable from a migrated one."""
    engine = create_engine(db_url, poolclass=pool.NullPool)
    create_schema(engine)
    with engine.connect() as conn:
        new = _reflect(conn)
        tenants = conn.execute(select(Tenant.id, Tenant.name)).all()
    Base.metadata.drop_all(engine)
    legacy_create_all(engine)
    with engine.connect() as conn:
        old = _reflect(conn, LEGACY_TABLES)
    legacy_metadata().drop_all(engine)
    engine.dispose()
    upgrade_database(db_url, INITIAL_REVISION)
    with connect() as conn:
        assert _reflect(conn, LEGACY_TABLES) == old
    upgrade_database(db_url)
    with connect() as conn:
        assert _reflect(conn) == new
        # both make the local tenant, which sessions made without a tenant belong to
        assert conn.execute(select(Tenant.id, Tenant.name)).all() == tenants
        assert tenants == [(LOCAL_TENANT_ID, "local")]


def test_column_types_per_dialect(db_url: str, connect: Any) -> None:
    upgrade_database(db_url)
    with connect() as conn:
        insp = inspect(conn)
        cols = {c["name"]: c["type"] for c in insp.get_columns("message_states")}
        fks = insp.get_foreign_keys("message_states")
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("messages")}
        blob, params = cols["keys"].compile(dialect=conn.dialect), insp.get_columns("chat_sessions")
        if conn.dialect.name == "postgresql":
            assert blob == "BYTEA"
            assert cols["created_at"].compile(dialect=conn.dialect) == "TIMESTAMP WITH TIME ZONE"
        else:
            assert blob == "BLOB"
            assert cols["created_at"].compile(dialect=conn.dialect) == "DATETIME"
    assert {c["name"]: type(c["type"]).__name__ for c in params}["params"] == "JSON"
    assert [(f["referred_table"], f["options"].get("ondelete")) for f in fks] == [
        ("chat_sessions", "CASCADE")
    ]
    assert uniques == {("session_id", "seq")}


def test_downgrade_to_base_removes_every_table(db_url: str, connect: Any) -> None:
    upgrade_database(db_url)
    downgrade_database(db_url, "base")
    assert current_revision(db_url) is None
    with connect() as conn:
        assert _tables(conn) & set(Base.metadata.tables) == set()
        assert _tables(conn) <= {"alembic_version"}
    upgrade_database(db_url)  # and back up again
    with connect() as conn:
        assert _diff(conn) == []


def test_create_all_database_is_stamped_and_upgraded(db_url: str, connect: Any) -> None:
    engine = create_engine(db_url, poolclass=pool.NullPool)
    legacy_create_all(engine)  # the old way, with data in it
    legacy = legacy_metadata().tables
    with engine.begin() as conn:
        conn.execute(
            insert(legacy["chat_sessions"]).values(id="s1", name="old", title="from create_all")
        )
        conn.execute(
            insert(legacy["messages"]).values(session_id="s1", seq=0, role="user", content="hello")
        )
    engine.dispose()
    with connect() as conn:
        assert "alembic_version" not in _tables(conn)

    upgrade_database(db_url)

    assert current_revision(db_url) == head_revision()
    with connect() as conn:
        assert _diff(conn) == []
        assert conn.scalar(select(func.count()).select_from(Message)) == 1
        assert conn.scalar(select(ChatSession.title)) == "from create_all"
        assert conn.scalar(select(ChatSession.tenant_id)) == LOCAL_TENANT_ID  # existing sessions


def test_create_all_database_is_taken_over_by_make_sessionmaker(db_url: str) -> None:
    engine = create_engine(db_url, poolclass=pool.NullPool)
    legacy_create_all(engine)
    engine.dispose()
    Session_ = make_sessionmaker(db_url)
    assert current_revision(db_url) == head_revision()
    with Session_() as db:
        db.add(ChatSession(name="new"))
        db.commit()
    Session_.kw["bind"].dispose()


def test_stamping_a_revision_before_head(db_url: str) -> None:
    """An old database is stamped at the initial revision, whatever the upgrade target."""
    engine = create_engine(db_url, poolclass=pool.NullPool)
    legacy_create_all(engine)
    engine.dispose()
    upgrade_database(db_url, INITIAL_REVISION)
    assert current_revision(db_url) == INITIAL_REVISION


def test_partial_old_schema_is_refused(db_url: str, connect: Any) -> None:
    engine = create_engine(db_url, poolclass=pool.NullPool)
    legacy = legacy_metadata()
    legacy.create_all(engine, tables=[legacy.tables["chat_sessions"]])
    engine.dispose()
    with pytest.raises(SchemaError, match="missing"):
        upgrade_database(db_url)
    with connect() as conn:
        assert _tables(conn) == {"chat_sessions"}  # nothing was written


def test_tenants_revision_keeps_sessions_and_names_them_per_tenant(
    db_url: str, connect: Any
) -> None:
    """0001 -> 0002 with sessions in it: they go to the local tenant; a name is unique within a
    tenant only; the unique constraint on the name alone comes back on a downgrade."""
    upgrade_database(db_url, INITIAL_REVISION)
    legacy = legacy_metadata().tables
    with connect() as conn, conn.begin():
        conn.execute(insert(legacy["chat_sessions"]).values(id="a" * 32, name="work", title="t"))
        conn.execute(
            insert(legacy["messages"]).values(session_id="a" * 32, seq=0, role="user", content="hi")
        )
    upgrade_database(db_url)
    with connect() as conn:
        assert _diff(conn) == []
        assert conn.execute(select(ChatSession.id, ChatSession.tenant_id)).all() == [
            ("a" * 32, LOCAL_TENANT_ID)
        ]
        assert conn.scalar(select(func.count()).select_from(Message)) == 1
        uniques = {
            tuple(u["column_names"]) for u in inspect(conn).get_unique_constraints("chat_sessions")
        }
        assert uniques == {("tenant_id", "name")}
    Session_ = make_sessionmaker(db_url)
    with Session_() as db:
        db.add(Tenant(id="t2", name="other"))
        db.flush()
        db.add(ChatSession(tenant_id="t2", name="work"))  # another tenant: the same name is fine
        db.commit()
        db.add(ChatSession(tenant_id="t2", name="work"))
        with pytest.raises(IntegrityError):
            db.commit()
        db.rollback()
        db.execute(delete(ChatSession).where(ChatSession.tenant_id == "t2"))
        db.commit()
    Session_.kw["bind"].dispose()
    downgrade_database(db_url, INITIAL_REVISION)
    with connect() as conn:
        assert "tenants" not in _tables(conn) and "api_keys" not in _tables(conn)
        cols = {c["name"] for c in inspect(conn).get_columns("chat_sessions")}
        assert "tenant_id" not in cols
        uniques = {
            tuple(u["column_names"]) for u in inspect(conn).get_unique_constraints("chat_sessions")
        }
        assert uniques == {("name",)}
        assert conn.scalar(select(legacy["chat_sessions"].c.name)) == "work"
    upgrade_database(db_url)
    with connect() as conn:
        assert _diff(conn) == []


def test_make_sessionmaker_migrates_and_cascades(db_url: str) -> None:
    Session_ = make_sessionmaker(db_url)
    assert current_revision(db_url) == head_revision()
    make_sessionmaker(db_url, migrate=True).kw["bind"].dispose()  # a restart: no-op
    with Session_() as db:
        row = ChatSession(name="s")
        db.add(row)
        db.flush()
        db.add(Message(session_id=row.id, seq=0, role="user", content="hi"))
        db.add(
            MessageState(
                session_id=row.id, message_id=0, n_tokens=1, n_layers=1, n_kv_heads=1,
                head_dim=1, hidden_dim=0, token_ids=b"\0" * 8, keys=b"\0\0", values=b"\0\0",
            )
        )  # fmt: skip
        db.commit()
        db.execute(delete(ChatSession))  # ON DELETE CASCADE, made by the migration
        db.commit()
        assert db.scalar(select(func.count()).select_from(Message)) == 0
        assert db.scalar(select(func.count()).select_from(MessageState)) == 0
    Session_.kw["bind"].dispose()


_WORKER = """
import sys, time
from pathlib import Path
from app.db import upgrade_database
import memory_store.models  # the slow imports happen before the start line
url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.001)
upgrade_database(url)
"""


def test_concurrent_upgrades_serialize(db_url: str, connect: Any, tmp_path: Path) -> None:
    """Workers (processes) starting together on one database: one migrates, the others wait for
    its lock and then find the schema at head (without the lock: "table already exists")."""
    go = tmp_path / "go"
    procs = []
    for i in range(4):
        cmd = [sys.executable, "-c", _WORKER, db_url, str(tmp_path / f"ready{i}"), str(go)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert current_revision(db_url) == head_revision()
    with connect() as conn:
        assert _diff(conn) == []


def test_threads_migrating_different_databases(tmp_path: Path) -> None:
    """Alembic's proxies are process globals: app.db runs one command at a time."""
    urls = [f"sqlite:///{tmp_path / f'db{i}.db'}" for i in range(6)]
    with ThreadPoolExecutor(6) as workers:
        list(workers.map(upgrade_database, urls))
    assert {current_revision(u) for u in urls} == {head_revision()}


def test_make_sessionmaker_in_memory_sqlite() -> None:
    Session_ = make_sessionmaker("sqlite://")
    with Session_() as db:
        db.add(ChatSession(name="m"))
        db.commit()
        assert db.scalar(select(func.count()).select_from(ChatSession)) == 1


def test_percent_in_sqlite_path(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / '100%'}.db"
    upgrade_database(url)
    assert current_revision(url) == head_revision()


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "db", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"MEMCHAT_DATABASE_URL": url},
        timeout=120,
    )


@pytest.mark.slow  # each run imports torch (app.cli.main imports app.model)
def test_cli_db_upgrade_current_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    up = _cli("upgrade", url=url)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"{url}: none -> {head_revision()} (head)"
    cur = _cli("current", url=url)
    assert cur.returncode == 0, cur.stderr
    assert cur.stdout.strip() == f"{head_revision()} (head)"
    other = f"sqlite:///{tmp_path / 'other.db'}"  # --url wins over the settings
    down = _cli("downgrade", "base", "--url", other, url=url)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == f"{other}: none -> none"
    assert current_revision(url) == head_revision()
    bad = _cli("downgrade", "no-such-rev", url=url)
    assert bad.returncode == 2 and "no-such-rev" in bad.stderr
