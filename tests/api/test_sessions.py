"""Sessions, transcript and history import over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from memory_store.models import Base
from tests.api.support import FACT, ClientFactory, filler


def test_create_get_list_rename_delete(client: TestClient) -> None:
    r = client.post(
        "/v1/sessions",
        json={
            "title": "first",
            "system_prompt": "Be brief.",
            "window": 96,
            "memory": {"decay": 0.9},
        },
    )
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["title"] == "first" and s["window"] == 96 and s["memory"]["decay"] == 0.9
    assert s["system_prompt"] == "Be brief." and s["turn"] == 0 and s["messages"] == 1
    assert client.get(f"/v1/sessions/{s['id']}").json() == s
    ids = [s["id"]] + [client.post("/v1/sessions", json={}).json()["id"] for _ in range(2)]

    page = client.get("/v1/sessions", params={"limit": 2}).json()
    assert page["total"] == 3 and len(page["data"]) == 2
    rest = client.get("/v1/sessions", params={"limit": 2, "offset": 2}).json()
    assert {x["id"] for x in page["data"] + rest["data"]} == set(ids)

    r = client.patch(f"/v1/sessions/{ids[1]}", json={"title": "renamed"})
    assert r.status_code == 200 and r.json()["title"] == "renamed"

    assert client.delete(f"/v1/sessions/{ids[0]}").status_code == 204
    assert client.get(f"/v1/sessions/{ids[0]}").status_code == 404
    assert client.delete(f"/v1/sessions/{ids[0]}").status_code == 404
    assert client.get("/v1/sessions").json()["total"] == 2


def test_import_moves_overflow_to_memory(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json={"window": 96}).json()["id"]
    history = [{"role": "user", "content": FACT}, {"role": "assistant", "content": "Lovely!"}]
    r = client.post(f"/v1/sessions/{sid}/messages", json={"messages": history + filler(4)})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["message_ids"] == list(range(1, 11)) and out["memory_tokens"] > 0
    msgs = client.get(f"/v1/sessions/{sid}/messages").json()
    assert msgs["total"] == 11  # system block + 10
    by_id = {m["id"]: m for m in msgs["data"]}
    assert by_id[1]["content"] == FACT and by_id[1]["location"] == "memory"
    assert by_id[10]["location"] == "window"
    page = client.get(f"/v1/sessions/{sid}/messages", params={"limit": 3, "offset": 9}).json()
    assert [m["id"] for m in page["data"]] == [9, 10]


def test_delete_leaves_no_row_in_any_table(client: TestClient, db_url: str) -> None:
    keep = client.post("/v1/sessions", json={"window": 64}).json()["id"]
    sid = client.post("/v1/sessions", json={"window": 64}).json()["id"]
    for s in (keep, sid):
        r = client.post(f"/v1/sessions/{s}/messages", json={"messages": filler(3)})
        assert r.status_code == 200
    r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "Hello!", "max_tokens": 4})
    assert r.status_code == 200
    engine = create_engine(db_url)
    try:

        def rows(session_id: str) -> dict[str, int]:
            counts = {}
            with engine.connect() as conn:
                for table in Base.metadata.sorted_tables:
                    col = table.c.get("session_id")
                    if col is None:
                        col = table.c.id  # chat_sessions
                    counts[table.name] = conn.scalar(
                        select(func.count()).select_from(table).where(col == session_id)
                    )
            return counts

        before = rows(sid)
        assert before["messages"] > 0 and before["memory_chunks"] > 0
        assert before["message_states"] > 0
        assert client.delete(f"/v1/sessions/{sid}").status_code == 204
        assert set(rows(sid).values()) == {0}
        assert rows(keep)["memory_chunks"] > 0  # the other session is untouched
    finally:
        engine.dispose()
    assert client.get(f"/v1/sessions/{keep}/memory").status_code == 200


def test_user_errors_are_4xx_with_one_shape(make_client: ClientFactory, sqlite_url: str) -> None:
    with make_client(sqlite_url, max_message_chars=50, max_import_messages=3) as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]

        def check(r, status: int, param: str | None = None) -> None:  # type: ignore[no-untyped-def]
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert err["message"] and err["type"]
            if param is not None:
                assert err["param"] == param

        check(client.post("/v1/sessions", json={"window": 5}), 422, "window")
        check(client.post("/v1/sessions", json={"window": 10**9}), 422, "window")
        check(client.post("/v1/sessions", json={"colour": "red"}), 422, "colour")
        check(client.post("/v1/sessions", json={"memory": {"decay": 2}}), 422, "memory.decay")
        check(
            client.post(
                "/v1/sessions", content=b"{not json", headers={"content-type": "application/json"}
            ),
            422,
        )
        check(client.post(f"/v1/sessions/{sid}/chat", json={"message": ""}), 422, "message")
        check(client.post(f"/v1/sessions/{sid}/chat", json={"message": 5}), 422, "message")
        check(client.post(f"/v1/sessions/{sid}/chat", json={"message": "x" * 51}), 413, "message")
        bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
        check(client.post(f"/v1/sessions/{sid}/messages", json=bad_role), 422, "messages.0.role")
        many = {"messages": [{"role": "user", "content": "hi"}] * 4}
        check(client.post(f"/v1/sessions/{sid}/messages", json=many), 413, "messages")
        check(client.post(f"/v1/sessions/{sid}/messages", json={"messages": []}), 422, "messages")
        check(client.get("/v1/sessions", params={"limit": 0}), 422, "limit")
        check(client.delete(f"/v1/sessions/{sid}/memory/messages/999"), 404)
        check(client.delete(f"/v1/sessions/{sid}/memory/messages/0"), 422)  # the system prompt
        for method, path in [
            ("GET", "/v1/sessions/nope"),
            ("PATCH", "/v1/sessions/nope"),
            ("DELETE", "/v1/sessions/nope"),
            ("GET", "/v1/sessions/nope/messages"),
            ("POST", "/v1/sessions/nope/messages"),
            ("POST", "/v1/sessions/nope/chat"),
            ("GET", "/v1/sessions/nope/memory"),
            ("POST", "/v1/sessions/nope/memory/query"),
            ("DELETE", "/v1/sessions/nope/memory"),
            ("DELETE", "/v1/sessions/nope/memory/messages/1"),
            ("GET", "/v1/sessions/nope/export"),
            ("GET", "/v1/sessions/..%2F..%2Fetc%2Fpasswd"),
        ]:
            body = {
                "PATCH": {"title": "x"},
                "POST": {
                    "messages": [{"role": "user", "content": "hi"}],
                    "message": "hi",
                    "text": "hi",
                },
            }.get(method)
            if path.endswith("/messages") and method == "POST":
                body = {"messages": [{"role": "user", "content": "hi"}]}
            elif path.endswith("/chat"):
                body = {"message": "hi"}
            elif path.endswith("/query"):
                body = {"text": "hi"}
            r = client.request(method, path, json=body)
            check(r, 404)
