"""Observability: JSON logs carrying the request id, Prometheus metrics, one access line a request.

Nothing happens at import. The app factory calls :func:`configure_logging`, builds one
:class:`Metrics` per app, and adds :class:`RequestContextMiddleware`; see ``app/main.py``.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from functools import lru_cache
from typing import IO, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pythonjsonlogger.json import JsonFormatter
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "LATENCY_BUCKETS",
    "MEMORY_READ_BUCKETS",
    "REQUEST_ID_HEADER",
    "TURN_KINDS",
    "Metrics",
    "RequestContextMiddleware",
    "RequestIdFilter",
    "configure_logging",
    "current_request_id",
    "request_id_var",
]

REQUEST_ID_HEADER = "X-Request-ID"

request_id_var: ContextVar[str | None] = ContextVar("memchat_request_id", default=None)
"""The id of the HTTP request being served in this context; None outside a request."""


def current_request_id() -> str | None:
    """The id of the request being served, or None outside a request."""
    return request_id_var.get()


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

# Marks the handler configure_logging installs, so a second call replaces it instead of adding one.
_HANDLER_MARK = "_memchat_observability"


class RequestIdFilter(logging.Filter):
    """Puts the current request id (or None) on every record as ``record.request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        # An explicit extra={"request_id": ...} wins (the access line passes its own).
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class _JsonLogFormatter(JsonFormatter):
    """One JSON object a line: time, level, logger, message, request_id (if any), extras."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        # Set first so it leads the line; ISO 8601 in UTC, unlike asctime (local, no zone).
        log_data["time"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(
            timespec="milliseconds"
        )
        super().add_fields(log_data, record, message_dict)
        # uvicorn passes its message again with ANSI colours as an extra; noise in JSON.
        log_data.pop("color_message", None)
        if log_data.get("request_id") is None:
            log_data.pop("request_id", None)


class _TextLogFormatter(logging.Formatter):
    """``time level logger [request_id] message`` for humans at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # A copy: other handlers share the record and must still see request_id as None.
        copy = logging.makeLogRecord(record.__dict__)
        copy.request_id = getattr(record, "request_id", None) or "-"
        return super().format(copy)


