"""Crash safety: a real server process (``python -m app serve``) killed with SIGKILL in the middle
of a turn, once while it generates and once inside the turn's transaction just before its commit
(the test-only hook ``MEMCHAT_TEST_PAUSE_BEFORE_COMMIT`` holds it there). After a restart the
session holds exactly its whole turns: every row of it in every table is as before the broken
turn (so its memory holds no entry of it), and the memory reads equal those before the crash.
On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.support import FACT, filler
from tests.reliability.support import session_rows, stored_message_ids

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the name of my cat?"
pytestmark = pytest.mark.slow


class Server:
    """A ``python -m app serve`` child process; its stderr lines are collected as they come."""

    def __init__(self, url: str, env: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMCHAT_")}
        settings = {
            "MEMCHAT_DATABASE_URL": url,
            "MEMCHAT_MAX_NEW_TOKENS": "256",
            "MEMCHAT_THREADS": "1",
            "MEMCHAT_LOG_LEVEL": "INFO",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(self.port)],
            cwd=ROOT,
            env=clean | settings | (env or {}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        self._wait_ready()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def _wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.drain()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not get ready")

    def drain(self) -> str:
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return "".join(self.log[-20:])

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.log.append(line)
            if text in line:
                return
        raise TimeoutError(f"no log line with {text!r}: {self.drain()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no rollback, no flush runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.http.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.http.close()


@contextmanager
def server(url: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    s = Server(url, env)
    try:
        yield s
    finally:
        s.stop()


def snapshot(http: httpx.Client, url: str, sid: str) -> dict[str, Any]:
    """What the database holds of the session, row by row, and what the API shows of it: the
    transcript, the memory listing and a memory read (explain)."""
    memory = http.get(f"/v1/sessions/{sid}/memory").json()
    memory.pop("bytes")  # RAM with spare capacity, which depends on the history of appends
    read = http.post(f"/v1/sessions/{sid}/memory/query", json={"text": QUESTION, "top_tokens": 20})
    assert read.status_code == 200, read.text
    return {
        "rows": session_rows(url, sid),
        "messages": http.get(f"/v1/sessions/{sid}/messages").json(),
        "memory": memory,
        "read": read.json(),
    }


def test_sigkill_during_generation_and_during_commit(db_url: str) -> None:
    with server(db_url) as s:
        sid = s.http.post("/v1/sessions", json={"window": 96}).json()["id"]
        history = [{"role": "user", "content": FACT}, {"role": "assistant", "content": "Nice!"}]
        r = s.http.post(f"/v1/sessions/{sid}/messages", json={"messages": history + filler(4)})
        assert r.status_code == 200, r.text
        r = s.http.post(f"/v1/sessions/{sid}/chat", json={"message": "Hi!", "max_tokens": 4})
        assert r.status_code == 200, r.text
        before = snapshot(s.http, db_url, sid)
        assert before["memory"]["entries"] > 0 and before["read"]["messages"]
        whole = before["messages"]["total"]

        # 1. killed while generating: the reply is streaming, nothing is committed yet
        deltas = 0
        body = {"message": "Tell me a long story about the sea.", "max_tokens": 200}
        with s.http.stream(
            "POST", f"/v1/sessions/{sid}/chat", json=body | {"stream": True}
        ) as stream:
            for line in stream.iter_lines():
                deltas += line.startswith("event: delta")
                if deltas >= 3:
                    s.kill()
                    break
        assert deltas >= 3

    with server(db_url, {"MEMCHAT_TEST_PAUSE_BEFORE_COMMIT": "120"}) as s:
        assert snapshot(s.http, db_url, sid) == before

        # 2. killed inside the turn's transaction, its rows written but not committed
        failed: list[BaseException] = []

        def turn() -> None:
            try:
                s.http.post(f"/v1/sessions/{sid}/chat", json={"message": QUESTION, "max_tokens": 5})
            except httpx.TransportError as exc:  # the server died under the request
                failed.append(exc)

        t = threading.Thread(target=turn)
        t.start()
        s.wait_for_log("test hook: pausing before commit")
        s.kill()
        t.join(30)
        assert failed, "the request should have died with the server"

    with server(db_url) as s:
        after = snapshot(s.http, db_url, sid)
        assert after == before
        assert after["messages"]["total"] == whole
        broken = set(range(whole, whole + 4))  # ids the broken turns would have taken
        for table, ids in stored_message_ids(db_url, sid).items():
            assert not ids & broken, table
        # the session goes on from its last whole turn
        r = s.http.post(f"/v1/sessions/{sid}/chat", json={"message": QUESTION, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["user_message_id"] == whole and r.json()["message_id"] == whole + 1
        messages = s.http.get(f"/v1/sessions/{sid}/messages").json()
        assert messages["total"] == whole + 2
        assert [m["role"] for m in messages["data"][-2:]] == ["user", "assistant"]
        session = s.http.get(f"/v1/sessions/{sid}").json()
        assert (
            session["turn"]
            == before["rows"]["chat_sessions"][0][_column("chat_sessions", "turn")] + 1
        )


def _column(table: str, name: str) -> int:
    from memory_store.models import Base

    return [c.name for c in Base.metadata.tables[table].columns].index(name)
