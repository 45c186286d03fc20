"""Auth and limits: API keys (hashed, per tenant), tenant isolation on every route, the per-key
rate limit, the session quota, the memory capacity bound, the refusal to serve without auth
beyond loopback, and ``python -m app keys``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from app.api.deps import owned_session_id
from app.auth import create_key, list_keys, revoke_key
from app.config import InsecureConfig, Settings, check_exposure, is_loopback
from app.db import make_sessionmaker
from app.main import create_app
from app.model import LoadedModel
from app.serving import serve_in_thread
from memory_store.models import ApiKey, Base, ChatSession, Tenant
from tests.api.support import FACT, ClientFactory, filler

ROOT = Path(__file__).resolve().parents[2]
UNKNOWN = "0" * 32


def make_keys(url: str, *tenants: str) -> dict[str, str]:
    """A fresh key for each tenant (created with it), as the CLI makes them."""
    db = make_sessionmaker(url)
    try:
        return {t: create_key(db, t, name=f"{t} test")[0] for t in tenants}
    finally:
        db.kw["bind"].dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def check_error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"], err
    return err


@pytest.fixture()
def tenants(make_client: ClientFactory, db_url: str) -> Iterator[tuple[TestClient, dict, dict]]:
    """(client of an app with auth on, headers of tenant A, headers of tenant B)."""
    keys = make_keys(db_url, "tenant-a", "tenant-b")
    with make_client(db_url, auth_enabled=True) as client:
        yield client, bearer(keys["tenant-a"]), bearer(keys["tenant-b"])


# --- keys ----------------------------------------------------------------------------------------


def test_a_key_is_required_and_checked(make_client: ClientFactory, db_url: str) -> None:
    keys = make_keys(db_url, "acme")
    with make_client(db_url, auth_enabled=True) as client:
        for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, {"X-API-Key": ""}):
            r = client.get("/v1/sessions", headers=headers)
            check_error(r, 401, "missing_api_key")
            assert r.headers["WWW-Authenticate"] == "Bearer"
        for bad in ("nope", "mc_" + "x" * 43, keys["acme"] + "x", keys["acme"][:-1]):
            r = client.get("/v1/sessions", headers=bearer(bad))
            err = check_error(r, 401, "invalid_api_key")
            assert err["type"] == "authentication_error"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        # every route under /v1 (all of them, from the OpenAPI schema) wants a key
        paths = client.get("/openapi.json").json()["paths"]
        assert len(paths) >= 10
        for path, ops in paths.items():
            url = path.replace("{session_id}", UNKNOWN).replace("{message_id}", "1")
            for method in ops:
                r = client.request(method.upper(), url, json={})
                if path.startswith("/v1/"):
                    check_error(r, 401, "missing_api_key")
                else:
                    assert r.status_code == 200, path  # /livez, /readyz
        # the key as a Bearer token or in X-API-Key
        assert client.get("/v1/sessions", headers=bearer(keys["acme"])).status_code == 200
        assert client.get("/v1/sessions", headers={"X-API-Key": keys["acme"]}).status_code == 200
        # health, metrics and the page stay open
        for path in ("/livez", "/readyz", "/metrics", "/", "/static/app.js"):
            assert client.get(path).status_code == 200, path
        # a revoked key stops working at once
        db = make_sessionmaker(db_url, migrate=False)
        revoke_key(db, keys["acme"][:11])
        check_error(
            client.get("/v1/sessions", headers=bearer(keys["acme"])), 401, "invalid_api_key"
        )
        # only the hash is stored, and the use was noted
        with db() as s:
            row = s.scalars(select(ApiKey)).one()
            assert row.hash == hashlib.sha256(keys["acme"].encode()).hexdigest()
            assert row.prefix == keys["acme"][:11] and row.last_used_at is not None
            assert keys["acme"] not in repr([row.hash, row.prefix, row.name])
        db.kw["bind"].dispose()


def test_auth_off_acts_as_the_local_tenant(make_client: ClientFactory, sqlite_url: str) -> None:
    keys = make_keys(sqlite_url, "acme")
    with make_client(sqlite_url) as client:  # auth off: keys are neither needed nor looked at
        sid = client.post("/v1/sessions", json={"title": "mine"}).json()["id"]
        assert client.get("/v1/sessions", headers=bearer("junk")).json()["total"] == 1
    with make_client(sqlite_url, auth_enabled=True) as client:
        # the local tenant's sessions are not another tenant's
        r = client.get(f"/v1/sessions/{sid}", headers=bearer(keys["acme"]))
        check_error(r, 404, "session_not_found")
    local = make_keys(sqlite_url, "local")["local"]  # a key of the tenant "local" reaches them
    with make_client(sqlite_url, auth_enabled=True) as client:
        assert client.get(f"/v1/sessions/{sid}", headers=bearer(local)).json()["title"] == "mine"


# --- isolation -----------------------------------------------------------------------------------

# Every route that takes a session id, with a request to it (session id and message id filled in)
SESSION_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/sessions/{sid}", None),
    ("PATCH", "/v1/sessions/{sid}", {"title": "taken over"}),
    ("DELETE", "/v1/sessions/{sid}", None),
    ("GET", "/v1/sessions/{sid}/messages", None),
    ("POST", "/v1/sessions/{sid}/messages", {"messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/v1/sessions/{sid}/chat", {"message": "What is my cat called?"}),
    ("GET", "/v1/sessions/{sid}/memory", None),
    ("POST", "/v1/sessions/{sid}/memory/query", {"text": "cat"}),
    ("GET", "/v1/sessions/{sid}/memory/last-read", None),
    ("DELETE", "/v1/sessions/{sid}/memory/messages/1", None),
    ("DELETE", "/v1/sessions/{sid}/memory", None),
    ("GET", "/v1/sessions/{sid}/export", None),
]


def test_every_session_route_checks_the_owner() -> None:
    """Each route with a session id in its path resolves it through `owned_session_id`, and
    SESSION_ROUTES (what the isolation test tries) lists them all."""

    def calls(dependant: Any) -> set[Any]:
        out = {dependant.call}
        for d in dependant.dependencies:
            out |= calls(d)
        return out

    def api_routes(routes: Any) -> Iterator[APIRoute]:
        for route in routes:
            if isinstance(route, APIRoute):
                yield route
            elif hasattr(route, "original_router"):  # FastAPI >= 0.165: included routers
                yield from api_routes(route.original_router.routes)

    app = create_app(Settings(_env_file=None))
    found = set()
    for route in api_routes(app.routes):
        if "{session_id}" in route.path:
            assert owned_session_id in calls(route.dependant), route.path
            found |= {(m, route.path) for m in route.methods or ()}
    tried = {
        (m, p.replace("{sid}", "{session_id}").replace("/messages/1", "/messages/{message_id}"))
        for m, p, _ in SESSION_ROUTES
    }
    assert found == tried


def _state(client: TestClient, headers: dict[str, str], sid: str) -> dict[str, Any]:
    """Everything the API shows of a session (but the time it was last touched)."""
    session = client.get(f"/v1/sessions/{sid}", headers=headers).json()
    memory = client.get(f"/v1/sessions/{sid}/memory", headers=headers).json()
    return {
        "session": session,
        "messages": client.get(f"/v1/sessions/{sid}/messages", headers=headers).json(),
        "memory": memory,
        "export": client.get(f"/v1/sessions/{sid}/export", headers=headers).json()["tables"],
    }


def _rows(db_url: str, sid: str) -> dict[str, int]:
    """Rows of the session in each table that holds a session's rows."""
    engine = create_engine(db_url)
    try:
        counts = {}
        with engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                col = table.c.get("session_id")
                if col is None and table.name == ChatSession.__tablename__:
                    col = table.c.id
                if col is not None:
                    q = select(func.count()).select_from(table).where(col == sid)
                    counts[table.name] = int(conn.scalar(q) or 0)
        return counts
    finally:
        engine.dispose()


