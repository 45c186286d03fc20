"""Two app instances over one PostgreSQL database, as two server processes would be: turns of
one session alternate between them without loss, and a turn running on one makes the other wait
(advisory lock), then answer 409."""

from __future__ import annotations

import threading

from tests.api.support import ClientFactory, filler


def test_turns_alternate_between_two_servers(make_client: ClientFactory, pg_url: str) -> None:
    with make_client(pg_url, window=96) as a, make_client(pg_url, window=96) as b:
        sid = a.post("/v1/sessions", json={}).json()["id"]
        assert (
            a.post(f"/v1/sessions/{sid}/messages", json={"messages": filler(3)}).status_code == 200
        )
        sent = []
        for i, client in enumerate([b, a, b, a]):
            text = f"Message number {i}, please answer briefly."
            r = client.post(f"/v1/sessions/{sid}/chat", json={"message": text, "max_tokens": 4})
            assert r.status_code == 200, r.text
            sent.append(text)
        msgs = b.get(f"/v1/sessions/{sid}/messages", params={"limit": 100}).json()["data"]
        assert [m["id"] for m in msgs] == list(range(len(msgs)))
        users = [m["content"] for m in msgs if m["role"] == "user"]
        assert users[-4:] == sent
        assert a.get(f"/v1/sessions/{sid}").json()["turn"] == 7
        # both see the same memory
        ma = a.get(f"/v1/sessions/{sid}/memory").json()
        mb = b.get(f"/v1/sessions/{sid}/memory").json()
        assert ma["messages"] == mb["messages"] and ma["entries"] == mb["entries"] > 0


def test_a_turn_on_one_server_blocks_the_other(make_client: ClientFactory, pg_url: str) -> None:
    with (
        make_client(pg_url, lock_timeout=0.5, max_new_tokens=200) as a,
        make_client(pg_url, lock_timeout=0.5) as b,
    ):
        sid = a.post("/v1/sessions", json={"window": 256}).json()["id"]
        started, release = threading.Event(), threading.Event()

        def long_turn() -> None:
            body = {"message": "Tell me a long story.", "stream": True, "max_tokens": 200}
            with a.stream("POST", f"/v1/sessions/{sid}/chat", json=body) as s:
                for line in s.iter_lines():
                    if line.startswith("data:"):
                        started.set()
                    if release.is_set():
                        break

        t = threading.Thread(target=long_turn)
        t.start()
        try:
            assert started.wait(60)
            r = b.post(f"/v1/sessions/{sid}/chat", json={"message": "Hi", "max_tokens": 2})
            assert r.status_code == 409, r.text
            assert "another server process" in r.json()["error"]["message"]
        finally:
            release.set()
            t.join(60)
        for _ in range(100):
            r = b.post(f"/v1/sessions/{sid}/chat", json={"message": "Hi", "max_tokens": 2})
            if r.status_code != 409:
                break
        assert r.status_code == 200
        roles = [m["role"] for m in b.get(f"/v1/sessions/{sid}/messages").json()["data"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
