"""Chat turns over HTTP: whole and streamed, stop strings, busy sessions, cancellation."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from tests.api.support import FACT, ClientFactory, filler, sse_events


def test_chat_whole_and_streamed(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json={"window": 96}).json()["id"]
    history = [{"role": "user", "content": FACT}, {"role": "assistant", "content": "Lovely!"}]
    client.post(f"/v1/sessions/{sid}/messages", json={"messages": history + filler(4)})

    r = client.post(
        f"/v1/sessions/{sid}/chat", json={"message": "What is my cat called?", "max_tokens": 10}
    )
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["reply"].strip() and whole["finish_reason"] in ("stop", "length")
    u = whole["usage"]
    assert (
        u["completion_tokens"] > 0
        and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    )
    assert u["memory_tokens"] > 0 and u["memory_tokens_read"] > 0
    read = whole["memory_read"]
    assert 0 < read["memory_share"] < 1 and read["messages"]
    assert abs(sum(m["weight"] for m in read["messages"]) - 1) < 0.5  # top 5 of the mass
    assert all(set(m["bands"]) == {"lower", "middle", "upper"} for m in read["messages"])

    with client.stream(
        "POST",
        f"/v1/sessions/{sid}/chat",
        json={"message": "Name a colour.", "stream": True, "max_tokens": 8},
    ) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"delta"} and len(kinds) >= 3
    text = "".join(d["text"] for e, d in events if e == "delta")
    done = events[-1][1]
    assert done["reply"] == text and done["usage"]["completion_tokens"] > 0
    assert done["message_id"] == whole["message_id"] + 2

    transcript = client.get(f"/v1/sessions/{sid}/messages", params={"offset": 11}).json()["data"]
    assert [(m["role"], m["content"]) for m in transcript] == [
        ("user", "What is my cat called?"),
        ("assistant", whole["reply"]),
        ("user", "Name a colour."),
        ("assistant", text),
    ]


def test_stop_strings_cut_the_reply(make_client: ClientFactory, sqlite_url: str) -> None:
    with make_client(sqlite_url) as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        r = client.post(
            f"/v1/sessions/{sid}/chat",
            json={"message": "Count from 1 to 10 with commas.", "max_tokens": 30},
        ).json()
        assert "3" in r["reply"]
        sid = client.post("/v1/sessions", json={}).json()["id"]
        r2 = client.post(
            f"/v1/sessions/{sid}/chat",
            json={"message": "Count from 1 to 10 with commas.", "max_tokens": 30, "stop": ["3"]},
        ).json()
        assert r2["finish_reason"] == "stop" and "3" not in r2["reply"]
        assert r["reply"].startswith(r2["reply"])


def test_busy_session_answers_409_and_a_cancelled_stream_is_kept(
    make_client: ClientFactory, db_url: str
) -> None:
    with make_client(db_url, lock_timeout=0.5, max_new_tokens=200) as client:
        sid = client.post("/v1/sessions", json={"window": 256}).json()["id"]
        started, release = threading.Event(), threading.Event()
        seen: list[str] = []

        def long_turn() -> None:
            body = {
                "message": "Write a long story about a dragon.",
                "stream": True,
                "max_tokens": 200,
            }
            with client.stream("POST", f"/v1/sessions/{sid}/chat", json=body) as s:
                for line in s.iter_lines():
                    if line.startswith("data:"):
                        seen.append(line)
                        started.set()
                    if release.is_set():
                        break  # the client goes away mid-reply

        t = threading.Thread(target=long_turn)
        t.start()
        assert started.wait(60)
        r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "Hi"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy"
        r = client.post(
            f"/v1/sessions/{sid}/messages", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status_code == 409
        release.set()
        t.join(60)
        # the cancelled turn was committed with the text generated so far; the session is free
        for _ in range(100):
            r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "Hi", "max_tokens": 2})
            if r.status_code != 409:
                break
        assert r.status_code == 200
        msgs = client.get(f"/v1/sessions/{sid}/messages").json()["data"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
        story = msgs[2]["content"]
        assert story and len(seen) >= 1 and msgs[2]["tokens"] < 200 + 10


def test_min_tokens_holds_the_reply_open(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json={}).json()["id"]
    ask = {"message": "Say hello.", "max_tokens": 60}
    short = client.post(f"/v1/sessions/{sid}/chat", json=ask).json()
    # the model ends this reply by itself, well before the cap: the case min_tokens is for
    n = short["usage"]["completion_tokens"]
    assert short["finish_reason"] == "stop" and n <= 40
    held = client.post(f"/v1/sessions/{sid}/chat", json={**ask, "min_tokens": n + 10}).json()
    assert held["usage"]["completion_tokens"] >= n + 10

    r = client.post(f"/v1/sessions/{sid}/chat", json={**ask, "min_tokens": 61})
    assert r.status_code == 422 and r.json()["error"]["param"] == "min_tokens"
    assert "exceeds max_tokens" in r.json()["error"]["message"]
    r = client.post(f"/v1/sessions/{sid}/chat", json={**ask, "min_tokens": -1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "min_tokens"
