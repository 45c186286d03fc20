"""Fixtures for the HTTP API tests: the real app over SQLite and PostgreSQL, with the real model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.model import LoadedModel
from tests.api.support import ClientFactory


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every API test runs on an SQLite file and on a fresh PostgreSQL database."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture()
def make_client(lm: LoadedModel) -> Iterator[ClientFactory]:
    """``with make_client(url, **settings) as client``: a started app (migrations run, model
    shared with the other tests) and an httpx client on it."""

    @contextmanager
    def make(url: str, **overrides: Any) -> Iterator[TestClient]:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            database_url=url,
            window=overrides.pop("window", 128),
            max_new_tokens=overrides.pop("max_new_tokens", 12),
            json_logs=False,
            log_level="WARNING",
            **overrides,
        )
        with TestClient(create_app(settings, lm=lm)) as client:
            yield client

    yield make


@pytest.fixture()
def client(make_client: ClientFactory, db_url: str) -> Iterator[TestClient]:
    with make_client(db_url) as c:
        yield c
