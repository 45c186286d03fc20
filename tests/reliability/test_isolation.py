"""Isolation, extending tests/api/test_auth.py (which tries every route with a session id in its
path): here every ``/v1`` operation of the app, read from its OpenAPI schema so that a new
endpoint cannot be missed, is called by tenant B aimed at tenant A's session (its id in the path,
in ``X-Session-Id`` and ``user``), and no answer may carry or change anything of A's. The number
of cross-tenant reads is counted and must be 0."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from tests.api.support import FACT, ClientFactory, filler
from tests.api.test_auth import SESSION_ROUTES, bearer, make_keys
from tests.reliability.support import session_rows

# Operations without a session id in the path, with a request of B's that names A's session
# where the operation lets a request name one
OTHER_ROUTES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/v1/sessions"): {},
    ("POST", "/v1/sessions"): {"json": {"title": "B's own"}},
    ("POST", "/v1/sessions/import"): {"json": "EXPORT"},
    ("GET", "/v1/models"): {},
    ("POST", "/v1/chat/completions"): {
        "json": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    },
}


def test_no_operation_reads_across_tenants(make_client: ClientFactory, db_url: str) -> None:
    keys = make_keys(db_url, "tenant-a", "tenant-b")
    a, b = bearer(keys["tenant-a"]), bearer(keys["tenant-b"])
    with make_client(db_url, auth_enabled=True) as client:
        client: TestClient  # type: ignore[no-redef]
        sid = client.post("/v1/sessions", json={"window": 96}, headers=a).json()["id"]
        history = [{"role": "user", "content": FACT}] + filler(3)
        r = client.post(f"/v1/sessions/{sid}/messages", json={"messages": history}, headers=a)
        assert r.status_code == 200, r.text
        doc = client.get(f"/v1/sessions/{sid}/export", headers=b | a).json()
        secret = "Pumpkin"
        rows = session_rows(db_url, sid)

        operations = {
            (m.upper(), p)
            for p, ops in client.get("/openapi.json").json()["paths"].items()
            if p.startswith("/v1/")
            for m in ops
        }
        session_ops = {
            (m, p.replace("{sid}", "{session_id}").replace("/1", "/{message_id}"))
            for m, p, _ in SESSION_ROUTES
        }
        assert operations == session_ops | set(OTHER_ROUTES), "classify the new operation here"

        cross_reads, calls = 0, 0
        for method, path, body in SESSION_ROUTES:
            for mid in ("1", "0", "99"):
                url = path.format(sid=sid).replace("/messages/1", f"/messages/{mid}")
                r = client.request(method, url, json=body, headers=b)
                calls += 1
                cross_reads += r.status_code != 404 or secret in r.text
        for (method, path), kwargs in OTHER_ROUTES.items():
            kw = dict(kwargs)
            if kw.get("json") == "EXPORT":
                kw["json"] = doc
            for extra in ({}, {"X-Session-Id": sid}, {"X-Session-Id": "A's"}):
                body = kw.get("json")
                if isinstance(body, dict) and "messages" in body:
                    kw["json"] = {**body, "user": sid}
                r = client.request(method, path, headers=b | extra, **kw)
                calls += 1
                assert r.status_code < 400, (method, path, r.text)
                text = r.text if method != "POST" or "import" not in path else ""
                # the answer holds nothing of A's (an import of A's export is B's own copy)
                cross_reads += secret in text or sid in json.dumps(
                    {k: v for k, v in r.headers.items()}
                ) or (sid in text and "import" not in path)  # fmt: skip
        assert cross_reads == 0, f"{cross_reads} of {calls} calls reached tenant A's session"
        assert session_rows(db_url, sid) == rows  # A's session is untouched, row by row
        # B's sessions are B's: none is A's, and A still sees only its own
        b_ids = {s["id"] for s in client.get("/v1/sessions", headers=b).json()["data"]}
        assert sid not in b_ids and len(b_ids) >= 2
        a_ids = {s["id"] for s in client.get("/v1/sessions", headers=a).json()["data"]}
        assert a_ids == {sid}
        print(f"\nisolation: {calls} calls by tenant B at tenant A's session, {cross_reads} reads")
