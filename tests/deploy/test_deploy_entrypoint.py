"""docker/entrypoint.sh run as it is (``sh docker/entrypoint.sh``), with the app container's
environment from docker-compose.yml and .env.example, without a container: only the database URL
(a fresh local PostgreSQL database), the address and port, and the model cache dir (the image's
path does not exist here) are overridden.

The smoke test: it waits for the database, migrates, execs the server (uvicorn), answers
/readyz, wants an API key (auth is on in .env.example; the key made with ``entrypoint.sh python
-m app keys create``), runs a chat turn; after SIGTERM and a restart, the session and its memory
are there.
The quick ones: a bounded wait for a database that does not answer, SIGTERM during that wait,
invalid settings, and ``entrypoint.sh CMD...``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # nothing listens on port 1


def entry_env(bench: ModuleType, database_url: str, **extra: str) -> dict[str, str]:
    env: dict[str, str] = bench.process_environment(
        bench.compose_environment(),
        MEMCHAT_DATABASE_URL=database_url,
        MEMCHAT_HOST="127.0.0.1",
        MEMCHAT_PORT=str(bench.free_port()),
        MEMCHAT_CACHE_DIR=str(bench.local_cache_dir()),
        **extra,
    )
    return env


def run_entry(
    env: dict[str, str], *args: str, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_waits_for_the_database_a_bounded_time(bench: ModuleType, tmp_path: Path) -> None:
    env = entry_env(bench, UNREACHABLE, DB_WAIT_TIMEOUT="2")
    t0 = time.monotonic()
    out = run_entry(env, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert time.monotonic() - t0 < 15
    assert "waiting for database postgresql+psycopg://postgres@127.0.0.1:1/nothing" in out.stderr
    assert "not answering after" in out.stderr
    assert "migrating" not in out.stderr  # nothing after the failed wait


def test_invalid_settings_fail_at_once(bench: ModuleType, tmp_path: Path) -> None:
    out = run_entry(entry_env(bench, UNREACHABLE, MEMCHAT_WINDOW="1"), cwd=tmp_path)
    assert out.returncode == 2
    assert "invalid settings" in out.stderr and "window" in out.stderr


def _processes_with(mark: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if mark.encode() in (p / "environ").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_while_waiting_stops_at_once(bench: ModuleType, tmp_path: Path) -> None:
    mark = f"MEMCHAT_DEPLOY_TEST_MARK_{uuid.uuid4().hex}"
    env = entry_env(bench, UNREACHABLE, DB_WAIT_TIMEOUT="60") | {mark: "1"}
    log = tmp_path / "entry.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            ["sh", str(ENTRYPOINT)], env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while "waiting for database" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + 15
        assert time.monotonic() - t0 < 5
        assert "got SIGTERM before the server started" in log.read_text()
        time.sleep(0.2)
        assert _processes_with(mark) == []  # the waiting Python went too
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_command_runs_after_the_wait_without_migrating(
    bench: ModuleType, pg_url: str, tmp_path: Path
) -> None:
    out = run_entry(entry_env(bench, pg_url), "python", "-m", "app", "db", "current", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"  # answered, and not migrated
    assert "answers" in out.stderr and "migrating" not in out.stderr


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def assert_graceful_stop(server: object) -> None:
    """SIGTERM: uvicorn shuts down gracefully, then re-raises the signal (so the exit status is
    "killed by SIGTERM", 143 in a container, or 0 with older uvicorn versions)."""
    pid = server.pid  # type: ignore[attr-defined]
    rc = server.stop(signal.SIGTERM, timeout=30)  # type: ignore[attr-defined]
    assert rc in (0, -signal.SIGTERM), rc  # None: it had to be killed
    text = server.log_text()  # type: ignore[attr-defined]
    assert "Application shutdown complete." in text and f"Finished server process [{pid}]" in text


@pytest.mark.slow  # starts the server twice, with the real model
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_smoke_migrate_start_chat_restart(
    bench: ModuleType, pg_url: str, tmp_path: Path, report: object
) -> None:
    env = entry_env(bench, pg_url)
    port = env["MEMCHAT_PORT"]
    health = [sys.executable, str(ROOT / "docker" / "healthcheck.py")]
    health_env = {"PATH": os.environ["PATH"], "MEMCHAT_PORT": port}
    assert subprocess.run(health, env=health_env, capture_output=True).returncode == 1  # down

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    server = bench.Server(env, tmp_path / "first.log", tmp_path).start()
    try:
        timings["first_ready_s"] = round(server.wait_ready(300), 2)
        first_log = server.log_text()
        assert re.search(r": none -> \S+ \(head\)", first_log), first_log
        # exec'd: the entrypoint's process is now the server, told not to migrate again
        assert _cmdline(server.pid)[-3:] == ["app", "serve", ""]
        environ = _environ(server.pid)
        assert environ["MEMCHAT_AUTO_MIGRATE"] == "false"
        assert (environ["MEMCHAT_HOST"], environ["MEMCHAT_PORT"]) == ("127.0.0.1", port)
        assert f"Uvicorn running on http://127.0.0.1:{port}" in first_log
        assert subprocess.run(health, env=health_env, capture_output=True).returncode == 0

        # auth is on, as the stack ships: a key, made as README says (`compose run ... keys`)
        assert env["MEMCHAT_AUTH_ENABLED"] == "true"
        assert httpx.get(f"{server.url}/v1/sessions").status_code == 401
        made = run_entry(
            env, "python", "-m", "app", "keys", "create", "--tenant", "smoke", cwd=tmp_path
        )
        assert made.returncode == 0, made.stderr
        auth = {"Authorization": f"Bearer {made.stdout.strip()}"}
        with httpx.Client(base_url=server.url, timeout=300, headers=auth) as c:
            assert c.get("/readyz").json()["checks"] == {"model": "ok", "database": "ok"}
            sid = c.post("/v1/sessions", json={"title": "smoke", "window": 64}).json()["id"]
            filler = bench.filler(3)
            assert c.post(f"/v1/sessions/{sid}/messages", json={"messages": filler}).is_success
            r = c.post(
                f"/v1/sessions/{sid}/chat",
                json={"message": "My cat is called Pumpkin.", "max_tokens": 8},
            )
            assert r.status_code == 200, r.text
            turn = r.json()
            assert turn["reply"].strip()
            before_msgs = bench.transcript(c, sid)
            before_mem = bench.memory_view(c, sid)
            before_session = c.get(f"/v1/sessions/{sid}").json()
        assert before_mem["entries"] > 0 and before_mem["tokens"] > 0  # the window overflowed
        t1 = time.monotonic()
        assert_graceful_stop(server)
        timings["stop_s"] = round(time.monotonic() - t1, 2)
    finally:
        server.stop()

    t2 = time.monotonic()
    again = bench.Server(env, tmp_path / "second.log", tmp_path).start()
    try:
        timings["restart_ready_s"] = round(again.wait_ready(300), 2)
        second_log = again.log_text()
        assert re.search(r": (\S+) \(head\) -> \1 \(head\)", second_log), second_log
        with httpx.Client(base_url=again.url, timeout=300, headers=auth) as c:
            assert bench.transcript(c, sid) == before_msgs
            assert bench.memory_view(c, sid) == before_mem
            session = c.get(f"/v1/sessions/{sid}").json()
            assert session["turn"] == before_session["turn"]
            assert session["messages"] == before_session["messages"] == len(before_msgs)
            r = c.post(
                f"/v1/sessions/{sid}/chat",
                json={"message": "What is my cat called?", "max_tokens": 8},
            )
            assert r.status_code == 200, r.text
            assert r.json()["user_message_id"] == turn["message_id"] + 1
        assert_graceful_stop(again)
    finally:
        again.stop()
    timings["total_s"] = round(time.monotonic() - t0, 2)
    timings["restart_total_s"] = round(time.monotonic() - t2, 2)
    report(  # type: ignore[operator]
        "entrypoint smoke test",
        {
            **timings,
            "transcript_messages": len(before_msgs),
            "memory_tokens": before_mem["tokens"],
            "memory_entries": before_mem["entries"],
        },
    )
