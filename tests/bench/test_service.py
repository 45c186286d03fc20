"""Tests for bench/service.py, the benchmark of the HTTP API (a real server, the real model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "service.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_service_under_test", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


service = _load()


def test_conversation_states_facts_first_and_repeats() -> None:
    msgs = service.conversation(25)
    assert len(msgs) == 25 and msgs[:3] == service.FACTS
    assert len(set(msgs)) == 25  # repeated messages are numbered


@pytest.mark.slow  # loads the model and serves it
def test_two_turns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    argv = ["--turns", "2", "--max-tokens", "4", "--window", "128", "--database-url", url]
    assert service.main(argv) == 0
    out = json.loads(capsys.readouterr().out)

    for key in ("turns", "window", "max_tokens", "memory_tokens_final", "per_turn", "python"):
        assert key in out
    assert (out["turns"], out["window"], out["max_tokens"]) == (2, 128, 4)
    assert isinstance(out["torch_threads"], int) and out["torch_threads"] >= 1
    for key in ("ttft_s", "turn_s", "tokens_per_s", "server_memory_read_s"):
        assert set(out[key]) == {"p50", "p95", "mean"}
        assert all(v is not None and v >= 0 for v in out[key].values())
    assert set(out["server_memory_write_s"]) == {"p50", "p95", "mean"}
    assert len(out["per_turn"]) == 2
    for t in out["per_turn"]:
        assert 0 < t["ttft_s"] <= t["turn_s"]
        assert 0 < t["tokens"] <= 4 and t["tokens_per_s"] > 0
        assert t["server_memory_read_s"] >= 0 and t["server_memory_write_s"] >= 0
    assert out["ttft_s"]["p50"] <= out["turn_s"]["p50"]
    assert out["per_turn"][0]["message"] == service.FACTS[0]
    assert out["session_messages_final"] == 1 + 2 * 2  # system block + two turns
    assert Path(tmp_path / "bench.db").is_file()  # the given database was used
