"""app.observability: request ids, JSON logs, the access line and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from fastapi.responses import Response, StreamingResponse
from fastapi.testclient import TestClient

from app.observability import (
    Metrics,
    RequestContextMiddleware,
    configure_logging,
    current_request_id,
    request_id_var,
)

HEX_ID = re.compile(r"[0-9a-f]{32}")
handler_log = logging.getLogger("tests.observability.handler")


def build_app(metrics: Metrics) -> FastAPI:
    """A tiny app like the service: JSON, streaming, failing routes and /metrics."""
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware, metrics=metrics)

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, Any]:
        handler_log.info("reading item", extra={"item": item_id})
        return {"item_id": item_id, "request_id": current_request_id()}

    @app.get("/sync/{item_id}")
    def get_item_sync(item_id: int) -> dict[str, Any]:  # runs in the threadpool
        handler_log.info("reading item in a thread")
        return {"request_id": current_request_id()}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                handler_log.info("chunk %d", i)
                yield f"chunk{i}\n".encode()
                await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/metrics")
    def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    # A router included in a router: FastAPI keeps the nesting, the label needs both prefixes.
    outer = APIRouter(prefix="/v1")
    inner = APIRouter(prefix="/sessions")

    @inner.get("/{session_id}")
    async def get_session(session_id: str) -> dict[str, str]:
        return {"session_id": session_id}

    outer.include_router(inner)
    app.include_router(outer)
    return app


@pytest.fixture()
def log_stream() -> Iterator[io.StringIO]:
    """configure_logging into a StringIO; the global logging state is restored afterwards."""
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved = {
        name: (lg.handlers[:], lg.level, lg.propagate)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        for lg in [logging.getLogger(name)]
    }
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    yield stream
    root.handlers[:], root.level = saved_root
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


@pytest.fixture()
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture()
def client(metrics: Metrics) -> Iterator[TestClient]:
    with TestClient(build_app(metrics), raise_server_exceptions=False) as c:
        yield c


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


# --- request id ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/items/1", "/sync/1", "/stream", "/no/such/route"])
def test_request_id_generated_when_absent(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert HEX_ID.fullmatch(r.headers["x-request-id"])
    if path.startswith(("/items", "/sync")):  # the handler saw the same id
        assert r.json()["request_id"] == r.headers["x-request-id"]


def test_request_ids_differ_between_requests(client: TestClient) -> None:
    ids = {client.get("/items/1").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("path", ["/items/1", "/stream", "/no/such/route"])
def test_request_id_echoed_when_given(client: TestClient, path: str) -> None:
    r = client.get(path, headers={"X-Request-ID": "abc-123.X_y"})
    assert r.headers["x-request-id"] == "abc-123.X_y"
    assert r.headers.get_list("x-request-id") == ["abc-123.X_y"]


def test_request_id_of_128_chars_kept(client: TestClient) -> None:
    given = "a" * 128
    assert client.get("/items/1", headers={"X-Request-ID": given}).headers["x-request-id"] == given


@pytest.mark.parametrize("bad", ["a" * 129, "a" * 300, "has space", "semi;colon", "ünïcode", ""])
def test_bad_request_id_replaced(client: TestClient, bad: str) -> None:
    r = client.get("/items/1", headers={b"X-Request-ID": bad.encode("utf-8")})
    assert HEX_ID.fullmatch(r.headers["x-request-id"])


def run_asgi(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Drive an ASGI app with one empty request; return the messages it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def http_scope(headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/x", "raw_path": b"/x", "root_path": "", "query_string": b"",
        "headers": headers or [], "client": ("1.2.3.4", 5678), "server": ("test", 80),
    }  # fmt: skip


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"inner")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("bad", [b"line\nbreak", b"cr\rlf", b"tab\t", b"a" * 300])
def test_bad_request_id_replaced_raw_asgi(bad: bytes) -> None:
    # Raw ASGI: HTTP clients refuse to send some of these, a hostile peer would not.
    sent = run_asgi(RequestContextMiddleware(ok_app), http_scope([(b"x-request-id", bad)]))
    headers = [v for k, v in sent[0]["headers"] if k == b"x-request-id"]
    assert len(headers) == 1  # the inner app's own header is replaced, not duplicated
    assert HEX_ID.fullmatch(headers[0].decode())


def test_contextvar_reset_after_request(client: TestClient) -> None:
    client.get("/items/1")
    assert request_id_var.get() is None


# --- logs ---------------------------------------------------------------------------------------


def test_handler_log_lines_carry_the_request_id(
    client: TestClient, log_stream: io.StringIO
) -> None:
    rid = client.get("/items/7", headers={"X-Request-ID": "req-7"}).headers["x-request-id"]
    sync_rid = client.get("/sync/7").headers["x-request-id"]
    stream_rid = client.get("/stream").headers["x-request-id"]
    lines = json_lines(log_stream)

    (inside,) = [line for line in lines if line["message"] == "reading item"]
    assert inside["request_id"] == rid == "req-7"
    assert inside["level"] == "INFO"
    assert inside["logger"] == "tests.observability.handler"
    assert inside["item"] == 7  # an extra= field
    assert "time" in inside
    (threaded,) = [line for line in lines if line["message"] == "reading item in a thread"]
    assert threaded["request_id"] == sync_rid
    chunks = [line for line in lines if line["message"].startswith("chunk ")]
    assert [c["request_id"] for c in chunks] == [stream_rid] * 3


def test_access_line(client: TestClient, log_stream: io.StringIO) -> None:
    client.get("/items/3", headers={"X-Request-ID": "acc-1"})
    (access,) = [line for line in json_lines(log_stream) if line["logger"] == "memchat.access"]
    assert access["level"] == "INFO"
    assert access["request_id"] == "acc-1"
    assert access["method"] == "GET"
    assert access["path"] == "/items/3"
    assert access["route"] == "/items/{item_id}"
    assert access["status"] == 200
    assert access["duration_ms"] >= 0
    assert access["client"] == "testclient:50000"


def test_access_line_after_the_stream_completes(
    client: TestClient, log_stream: io.StringIO
) -> None:
    r = client.get("/stream")
    assert r.text == "chunk0\nchunk1\nchunk2\n"
    ours = [
        line["message"] if line["logger"] == handler_log.name else line["logger"]
        for line in json_lines(log_stream)
        if line["logger"] in (handler_log.name, "memchat.access")
    ]
    assert ours == ["chunk 0", "chunk 1", "chunk 2", "memchat.access"]


def test_log_outside_a_request_has_no_request_id(log_stream: io.StringIO) -> None:
    logging.getLogger("tests.observability").warning("idle", extra={"k": "v"})
    (line,) = json_lines(log_stream)
    assert line["message"] == "idle" and line["level"] == "WARNING" and line["k"] == "v"
    assert "request_id" not in line


def test_configure_logging_is_idempotent(log_stream: io.StringIO) -> None:
    second = io.StringIO()
    configure_logging("DEBUG", stream=second)
    logging.getLogger("tests.observability").debug("once")
    assert log_stream.getvalue() == ""
    assert [line["message"] for line in json_lines(second)] == ["once"]
    assert logging.getLogger().level == logging.DEBUG


def test_uvicorn_loggers(log_stream: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").info(
        "Started server process", extra={"color_message": "Started \x1b[36mserver\x1b[0m"}
    )
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')
    logging.getLogger("uvicorn.access").error("even errors")
    (line,) = json_lines(log_stream)
    assert line == line | {"logger": "uvicorn.error", "message": "Started server process"}
    assert "color_message" not in line


def test_text_logs(log_stream: io.StringIO) -> None:
    text = io.StringIO()
    configure_logging("INFO", json_logs=False, stream=text)
    token = request_id_var.set("rid-1")
    try:
        logging.getLogger("t").info("in a request")
    finally:
        request_id_var.reset(token)
    logging.getLogger("t").info("outside")
    first, second = text.getvalue().splitlines()
    assert first.endswith("INFO    t [rid-1] in a request")
    assert second.endswith("INFO    t [-] outside")


def test_configure_logging_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD")


def test_import_does_no_work() -> None:
    code = (
        "import logging, app.observability as o; "
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers; "
        "assert logging.getLogger('uvicorn.access').handlers == []"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_use_the_route_template(client: TestClient) -> None:
    client.get("/items/1", headers={"X-Request-ID": "one"})
    client.get("/items/2", headers={"X-Request-ID": "two"})
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    body = r.text
    assert (
        'memchat_http_requests_total{method="GET",route="/items/{item_id}",status="200"} 2.0'
        in (body.splitlines())
    )
    assert "/items/1" not in body and "/items/2" not in body
    assert (
        'memchat_http_request_duration_seconds_count{method="GET",route="/items/{item_id}"} 2.0'
        in body.splitlines()
    )


def test_route_labels(client: TestClient, metrics: Metrics) -> None:
    client.get("/no/such/route")
    client.get("/v1/sessions/abc")
    client.post("/items/1")  # 405: a partial match still names the route
    client.request("BREW", "/items/1")  # an odd method is bucketed
    client.get("/items/not-an-int")  # 422
    client.get("/stream")
    total = "memchat_http_requests_total"
    assert sample(metrics, total, {"method": "GET", "route": "unmatched", "status": "404"}) == 1
    assert sample(
        metrics, total, {"method": "GET", "route": "/v1/sessions/{session_id}", "status": "200"}
    ) == 1  # fmt: skip
    assert sample(metrics, total, {"method": "POST", "route": "/items/{item_id}", "status": "405"})
    assert sample(metrics, total, {"method": "other", "route": "/items/{item_id}", "status": "405"})
    assert sample(metrics, total, {"method": "GET", "route": "/items/{item_id}", "status": "422"})
    assert sample(metrics, total, {"method": "GET", "route": "/stream", "status": "200"}) == 1


def test_exception_counts_as_500(
    client: TestClient, metrics: Metrics, log_stream: io.StringIO
) -> None:
    assert client.get("/boom").status_code == 500
    labels = {"method": "GET", "route": "/boom", "status": "500"}
    assert sample(metrics, "memchat_http_requests_total", labels) == 1
    (access,) = [line for line in json_lines(log_stream) if line["logger"] == "memchat.access"]
    assert access["status"] == 500 and access["route"] == "/boom"


def test_raw_asgi_exception_before_and_after_start(caplog: pytest.LogCaptureFixture) -> None:
    async def fails_early(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("before start")

    async def fails_mid_stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("client gone")

    caplog.set_level(logging.INFO, logger="memchat.access")
    metrics = Metrics()
    for app in (fails_early, fails_mid_stream):
        with pytest.raises(RuntimeError):  # re-raised for the server's error handling
            run_asgi(RequestContextMiddleware(app, metrics), http_scope())
    statuses = [r.status for r in caplog.records if r.name == "memchat.access"]  # type: ignore[attr-defined]
    assert statuses == [500, 200]
    labels = {"method": "GET", "route": "unmatched"}
    assert sample(metrics, "memchat_http_requests_total", labels | {"status": "500"}) == 1
    assert sample(metrics, "memchat_http_requests_total", labels | {"status": "200"}) == 1
    assert request_id_var.get() is None


def test_headerless_start_message_gets_the_id() -> None:
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    sent = run_asgi(RequestContextMiddleware(bare), http_scope([(b"x-request-id", b"r1")]))
    assert sent[0]["headers"] == [(b"x-request-id", b"r1")]


def test_websocket_and_lifespan_pass_through(client: TestClient, metrics: Metrics) -> None:
    # The client fixture already ran the lifespan through the middleware.
    with client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "hi"
    assert "/ws" not in metrics.render()[0].decode()


def test_two_metrics_instances_do_not_share_counts() -> None:
    first, second = Metrics(), Metrics()
    with TestClient(build_app(first)) as c:
        c.get("/items/1")
    labels = {"method": "GET", "route": "/items/{item_id}", "status": "200"}
    assert sample(first, "memchat_http_requests_total", labels) == 1
    assert sample(second, "memchat_http_requests_total", labels) is None
    first.turns.labels(kind="chat").inc()
    first.tokens_generated.inc(5)
    assert sample(second, "memchat_turns_total", {"kind": "chat"}) == 0
    assert sample(second, "memchat_tokens_generated_total") == 0


def test_engine_metrics_exposed() -> None:
    entries = [3.0]
    m = Metrics(memory_entries=lambda: entries[0])
    m.turns.labels(kind="import").inc()
    m.tokens_generated.inc(12)
    m.memory_read_seconds.observe(0.004)
    m.turn_seconds.observe(3.2)
    m.first_token_seconds.observe(0.8)
    entries[0] = 42.0
    body, content_type = m.render()
    text = body.decode()
    assert content_type.startswith("text/plain")
    for line in [
        "memchat_memory_entries 42.0",
        'memchat_turns_total{kind="import"} 1.0',
        'memchat_turns_total{kind="chat"} 0.0',  # every kind exported from the start
        'memchat_turns_total{kind="completion"} 0.0',
        "memchat_tokens_generated_total 12.0",
        'memchat_memory_read_seconds_bucket{le="0.005"} 1.0',
        'memchat_turn_duration_seconds_bucket{le="5.0"} 1.0',
        'memchat_time_to_first_token_seconds_bucket{le="1.0"} 1.0',
        'memchat_turn_duration_seconds_bucket{le="120.0"} 1.0',
    ]:
        assert line in text.splitlines(), line


def test_failing_memory_callback_does_not_break_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> float:
        raise RuntimeError("engine gone")

    m = Metrics()
    m.set_memory_entries_function(broken)
    value = sample(m, "memchat_memory_entries")
    assert value is not None and math.isnan(value)
    assert "memchat_memory_entries NaN" in m.render()[0].decode()
    assert "memory_entries callback failed" in caplog.text
