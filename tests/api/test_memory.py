"""The memory API: inspect, explain, forget, export/import, and reads that survive a restart."""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi.testclient import TestClient

from tests.api.support import FACT, ClientFactory, filler

QUESTION = "What is the name of my cat?"


def _session_with_fact(client: TestClient) -> str:
    sid = client.post("/v1/sessions", json={"window": 96}).json()["id"]
    history = [{"role": "user", "content": FACT}, {"role": "assistant", "content": "Lovely!"}]
    r = client.post(f"/v1/sessions/{sid}/messages", json={"messages": history + filler(4)})
    assert r.status_code == 200, r.text
    return sid


def _query(client: TestClient, sid: str, text: str = QUESTION) -> dict[str, Any]:
    r = client.post(f"/v1/sessions/{sid}/memory/query", json={"text": text, "top_tokens": 10})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_inspect_explain_forget(client: TestClient) -> None:
    sid = _session_with_fact(client)
    mem = client.get(f"/v1/sessions/{sid}/memory").json()
    assert mem["entries"] > 0 and mem["tokens"] > 0 and mem["bytes"] > 0
    assert mem["window"]["size"] == 96 and 0 < mem["window"]["tokens"] <= 96
    fact = next(m for m in mem["messages"] if m["message_id"] == 1)
    assert fact["content"] == FACT and fact["role"] == "user" and fact["tokens"] >= 8
    assert 0 < fact["min_strength"] <= fact["mean_strength"] <= 1
    assert fact["age_turns"] >= 0 and fact["turn_written"] >= 1
    assert 1 not in mem["window"]["message_ids"]

    explained = _query(client, sid)
    assert 0 < explained["memory_share"] < 1
    ids = [m["message_id"] for m in explained["messages"]]
    assert 1 in ids[:3], explained["messages"]
    fact_tokens = [t for t in explained["tokens"] if t["message_id"] == 1]
    assert fact_tokens and all(0 < t["weight"] <= 1 for t in fact_tokens)
    # a dry run: asking again gives the same read, and the transcript did not grow
    assert _query(client, sid) == explained
    assert client.get(f"/v1/sessions/{sid}/messages").json()["total"] == 11

    r = client.delete(f"/v1/sessions/{sid}/memory/messages/1")
    assert r.status_code == 200 and r.json()["removed_entries"] > 0
    mem = client.get(f"/v1/sessions/{sid}/memory").json()
    assert 1 not in [m["message_id"] for m in mem["messages"]]
    assert 1 not in [m["message_id"] for m in _query(client, sid)["messages"]]
    transcript = client.get(f"/v1/sessions/{sid}/messages").json()["data"]
    assert transcript[1]["content"] == FACT and transcript[1]["location"] == "forgotten"

    # a message still in the window can be forgotten too: it leaves the window
    last = mem["window"]["message_ids"][-1]
    assert client.delete(f"/v1/sessions/{sid}/memory/messages/{last}").status_code == 200
    assert last not in client.get(f"/v1/sessions/{sid}/memory").json()["window"]["message_ids"]

    r = client.delete(f"/v1/sessions/{sid}/memory")
    assert r.status_code == 200 and r.json()["removed_entries"] > 0
    mem = client.get(f"/v1/sessions/{sid}/memory").json()
    assert mem["entries"] == 0 and mem["messages"] == [] and mem["window"]["message_ids"] == [0]
    assert _query(client, sid)["messages"] == []
    assert client.get(f"/v1/sessions/{sid}/messages").json()["total"] == 11
    # the session goes on after forgetting everything
    r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "Hello", "max_tokens": 3})
    assert r.status_code == 200


def test_reads_survive_a_restart(make_client: ClientFactory, db_url: str) -> None:
    with make_client(db_url) as client:
        sid = _session_with_fact(client)
        client.post(f"/v1/sessions/{sid}/chat", json={"message": "Nice day.", "max_tokens": 4})
        before = _query(client, sid)
        listing = client.get(f"/v1/sessions/{sid}/memory").json()
    with make_client(db_url) as client:  # a new app over the same database
        assert _query(client, sid) == before
        after = client.get(f"/v1/sessions/{sid}/memory").json()
        # RAM bytes include spare capacity, which depends on the history of appends
        assert after.pop("bytes") > 0 and {**listing, "bytes": 0} == {**after, "bytes": 0}


def test_export_import_reproduces_reads(
    make_client: ClientFactory, sqlite_url: str, pg_url: str
) -> None:
    with make_client(sqlite_url) as client:
        sid = _session_with_fact(client)
        before = _query(client, sid)
        r = client.get(f"/v1/sessions/{sid}/export")
        assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
        doc = r.json()
    with make_client(pg_url) as other:  # another server, another database
        r = other.post("/v1/sessions/import", json=doc)
        assert r.status_code == 201, r.text
        new = r.json()["id"]
        assert new != sid and r.json()["messages"] == 11
        assert _query(other, new) == before
        transcript = other.get(f"/v1/sessions/{new}/messages").json()["data"]
        assert transcript[1]["content"] == FACT
        # and it goes on as a live session
        r = other.post(f"/v1/sessions/{new}/chat", json={"message": QUESTION, "max_tokens": 6})
        assert r.status_code == 200


def test_tampered_export_is_rejected_whole(make_client: ClientFactory, sqlite_url: str) -> None:
    with make_client(sqlite_url) as client:
        sid = _session_with_fact(client)
        doc = client.get(f"/v1/sessions/{sid}/export").json()
        total = client.get("/v1/sessions").json()["total"]

        tampered = json.loads(json.dumps(doc))
        chunk = tampered["tables"]["memory_chunks"][0]
        raw = bytearray(base64.b64decode(chunk["keys"]))
        raw[0] ^= 0xFF
        chunk["keys"] = base64.b64encode(bytes(raw)).decode()
        truncated = json.loads(json.dumps(doc))
        truncated["tables"]["messages"] = truncated["tables"]["messages"][:-1]
        for bad in (tampered, truncated, {"format": "something else"}, {}):
            r = client.post("/v1/sessions/import", json=bad)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "invalid_export"
        r = client.post(
            "/v1/sessions/import", content=b"[1, 2", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422
        assert client.get("/v1/sessions").json()["total"] == total
