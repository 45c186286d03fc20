"""Database fixtures shared by the test suites: an SQLite file and a throwaway PostgreSQL DB."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

if TYPE_CHECKING:
    from app.model import LoadedModel

PG_HOST = os.environ.get("MEMCHAT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("MEMCHAT_TEST_PG_PORT", "5432"))
PG_USER = "postgres"  # trust auth in CI and on the dev machines


def _admin() -> psycopg.Connection:
    """Autocommit connection to the `postgres` database (CREATE/DROP DATABASE need autocommit)."""
    try:
        return psycopg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
            autocommit=True, connect_timeout=5,
        )  # fmt: skip
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as user {PG_USER!r}: {exc}\n"
            "Start it (`make postgres`); CI runs the PostgreSQL tests, they are never skipped.",
            pytrace=False,
        )


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file in the test's tmp dir."""
    return f"sqlite:///{tmp_path / 'memchat.db'}"


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """URL of a fresh, uniquely named PostgreSQL database, dropped after the test."""
    name = f"memchat_test_{uuid.uuid4().hex[:16]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _admin() as admin:  # FORCE: a test that failed may still hold connections
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def lm() -> LoadedModel:
    """The bundled model (SmolLM2-135M-Instruct, prepared by `make test`), loaded once."""
    import torch

    from app.config import Settings
    from app.model import load_model

    torch.manual_seed(0)
    settings = Settings()
    return load_model(settings.model_path, settings.cache_dir)
