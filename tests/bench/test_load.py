"""Tests for bench/load.py, the bounded load test (a real server process, the real model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # starts a server process with the model
def test_small_load_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'load.db'}"
    argv = ["--sessions", "3", "--turns", "2", "--concurrency", "2", "--max-tokens", "2"]
    out = subprocess.run(
        [sys.executable, "-m", "app", "bench", "load", *argv, "--window", "128",
         "--database-url", url],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert (res["sessions"], res["turns_per_session"], res["concurrency"]) == (3, 2, 2)
    assert res["requests"] == 6 and res["ok"] == 6 and res["lost"] == 0 and res["errors"] == 0
    assert res["error_rate"] == 0.0 and res["statuses"] == {"200": 6}
    assert res["stored_turns_match"] is True
    lat = res["turn_latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
    assert res["throughput_turns_per_s"] > 0 and res["wall_s"] > 0
    assert res["server_peak_rss_mib"] > 100  # the model alone takes more
    assert res["database"] == "sqlite" and Path(tmp_path / "load.db").is_file()