def test_another_tenants_session_is_not_found_anywhere(
    tenants: tuple[TestClient, dict, dict], db_url: str
) -> None:
    client, a, b = tenants
    sid = client.post("/v1/sessions", json={"title": "A's", "window": 96}, headers=a).json()["id"]
    history = [{"role": "user", "content": FACT}, {"role": "assistant", "content": "Lovely!"}]
    r = client.post(
        f"/v1/sessions/{sid}/messages", json={"messages": history + filler(4)}, headers=a
    )
    assert r.status_code == 200, r.text
    r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "Hi", "max_tokens": 3}, headers=a)
    assert r.status_code == 200, r.text
    mine = client.post("/v1/sessions", json={"title": "B's"}, headers=b).json()["id"]
    before, rows = _state(client, a, sid), _rows(db_url, sid)
    assert before["memory"]["entries"] > 0 and rows["memory_chunks"] > 0

    for method, path, body in SESSION_ROUTES:
        theirs = client.request(method, path.format(sid=sid), json=body, headers=b)
        unknown = client.request(method, path.format(sid=UNKNOWN), json=body, headers=b)
        # the same answer as for an id that does not exist: nothing tells the session is there
        assert theirs.status_code == unknown.status_code == 404, (method, path, theirs.text)
        assert (
            theirs.json()
            == unknown.json()
            == {
                "error": {
                    "message": "session not found",
                    "type": "not_found_error",
                    "code": "session_not_found",
                    "param": None,
                }
            }
        )
    r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "x", "stream": True}, headers=b)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"

    # lists: each tenant sees its own only
    listed = client.get("/v1/sessions", headers=a).json()
    assert [s["id"] for s in listed["data"]] == [sid] and listed["total"] == 1
    listed = client.get("/v1/sessions", headers=b).json()
    assert [s["id"] for s in listed["data"]] == [mine] and listed["total"] == 1

    # an export of A's imported by B is B's own copy
    doc = client.get(f"/v1/sessions/{sid}/export", headers=a).json()
    r = client.post("/v1/sessions/import", json=doc, headers=b)
    assert r.status_code == 201, r.text
    copy = r.json()["id"]
    assert copy != sid and client.get(f"/v1/sessions/{copy}", headers=a).status_code == 404
    assert {s["id"] for s in client.get("/v1/sessions", headers=b).json()["data"]} == {mine, copy}
    assert client.get("/v1/sessions", headers=a).json()["total"] == 1

    # A's session is exactly as it was, every row still there
    assert _state(client, a, sid) == before
    assert _rows(db_url, sid) == rows

    # deleting it leaves no row of it; B's copy is untouched
    copy_rows = _rows(db_url, copy)
    assert client.delete(f"/v1/sessions/{sid}", headers=a).status_code == 204
    assert set(_rows(db_url, sid).values()) == {0}
    assert _rows(db_url, copy) == copy_rows
    check_error(client.get(f"/v1/sessions/{sid}", headers=a), 404, "session_not_found")


