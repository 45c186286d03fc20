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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_starts_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    import json
    import signal
    import time
    import urllib.request

    port = _free_port()
    env = os.environ | {"MEMCHAT_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the server never became ready")
        req = urllib.request.Request(
            f"{base}/v1/sessions",
            data=b'{"title": "cli"}',
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 201 and json.load(r)["title"] == "cli"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.returncode in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in out
        # JSON log lines, one access line per request, with its request id
        access = [json.loads(line) for line in out.splitlines() if '"memchat.access"' in line]
        assert any(a["route"] == "/v1/sessions" and a["status"] == 201 for a in access)
        assert all(a["request_id"] for a in access)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
