"""Bad input, beyond what tests/api already tries (invalid JSON on create, a wrong type or an empty
or long chat message, an unknown role in an import, a window out of range, one traversal path, an
export with a flipped byte or a missing row): bodies that are not UTF-8 or not objects, NaN and
huge numbers, control characters and NUL (which PostgreSQL's text refuses), negative and huge
sizes, traversal and odd characters in ids, bad OpenAI requests, and export files edited with a
recomputed checksum. Each gets a 4xx in the one error shape (never a 5xx), and nothing of a
refused request is stored. On SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from memory_store.models import Base
from memory_store.transfer import document_checksum
from tests.api.support import FACT, ClientFactory, filler

JSON_HEADERS = {"content-type": "application/json"}


def _all_rows(url: str) -> dict[str, int]:
    """Rows in every table: a refused request must leave them all as they were."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                t.name: int(conn.scalar(select(func.count()).select_from(t)) or 0)
                for t in Base.metadata.sorted_tables
            }
    finally:
        engine.dispose()


def _check(r: Any, allowed: set[int], what: str) -> None:
    assert r.status_code in allowed, (what, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"], (what, err)


@pytest.fixture()
def session(make_client: ClientFactory, db_url: str) -> Any:
    """(client, session id, url) of a session with memory."""
    with make_client(db_url, max_message_chars=2000, max_import_messages=50) as client:
        sid = client.post("/v1/sessions", json={"window": 96}).json()["id"]
        history = [{"role": "user", "content": FACT}] + filler(3)
        r = client.post(f"/v1/sessions/{sid}/messages", json={"messages": history})
        assert r.status_code == 200, r.text
        yield client, sid, db_url


def test_bodies_numbers_and_characters(session: Any) -> None:
    client, sid, url = session
    before = _all_rows(url)
    chat, imp, query = (
        f"/v1/sessions/{sid}/chat",
        f"/v1/sessions/{sid}/messages",
        (f"/v1/sessions/{sid}/memory/query"),
    )
    raw: list[tuple[str, str, bytes]] = []
    for path in ("/v1/sessions", chat, imp, query, "/v1/sessions/import", "/v1/chat/completions"):
        for body in (
            b"\xff\xfe\x00garbage",  # not UTF-8
            b'{"message": "caf\xe9"}',  # Latin-1 inside JSON
            b"",
            b"null",
            b"[]",
            b'"a string"',
            b"12",
            b"{" * 10000 + b"}" * 10000,  # deep nesting
            b'{"message": "hi",}',  # trailing comma
        ):
            raw.append(("POST", path, body))
    for method, path, body in raw:
        _check(client.request(method, path, content=body, headers=JSON_HEADERS), {400, 422}, path)
    r = client.post(chat, content=b"\xff\xfe", headers=JSON_HEADERS)
    assert r.status_code in (400, 422)
    assert r.json()["error"]["code"] in ("invalid_body", "invalid_value")
    r = client.post(chat, content=b'{"message": "hi"}', headers={"content-type": "text/plain"})
    _check(r, {415, 422}, "not JSON content type")

    bad_json: list[tuple[str, dict[str, Any]]] = [
        ("/v1/sessions", {"window": -1}),
        ("/v1/sessions", {"window": 0}),
        ("/v1/sessions", {"window": 10**30}),
        ("/v1/sessions", {"window": 96.5}),
        ("/v1/sessions", {"window": "96; DROP TABLE messages"}),
        ("/v1/sessions", {"memory": {"capacity": -5}}),
        ("/v1/sessions", {"memory": {"capacity": 0}}),
        ("/v1/sessions", {"memory": {"capacity": 10**30}}),
        ("/v1/sessions", {"memory": {"top_k": -1}}),
        ("/v1/sessions", {"memory": {"decay": -0.5}}),
        ("/v1/sessions", {"memory": {"exact_max": 1}}),  # not a client's to set
        ("/v1/sessions", {"memory": "lots"}),
        ("/v1/sessions", {"title": ["a"]}),
        ("/v1/sessions", {"title": "x" * 201}),
        ("/v1/sessions", {"system_prompt": "word " * 5000}),  # over half the window
        (chat, {"message": None}),
        (chat, {"message": ["hi"]}),
        (chat, {"message": {"text": "hi"}}),
        (chat, {"message": "hi", "max_tokens": -1}),
        (chat, {"message": "hi", "max_tokens": 10**12}),
        (chat, {"message": "hi", "temperature": -1}),
        (chat, {"message": "hi", "top_p": 0}),
        (chat, {"message": "hi", "stop": "x"}),
        (chat, {"message": "hi", "stop": ["x"] * 100}),
        (chat, {"message": "hi", "seed": "abc"}),
        (chat, {"message": "hi", "role": "system"}),
        (chat, {"message": "x" * 2001}),
        (chat, {"message": "tok " * 1500}),  # under the character limit, over the window
        (imp, {"messages": [{"role": "tool", "content": "x"}]}),
        (imp, {"messages": [{"role": "USER", "content": "x"}]}),
        (imp, {"messages": [{"role": "user"}]}),
        (imp, {"messages": [{"role": "user", "content": 5}]}),
        (imp, {"messages": [{"role": "user", "content": "x", "name": "bob"}]}),
        (imp, {"messages": {"role": "user", "content": "x"}}),
        (imp, {"messages": [{"role": "user", "content": "tok " * 400}]}),  # over the window
        (imp, {"messages": [{"role": "user", "content": "x"}] * 51}),
        (query, {"text": ""}),
        (query, {"text": "x", "top_tokens": 0}),
        (query, {"text": "x", "top_tokens": 10**9}),
    ]
    for path, body in bad_json:
        _check(client.post(path, json=body), {413, 422}, f"{path} {body}"[:120])
    for text in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = f'{{"message": "hi", "temperature": {text}}}'.encode()
        _check(client.post(chat, content=body, headers=JSON_HEADERS), {422}, text)
        body = f'{{"memory": {{"decay": {text}}}}}'.encode()
        _check(client.post("/v1/sessions", content=body, headers=JSON_HEADERS), {422}, text)
    assert _all_rows(url) == before, "a refused request stored something"

    # control characters, NUL (refused by PostgreSQL's text type), lone surrogates, odd scripts:
    # stored as sent where the database can hold them, a clear 422 where it cannot
    nasty = ["\x00", "a\x00b", "\x1b[31mred\x1b[0m", "\u202eevil", "\ud800", "\r\n\t\x7f"]
    nasty.append("😀" * 10)
    n = 0
    for text in nasty:
        for method, path, body in (
            ("POST", "/v1/sessions", {"title": text, "system_prompt": text}),
            ("PATCH", f"/v1/sessions/{sid}", {"title": text}),
            ("POST", imp, {"messages": [{"role": "user", "content": text}]}),
            ("POST", chat, {"message": text, "max_tokens": 2}),
            ("POST", query, {"text": text}),
        ):
            payload = json.dumps(body).encode()  # ASCII escapes: lone surrogates survive
            r = client.request(method, path, content=payload, headers=JSON_HEADERS)
            n += 1
            _check(r, {200, 201, 422}, f"{method} {path} {text!r}")
            if r.status_code == 422 and r.json()["error"]["code"] == "invalid_value":
                assert r.json()["error"]["param"], r.json()
    listed = client.get(f"/v1/sessions/{sid}/messages", params={"limit": 1000})
    assert listed.status_code == 200
    contents = [m["content"] for m in listed.json()["data"]]
    assert "\x1b[31mred\x1b[0m" in contents and "😀" * 10 in contents
    assert n == len(nasty) * 5


def test_ids_headers_and_queries(session: Any) -> None:
    client, sid, url = session
    before = _all_rows(url)
    odd_ids = [
        "..",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..%5C..%5Cwindows",
        "%00",
        sid + "%00",
        sid + "%2F..",
        "x" * 201,
        "%27%20OR%201%3D1--",
        "%F0%9F%98%80",
        sid.upper(),
    ]
    for bad in odd_ids:
        for method, path, body in (
            ("GET", "/v1/sessions/{}", None),
            ("GET", "/v1/sessions/{}/export", None),
            ("DELETE", "/v1/sessions/{}", None),
            ("POST", "/v1/sessions/{}/chat", {"message": "hi"}),
            ("DELETE", "/v1/sessions/{}/memory", None),
        ):
            r = client.request(method, path.format(bad), json=body)
            _check(r, {404, 405, 422}, f"{method} {path.format(bad)}"[:100])
    for mid in ("-1", "abc", "1.5", "99999999999999999999999999", str(2**63), "%00", "1%2F..%2F2"):
        r = client.delete(f"/v1/sessions/{sid}/memory/messages/{mid}")
        _check(r, {404, 422}, f"message id {mid}")
    for params in (
        {"limit": -1},
        {"limit": 10**20},
        {"offset": -5},
        {"offset": "x"},
        {"limit": "1e3"},
    ):
        _check(client.get("/v1/sessions", params=params), {422}, str(params))
        _check(client.get(f"/v1/sessions/{sid}/messages", params=params), {422}, str(params))
        _check(client.get(f"/v1/sessions/{sid}/memory", params=params), {422}, str(params))
    for top in ("-1", "0", "99999999999999999999", "x"):
        r = client.get(f"/v1/sessions/{sid}/memory/last-read", params={"top_tokens": top})
        _check(r, {200, 422}, f"top_tokens {top}")

    # the OpenAI endpoint
    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for body in (
        {**ok, "messages": []},
        {**ok, "messages": [{"role": "wizard", "content": "hi"}]},
        {**ok, "messages": [{"role": "user", "content": 5}]},
        {**ok, "messages": [{"role": "user"}]},
        {**ok, "messages": [{"role": "assistant", "content": "last is not the user's"}]},
        {**ok, "max_tokens": -3},
        {**ok, "n": 3},
        {**ok, "temperature": 9},
        {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "x": 1}]}]},
    ):
        _check(client.post("/v1/chat/completions", json=body), {400, 404, 413, 422}, str(body))
    for header in ("x" * 201, "../../etc/passwd" + "/" * 200):
        r = client.post("/v1/chat/completions", json=ok, headers={"X-Session-Id": header})
        _check(r, {422}, "X-Session-Id")
    for user in ("a\x00b", "\ud800", "x" * 201):
        payload = json.dumps({**ok, "user": user}).encode()
        r = client.post("/v1/chat/completions", content=payload, headers=JSON_HEADERS)
        _check(r, {422}, f"user {user!r}")
    assert _all_rows(url) == before, "a refused request stored something"