def test_openai_endpoint_names_sessions_per_tenant(
    tenants: tuple[TestClient, dict, dict],
) -> None:
    client, a, b = tenants

    def complete(headers: dict[str, str], session: str | None, **extra: Any) -> Any:
        body = {"model": "memchat", "max_tokens": 3, **extra}
        body.setdefault("messages", [{"role": "user", "content": "Hello"}])
        h = headers | ({"X-Session-Id": session} if session else {})
        r = client.post("/v1/chat/completions", json=body, headers=h)
        assert r.status_code == 200, r.text
        return r

    work = complete(a, "work").headers["X-Session-Id"]  # A's session named "work"
    by_id = client.post("/v1/sessions", json={"title": "A by id"}, headers=a).json()["id"]
    complete(a, by_id)  # A reaches its own by id too
    before = {s: _state(client, a, s) for s in (work, by_id)}

    # B naming A's session, by name or by id, gets a session of its own by that name
    b_work = complete(b, "work").headers["X-Session-Id"]
    b_by_id = complete(b, by_id).headers["X-Session-Id"]
    b_user = complete(b, None, user="work").headers["X-Session-Id"]
    assert len({work, by_id, b_work, b_by_id}) == 4 and b_user == b_work
    assert {s: _state(client, a, s) for s in (work, by_id)} == before
    b_sessions = client.get("/v1/sessions", headers=b).json()["data"]
    assert {s["id"] for s in b_sessions} == {b_work, b_by_id}
    assert {s["title"] for s in b_sessions} == {"work", by_id}
    # the next time, B's names lead to B's sessions, and A's to A's
    assert complete(b, by_id).headers["X-Session-Id"] == b_by_id
    assert complete(a, "work").headers["X-Session-Id"] == work
    # a stateless request leaves nothing behind in either tenant
    assert "X-Session-Id" not in complete(b, None).headers
    assert client.get("/v1/sessions", headers=b).json()["total"] == 2
    assert client.get("/v1/sessions", headers=a).json()["total"] == 2


