"""Fixtures of the reliability tests: the API tests' app factory over SQLite and PostgreSQL."""

from __future__ import annotations

from tests.api.conftest import client, db_url, make_client  # noqa: F401  (fixtures)