def test_edited_exports_are_refused_whole(session: Any) -> None:
    """Edits with a recomputed checksum (so that only the import's own checks stand between the
    file and the database): each is a 422 naming the problem, and no row is written."""
    client, sid, url = session
    r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "Hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    doc = client.get(f"/v1/sessions/{sid}/export").json()
    before = _all_rows(url)

    def edited(change: Any) -> dict[str, Any]:
        d = copy.deepcopy(doc)
        change(d)
        d["checksum"] = document_checksum(d)
        return d

    def blob(d: dict[str, Any], table: str, col: str, new: bytes) -> None:
        d["tables"][table][0][col] = base64.b64encode(new).decode()

    first_msg = 1  # the fact: in memory
    edits: list[tuple[str, Any]] = [
        ("checksum only", lambda d: None),
        ("a short key blob", lambda d: blob(d, "memory_chunks", "keys", b"\x00" * 6)),
        ("a short window state", lambda d: blob(d, "message_states", "keys", b"\x00" * 10)),
        ("not base64", lambda d: d["tables"]["memory_chunks"][0].update(keys="!!notb64!!")),
        ("an unknown role", lambda d: d["tables"]["messages"][first_msg].update(role="robot")),
        ("a number for text", lambda d: d["tables"]["messages"][first_msg].update(content=7)),
        ("a duplicate message", lambda d: d["tables"]["messages"].append(
            copy.deepcopy(d["tables"]["messages"][first_msg]))),
        ("a negative window", lambda d: d["session"].update(window=-5)),
        ("a huge window", lambda d: d["session"].update(window=10**9)),
        ("a wrong memory shape", lambda d: d["session"].update(memory_shape=[1, 1, 1, 1])),
        ("a huge chunk n", lambda d: d["tables"]["memory_chunks"][0].update(n=10**12)),
        ("tables as a list", lambda d: d.update(tables=[])),
        ("a missing table", lambda d: d["tables"].pop("memory_chunks")),
        ("an unknown table", lambda d: d["tables"].update(api_keys=[{"hash": "x"}])),
        ("an unknown column", lambda d: d["tables"]["messages"][0].update(tenant_id="other")),
        ("a session id", lambda d: d["session"].update(id="0" * 32)),
        ("a tenant", lambda d: d["session"].update(tenant_id="someone-else")),
        ("a later version", lambda d: d.update(version=99)),
        ("a bad date", lambda d: d["session"].update(created_at="yesterday")),
        ("a NUL in a message",
         lambda d: d["tables"]["messages"][first_msg].update(content="a\x00")),
    ]  # fmt: skip
    results = {}
    for what, change in edits:
        r = client.post("/v1/sessions/import", json=edited(change))
        results[what] = r.status_code
        if what == "checksum only":
            assert r.status_code == 201, r.text  # the unchanged file still imports
            client.delete(f"/v1/sessions/{r.json()['id']}")
            continue
        assert r.status_code == 422, (what, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["code"] == "invalid_export" and err["message"].startswith("invalid export"), err
        assert _all_rows(url) == before, f"{what}: something was imported"
    assert len(results) == len(edits)
