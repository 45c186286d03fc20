"""Fixtures of the deployment checks (no Docker engine: the files are checked statically, the
entrypoint and the replicas run as local processes against the local PostgreSQL)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Figures the tests report; printed in pytest's closing summary (CI's log shows them).
FIGURES: list[tuple[str, dict[str, Any]]] = []


def _load_bench() -> ModuleType:
    """bench/replicas.py, which starts entrypoint processes with the compose file's
    environment; the tests reuse it."""
    name = "bench_replicas_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "replicas.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def bench() -> ModuleType:
    return _load_bench()


@pytest.fixture()
def report() -> Any:
    """``report(title, figures)``: show ``figures`` in the closing summary."""

    def add(title: str, figures: dict[str, Any]) -> None:
        FIGURES.append((title, figures))

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for title, figures in FIGURES:
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(json.dumps(figures))
