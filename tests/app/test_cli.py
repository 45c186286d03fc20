"""The terminal chat: a session's memory persists across runs (real model, real SQLite file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _chat(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "MEMCHAT_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "MEMCHAT_MAX_NEW_TOKENS": "8",
    }
    return subprocess.run(
        [sys.executable, "-m", "app", "chat", "--session", "notes", "--window", "64"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=True,
    )


def test_chat_session_persists_across_runs(tmp_path: Path) -> None:
    first = _chat(tmp_path, "My favourite tree is the silver birch.\nWhat about flowers?\n/quit\n")
    assert "new session 'notes'" in first.stderr
    assert first.stdout.count("bot> ") == 2
    second = _chat(tmp_path, "Which tree do I like?\n")
    # the window of 64 tokens pushed the first exchange into memory, and it came back from SQL
    assert "session 'notes': turn 2," in second.stderr
    tokens = int(second.stderr.split("turn 2, ")[1].split(" tokens")[0])
    assert tokens > 0
    assert second.stdout.count("bot> ") == 1


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    env = os.environ | {"MEMCHAT_MODEL_PATH": str(tmp_path / "absent")}
    proc = subprocess.run(
        [sys.executable, "-m", "app", "prepare-model"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and str(tmp_path / "absent") in proc.stderr