def test_the_official_openai_client_sends_its_key(lm: LoadedModel, sqlite_url: str) -> None:
    key = make_keys(sqlite_url, "acme")["acme"]
    settings = Settings(
        _env_file=None,
        database_url=sqlite_url,
        auth_enabled=True,
        window=128,
        max_new_tokens=4,
        json_logs=False,
        log_level="WARNING",
    )
    with serve_in_thread(create_app(settings, lm=lm)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == [lm.name]
        reply = client.chat.completions.create(
            model="memchat",
            messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"X-Session-Id": "notes"},
        )
        assert reply.choices[0].message.content is not None
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="mc_wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


# --- limits --------------------------------------------------------------------------------------


def test_rate_limit_per_key(make_client: ClientFactory, sqlite_url: str) -> None:
    keys = make_keys(sqlite_url, "a", "b")
    with make_client(sqlite_url, auth_enabled=True, rate_limit_per_minute=3) as client:
        for _ in range(3):
            assert client.get("/v1/sessions", headers=bearer(keys["a"])).status_code == 200
        r = client.get("/v1/sessions", headers=bearer(keys["a"]))
        err = check_error(r, 429, "rate_limited")
        assert err["type"] == "rate_limit_error" and "3 requests per minute" in err["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 20  # one request's worth: 20 s at 3/min
        assert client.get("/v1/sessions", headers=bearer(keys["b"])).status_code == 200  # per key
        assert client.get("/livez").status_code == 200  # health is not limited
        # an unknown key is refused before it could use anyone's budget
        check_error(client.get("/v1/sessions", headers=bearer("mc_x")), 401, "invalid_api_key")


def test_rate_limiter_refills() -> None:
    from app.auth import RateLimiter

    now = [100.0]
    limiter = RateLimiter(60)  # one a second, bursts of 60
    limiter._now = lambda: now[0]
    assert all(limiter.take("k") == 0.0 for _ in range(60))
    assert limiter.take("k") == pytest.approx(1.0)
    now[0] += 0.5
    assert limiter.take("k") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take("k") == 0.0 and limiter.take("k") > 0
    assert RateLimiter(0).take("k") == 0.0  # 0: no limit


def test_sessions_per_tenant(make_client: ClientFactory, sqlite_url: str) -> None:
    keys = make_keys(sqlite_url, "a", "b")
    a, b = bearer(keys["a"]), bearer(keys["b"])
    with make_client(sqlite_url, auth_enabled=True, max_sessions_per_tenant=2) as client:
        ids = [client.post("/v1/sessions", json={}, headers=a).json()["id"] for _ in range(2)]
        err = check_error(client.post("/v1/sessions", json={}, headers=a), 403, "quota_exceeded")
        assert "2" in err["message"] and "MEMCHAT_MAX_SESSIONS_PER_TENANT" in err["message"]
        doc = client.get(f"/v1/sessions/{ids[0]}/export", headers=a).json()
        check_error(client.post("/v1/sessions/import", json=doc, headers=a), 403, "quota_exceeded")
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        r = client.post("/v1/chat/completions", json=body, headers=a | {"X-Session-Id": "new"})
        check_error(r, 403, "quota_exceeded")
        # a session that exists is still reachable by name; a stateless request still works
        r = client.post("/v1/chat/completions", json=body, headers=a | {"X-Session-Id": ids[0]})
        assert r.status_code == 200, r.text
        assert client.post("/v1/chat/completions", json=body, headers=a).status_code == 200
        # another tenant has its own quota; a deleted session frees a place
        assert client.post("/v1/sessions", json={}, headers=b).status_code == 201
        assert client.delete(f"/v1/sessions/{ids[1]}", headers=a).status_code == 204
        assert client.post("/v1/sessions", json={}, headers=a).status_code == 201
        assert client.get("/v1/sessions", headers=a).json()["total"] == 2


def test_memory_capacity_bound(make_client: ClientFactory, sqlite_url: str) -> None:
    with make_client(sqlite_url, max_memory_capacity=1000) as client:
        r = client.post("/v1/sessions", json={"memory": {"capacity": 1001}})
        err = check_error(r, 422, "capacity_too_large")
        assert err["param"] == "memory.capacity" and "1000" in err["message"]
        r = client.post("/v1/sessions", json={"memory": {"capacity": 1000}})
        assert r.status_code == 201 and r.json()["memory"]["capacity"] == 1000
        default = client.post("/v1/sessions", json={}).json()  # the default is capped too
        assert default["memory"]["capacity"] == 1000
        small = client.post("/v1/sessions", json={"memory": {"capacity": 10}}).json()["id"]
        doc = client.get(f"/v1/sessions/{small}/export").json()
    with make_client(sqlite_url, max_memory_capacity=5) as client:
        err = check_error(client.post("/v1/sessions/import", json=doc), 422, "capacity_too_large")
        assert err["param"] == "session.params.memory.capacity"


def test_message_and_import_size_limits_hold_with_auth(
    make_client: ClientFactory, sqlite_url: str
) -> None:
    key = make_keys(sqlite_url, "a")["a"]
    settings = {"auth_enabled": True, "max_message_chars": 20, "max_import_messages": 2}
    with make_client(sqlite_url, **settings) as client:
        sid = client.post("/v1/sessions", json={}, headers=bearer(key)).json()["id"]
        r = client.post(f"/v1/sessions/{sid}/chat", json={"message": "x" * 21}, headers=bearer(key))
        check_error(r, 413, "message_too_long")
        msgs = [{"role": "user", "content": "hi"}] * 3
        r = client.post(
            f"/v1/sessions/{sid}/messages", json={"messages": msgs}, headers=bearer(key)
        )
        check_error(r, 413, "too_many_messages")


# --- serving without auth ------------------------------------------------------------------------


def test_exposure_check() -> None:
    def settings(**kw: Any) -> Settings:
        return Settings(_env_file=None, **kw)

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
        check_exposure(settings(host=host))
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org", ""):
        assert not is_loopback(host), host
        with pytest.raises(InsecureConfig, match="MEMCHAT_AUTH_ENABLED=true"):
            check_exposure(settings(host=host))
        check_exposure(settings(host=host, auth_enabled=True))
        check_exposure(settings(host=host, allow_insecure=True))
    with pytest.raises(InsecureConfig):
        check_exposure(settings(), host="0.0.0.0")  # the host given wins (serve --host)


def test_app_refuses_to_start_open_beyond_loopback(lm: LoadedModel, sqlite_url: str) -> None:
    settings = Settings(_env_file=None, database_url=sqlite_url, host="0.0.0.0")
    with pytest.raises(InsecureConfig), TestClient(create_app(settings, lm=lm)):
        pass


def _app_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMCHAT_")}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean | env,
        timeout=timeout,
    )