def configure_logging(
    level: str = "INFO", json_logs: bool = True, *, stream: IO[str] | None = None
) -> None:
    """Send every log record through one root handler: JSON lines, or plain text if not json_logs.

    Idempotent: a later call replaces the handler an earlier one installed. uvicorn's own
    loggers (``uvicorn``, ``uvicorn.error``) propagate to it; ``uvicorn.access`` is silenced,
    :class:`RequestContextMiddleware` writes the access line (``memchat.access``) instead.
    Call it after uvicorn configured its logging (the app factory is the place), or run uvicorn
    with ``log_config=None``: uvicorn's dictConfig would otherwise re-add its handlers.

    Args:
        level: a stdlib level name (DEBUG, INFO, WARNING, ERROR, CRITICAL).
        json_logs: JSON lines (for log shippers) or plain text.
        stream: where to write; defaults to sys.stderr (tests pass a StringIO).
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")

    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_JsonLogFormatter() if json_logs else _TextLogFormatter())
    # On the handler, not a logger: a logger's filters skip records propagated from its children.
    handler.addFilter(RequestIdFilter())
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)

    for name in ("uvicorn", "uvicorn.error"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
        uv.setLevel(logging.NOTSET)  # the root's level governs
    access = logging.getLogger("uvicorn.access")
    # A NullHandler, not none: with no handler at all, logging's lastResort prints WARNING+.
    access.handlers = [logging.NullHandler()]
    access.propagate = False


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

# A CPU LLM turn spans ~10 ms (a cached read) to minutes (a long reply), hence the wide range.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Memory reads are a small part of a turn: finer at the low end.
MEMORY_READ_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

TURN_KINDS: tuple[str, ...] = ("chat", "import", "completion")

# HTTP methods kept as label values; anything else a client sends becomes "other" (bounded).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_log = logging.getLogger(__name__)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app instance).

    Attributes are the prometheus_client metrics; engine code records turns with e.g.
    ``metrics.turns.labels(kind="chat").inc()`` and ``metrics.turn_seconds.observe(s)``.
    """

    def __init__(self, memory_entries: Callable[[], float] | None = None) -> None:
        """Build the metrics in a fresh registry.

        Args:
            memory_entries: optional callback read at every scrape: the number of memory
                entries over all sessions cached in RAM. Can also be set later with
                :meth:`set_memory_entries_function`.
        """
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "memchat_http_requests_total", "HTTP requests served.",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "memchat_http_request_duration_seconds",
            "HTTP request duration until the last body byte (whole stream for streaming).",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens_generated = Counter(
            "memchat_tokens_generated_total", "Reply tokens generated.", registry=r
        )
        self.turns = Counter(
            "memchat_turns_total", "Turns processed, by kind.", ["kind"], registry=r
        )
        for kind in TURN_KINDS:
            self.turns.labels(kind=kind)  # exported as 0 from the start, so rate() has a series
        # Total, not per session: a session label would grow without bound.
        self.memory_entries = Gauge(
            "memchat_memory_entries", "Memory entries over all sessions cached in RAM.",
            registry=r,
        )  # fmt: skip
        self.memory_read_seconds = Histogram(
            "memchat_memory_read_seconds", "Seconds spent reading memory, per turn.",
            buckets=MEMORY_READ_BUCKETS, registry=r,
        )  # fmt: skip
        self.turn_seconds = Histogram(
            "memchat_turn_duration_seconds", "Turn duration, end to end.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token_seconds = Histogram(
            "memchat_time_to_first_token_seconds", "Seconds from turn start to the first token.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        if memory_entries is not None:
            self.set_memory_entries_function(memory_entries)

    def set_memory_entries_function(self, fn: Callable[[], float]) -> None:
        """Make the memory_entries gauge read ``fn()`` at every scrape."""

        def safe() -> float:
            # An exception here would fail the whole /metrics scrape; report NaN instead.
            try:
                return float(fn())
            except Exception:
                _log.exception("memory_entries callback failed")
                return math.nan

        self.memory_entries.set_function(safe)

    def render(self) -> tuple[bytes, str]:
        """The exposition of every metric: (body, content type) for a /metrics response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------------
# Middleware
# ---------------------------------------------------------------------------------------------

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_access_log = logging.getLogger("memchat.access")


def _incoming_request_id(scope: Scope) -> str | None:
    """The client's X-Request-ID if it is a sane token (it goes into logs and headers as is)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SANE_REQUEST_ID.fullmatch(text) else None
    return None


@lru_cache(maxsize=512)
def _template_regex(template: str) -> re.Pattern[str]:
    return compile_path(template)[0]


def _route_contexts(app: object) -> Iterable[Any]:
    """FastAPI's effective routes (prefixes applied) of ``app``; empty if FastAPI lacks the API."""
    routes = getattr(app, "routes", None)
    if routes is None:
        return ()
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before nested routers: routes are copied with the full path
        return ()
    return iter_route_contexts(routes)


def _route_template(scope: Scope, app: object, root_path: str) -> str:
    """The matched route's path template (``/v1/sessions/{session_id}``), or "unmatched".

    Starlette's router sets ``scope["route"]``. FastAPI (0.16x) keeps included routers nested,
    so there it is the route as declared, without the prefixes of routers included inside
    other routers; and a plain Starlette ``Route`` under a FastAPI router leaves no
    ``scope["route"]`` at all (only ``scope["endpoint"]``; a Mount, e.g. StaticFiles, neither).
    Both are resolved by FastAPI's effective routes. Routes of a mounted sub-app keep their
    path relative to the mount.
    """
    route = scope.get("route")
    endpoint = scope.get("endpoint")
    path: str = scope.get("path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    template = "unmatched"
    if route is not None:
        declared = getattr(route, "path_format", None) or getattr(route, "path", None)
        if not isinstance(declared, str):
            return "unmatched"
        template = declared
        regex = getattr(route, "path_regex", None)
        if regex is None or regex.match(path):
            return template  # the common case: the route as declared matches the full path
    elif endpoint is None:
        return "unmatched"
    for ctx in _route_contexts(app):
        if route is not None:
            mine = ctx.original_route is route
        else:  # a Mount leaves its app as the endpoint
            mine = endpoint in (ctx.endpoint, getattr(ctx.original_route, "app", None))
        candidate = ctx.path_format
        if mine and isinstance(candidate, str) and _template_regex(candidate).match(path):
            return candidate
    return template


class RequestContextMiddleware:
    """Pure ASGI middleware: request id, one access log line and the HTTP metrics per request.

    Pure ASGI rather than BaseHTTPMiddleware so that streaming responses pass through
    untouched and the context variable is set in the task that runs the endpoint.
    Websocket and lifespan scopes pass through.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())
        # Read before the inner app runs: a Mount rewrites both in the (shared) scope.
        app, root_path = scope.get("app"), scope.get("root_path", "")
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != header[0]]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        token = request_id_var.set(request_id)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # Also on an exception or a cancellation (client gone): 500 unless a status was sent.
            self._record(scope, app, root_path, request_id, status or 500, start)
            request_id_var.reset(token)

    def _record(
        self, scope: Scope, app: object, root_path: str, request_id: str, status: int,
        start: float,
    ) -> None:  # fmt: skip
        seconds = time.perf_counter() - start
        method = scope.get("method", "")
        route = _route_template(scope, app, root_path)
        client = scope.get("client")
        _access_log.info(
            "%s %s %d %.1fms", method, scope.get("path", ""), status, seconds * 1000,
            extra={
                "method": method,
                "path": scope.get("path", ""),
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
                "request_id": request_id,
                "client": f"{client[0]}:{client[1]}" if client else None,
            },
        )  # fmt: skip
        if self.metrics is not None:
            label = method if method in _METHODS else "other"
            self.metrics.requests.labels(method=label, route=route, status=str(status)).inc()
            self.metrics.request_seconds.labels(method=label, route=route).observe(seconds)
