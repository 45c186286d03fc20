"""Concurrency: 50 requests at once on one session of a served app (uvicorn on loopback, the real
model), chat turns (whole and streamed) and history imports mixed, on SQLite and PostgreSQL.
Every accepted request's messages are stored, in one consistent order (a user message directly
followed by its reply, an import's messages together and in order), nothing of a refused request
is stored, and a refused one is a 409/429/503 with a clear message."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.engine import Engine
from app.main import create_app
from app.model import LoadedModel
from app.serving import serve_in_thread
from tests.reliability.support import stored_message_ids

N = 50
BUSY = {409, 429, 503}
pytestmark = pytest.mark.slow


def _request(base: str, sid: str, i: int) -> dict[str, Any]:
    """Request i: an import every fourth, else a chat turn (every third of those streamed)."""
    with httpx.Client(base_url=base, timeout=300) as http:
        if i % 4 == 0:
            msgs = [
                {"role": "user", "content": f"import {i} question"},
                {"role": "assistant", "content": f"import {i} answer"},
            ]
            r = http.post(f"/v1/sessions/{sid}/messages", json={"messages": msgs})
            return {"i": i, "kind": "import", "sent": msgs, "status": r.status_code,
                    "body": r.json()}  # fmt: skip
        message = f"chat {i}: say hi"
        body = {"message": message, "max_tokens": 2}
        if i % 3:
            r = http.post(f"/v1/sessions/{sid}/chat", json=body)
            return {"i": i, "kind": "chat", "sent": message, "status": r.status_code,
                    "body": r.json()}  # fmt: skip
        with http.stream("POST", f"/v1/sessions/{sid}/chat", json=body | {"stream": True}) as r:
            if r.status_code != 200:
                r.read()
                return {"i": i, "kind": "chat", "sent": message, "status": r.status_code,
                        "body": r.json()}  # fmt: skip
            events = [ln for ln in r.iter_lines() if ln.startswith("data:")]
        done = json.loads(events[-1][5:])
        assert "reply" in done, events[-1]  # the last event is "done", not an error
        return {"i": i, "kind": "chat", "sent": message, "status": 200, "body": done}


def test_fifty_concurrent_requests_on_one_session(lm: LoadedModel, db_url: str) -> None:
    settings = Settings(
        _env_file=None,
        database_url=db_url,
        window=128,
        max_new_tokens=2,
        lock_timeout=12.0,  # the later ones wait out the bound and are refused
        json_logs=False,
        log_level="WARNING",
    )
    app = create_app(settings, lm=lm)
    with serve_in_thread(app) as base:
        with httpx.Client(base_url=base, timeout=60) as http:
            sid = http.post("/v1/sessions", json={"window": 128}).json()["id"]
        with ThreadPoolExecutor(N) as pool:
            results = list(pool.map(lambda i: _request(base, sid, i), range(N)))
        with httpx.Client(base_url=base, timeout=60) as http:
            transcript = http.get(f"/v1/sessions/{sid}/messages", params={"limit": 1000}).json()
            query = {"text": "chat 1", "top_tokens": 20}
            read = http.post(f"/v1/sessions/{sid}/memory/query", json=query).json()
            engine: Engine = app.state.engine
            engine.drop_cached(sid)  # the RAM state after the storm equals the stored one
            assert http.post(f"/v1/sessions/{sid}/memory/query", json=query).json() == read

    statuses = sorted(r["status"] for r in results)
    assert all(s == 200 or s in BUSY for s in statuses), statuses
    accepted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    assert accepted, statuses
    for r in refused:
        err = r["body"]["error"]
        assert err["message"] and err["type"] and err["code"], err
        if r["status"] == 409:
            assert err["code"] == "session_busy" and "busy" in err["message"], err

    # every accepted request's messages, where it said, with what was sent and replied
    data = transcript["data"]
    by_id = {m["id"]: m for m in data}
    expected: dict[int, tuple[str, str]] = {0: ("system", by_id[0]["content"])}
    for r in accepted:
        b = r["body"]
        if r["kind"] == "chat":
            assert b["message_id"] == b["user_message_id"] + 1  # the reply right after its user
            expected[b["user_message_id"]] = ("user", r["sent"])
            expected[b["message_id"]] = ("assistant", b["reply"])
        else:
            ids = b["message_ids"]
            assert ids == list(range(ids[0], ids[0] + len(r["sent"])))
            for mid, m in zip(ids, r["sent"], strict=True):
                expected[mid] = (m["role"], m["content"])
    # nothing else: no message of a refused request, none half-written
    assert {m["id"]: (m["role"], m["content"]) for m in data} == expected
    assert transcript["total"] == len(expected) == 1 + 2 * len(accepted)
    assert [m["id"] for m in data] == list(range(len(data)))  # ids without a gap
    turns = [m["turn"] for m in data]
    assert turns == sorted(turns)  # turns in the order of the messages
    # the window's states and the memory hold only messages of the transcript
    for table, ids in stored_message_ids(db_url, sid).items():
        assert ids <= set(expected), table
    kinds = Counter(r["kind"] for r in accepted)
    busy = ", ".join(str(s) for s in statuses if s != 200)
    print(f"\n{db_url.split(':')[0]}: {len(accepted)} accepted {dict(kinds)}, "
          f"{len(refused)} refused ({busy})")  # fmt: skip