def test_serve_refuses_an_open_address_without_auth(tmp_path: Path) -> None:
    env = {"MEMCHAT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    out = _app_cli("serve", "--host", "0.0.0.0", "--port", "1", env=env)
    assert out.returncode == 2, out.stderr
    assert "refusing to listen on 0.0.0.0 with auth off" in out.stderr
    assert "MEMCHAT_ALLOW_INSECURE=true" in out.stderr
    out = _app_cli("serve", "--port", "1", env=env | {"MEMCHAT_HOST": "::"})
    assert out.returncode == 2 and "refusing to listen on ::" in out.stderr


# --- python -m app keys --------------------------------------------------------------------------


def test_keys_cli_create_list_revoke(tmp_path: Path, make_client: ClientFactory) -> None:
    url = f"sqlite:///{tmp_path}/keys.db"
    env = {"MEMCHAT_DATABASE_URL": url}
    made = _app_cli("keys", "create", "--tenant", "acme", "--name", "ci", env=env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("mc_") and len(key) >= 43 and "\n" not in key
    assert key[:11] in made.stderr and "acme" in made.stderr and "only now" in made.stderr
    other = _app_cli("keys", "create", "--tenant", "acme", env=env).stdout.strip()
    third = _app_cli("keys", "create", "--tenant", "zeta", "--url", url, env={}).stdout.strip()
    assert len({key, other, third}) == 3

    listed = _app_cli("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "PREFIX",
        "TENANT",
        "NAME",
        "CREATED",
        "LAST",
        "USED",
        "REVOKED",
        "ID",
    ]
    assert len(lines) == 4 and key not in listed.stdout  # never the key itself
    first = next(ln for ln in lines if ln.startswith(key[:11]))
    assert " acme " in first and " ci " in first
    only = _app_cli("keys", "list", "--tenant", "zeta", env=env).stdout.splitlines()
    assert len(only) == 2 and only[1].startswith(third[:11])

    with make_client(url, auth_enabled=True) as client:
        assert client.get("/v1/sessions", headers=bearer(key)).status_code == 200
        revoked = _app_cli("keys", "revoke", key[:11], env=env)
        assert revoked.returncode == 0, revoked.stderr
        assert revoked.stdout.startswith(f"revoked {key[:11]}") and "acme" in revoked.stdout
        check_error(client.get("/v1/sessions", headers=bearer(key)), 401, "invalid_api_key")
        assert client.get("/v1/sessions", headers=bearer(other)).status_code == 200
    row = next(ln for ln in _app_cli("keys", "list", env=env).stdout.splitlines() if key[:11] in ln)
    *_, last_used, revoked_at, _id = row.split()
    assert last_used.endswith("Z") and revoked_at.endswith("Z")

    # revoke by id; unknown or ambiguous names are errors
    db = make_sessionmaker(url, migrate=False)
    third_id = next(k.id for k in list_keys(db) if k.prefix == third[:11])
    assert _app_cli("keys", "revoke", third_id, env=env).returncode == 0
    assert all(k.revoked_at for k in list_keys(db, "zeta"))
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Tenant)) == 3  # local, acme, zeta
    missing = _app_cli("keys", "revoke", "mc_nothing", env=env)
    assert missing.returncode == 2 and "no key" in missing.stderr
    too_short = _app_cli("keys", "revoke", other[:6], env=env)  # a prefix: "mc_" and 4 or more
    assert too_short.returncode == 2 and "no key" in too_short.stderr
    not_a_key = _app_cli("keys", "revoke", other[:11] + "x" * 32, env=env)
    assert not_a_key.returncode == 2 and "no key" in not_a_key.stderr
    assert _app_cli("keys", "revoke", other, env=env).returncode == 0  # the key itself
    assert all(k.revoked_at for k in list_keys(db))
    db.kw["bind"].dispose()
