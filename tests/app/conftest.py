"""Fixtures for tests that need the real model (SmolLM2-135M-Instruct, prepared by `make test`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db import make_sessionmaker
from app.engine import Engine
from app.model import LoadedModel


@pytest.fixture()
def engine_factory(lm: LoadedModel) -> Iterator:
    """Build engines over a given database URL (several may share one, like a restart)."""

    def make(url: str, **kwargs: object) -> Engine:
        return Engine(lm, make_sessionmaker(url), **kwargs)  # type: ignore[arg-type]

    yield make


@pytest.fixture()
def sqlite_db(tmp_path: Path) -> str:
    """URL of an empty SQLite file."""
    return f"sqlite:///{tmp_path}/memchat.db"
