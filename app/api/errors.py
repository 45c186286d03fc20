"""One error shape, ``{"error": {"message", "type", "code", "param"}}``, mapped in one place.

Domain exceptions from the engine and the store become 4xx here; anything else is a 500 whose
details go to the log only.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.schemas import ErrorResponse
from app.engine import MessageNotFound, PinnedMessage, SessionBusy, WindowTooSmall
from memory_store.errors import InvalidExport, SessionNotFound

log = logging.getLogger("memchat.api")


class APIError(Exception):
    """An error the client caused (or can act on), with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers


# The error statuses a /v1 route may answer, documented in the OpenAPI schema with the one shape
# (so that clients and schema-driven tools know them; FastAPI's default 422 shape is not ours).
ERROR_STATUSES = {
    400: "The body could not be parsed (not UTF-8, or not JSON).",
    401: "Auth is on and the API key is missing, unknown or revoked.",
    403: "The tenant's session quota is reached.",
    404: "No such session or message (another tenant's session is not found either).",
    409: "The session is busy with another turn.",
    413: "A message or an import is over its limit.",
    422: "Invalid input; `param` names the field.",
    429: "The key's rate limit is reached; see `Retry-After`.",
    503: "The model is loading (or failed to load).",
}


def error_responses() -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of the /v1 routers: every error status, with `ErrorResponse`."""
    return {code: {"model": ErrorResponse, "description": d} for code, d in ERROR_STATUSES.items()}


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The error document (also sent as the data of a stream's error event)."""
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def to_api_error(exc: BaseException) -> APIError | None:
    """The APIError a domain exception stands for, or None for an unexpected one."""
    match exc:
        case APIError():
            return exc
        case SessionNotFound():
            return APIError(404, "session not found", "not_found_error", "session_not_found")
        case MessageNotFound():
            return APIError(404, str(exc), "not_found_error", "message_not_found")
        case SessionBusy():
            return APIError(409, str(exc), "conflict_error", "session_busy")
        case PinnedMessage():
            return APIError(422, str(exc), "invalid_request_error", "message_pinned")
        case WindowTooSmall():
            return APIError(422, str(exc), "invalid_request_error", "window_too_small")
        case InvalidExport():
            return APIError(
                422, f"invalid export file: {exc}", "invalid_request_error", "invalid_export"
            )
    return None


def _respond(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.code, err.param),
        status_code=err.status,
        headers=err.headers,
    )


def install(app: FastAPI) -> None:
    """Register the exception handlers."""

    async def domain(_request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        assert err is not None
        return _respond(err)

    domain_errors = (
        APIError,
        SessionNotFound,
        MessageNotFound,
        PinnedMessage,
        SessionBusy,
        WindowTooSmall,
        InvalidExport,
    )
    for kind in domain_errors:
        app.add_exception_handler(kind, domain)

    async def validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(exc.errors()) > 1:
            message += f" (and {len(exc.errors()) - 1} more)"
        return _respond(APIError(422, message, "invalid_request_error", "invalid_value", param))

    app.add_exception_handler(RequestValidationError, validation)

    async def http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message, code = str(exc.detail), None
        if exc.status_code == 400:  # FastAPI's "There was an error parsing the body"
            message = "the request body could not be parsed: send JSON, encoded as UTF-8"
            code = "invalid_body"
        return _respond(
            APIError(exc.status_code, message, kind, code, headers=dict(exc.headers or {}))
        )

    app.add_exception_handler(StarletteHTTPException, http)

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _respond(APIError(500, "internal server error", "server_error"))

    app.add_exception_handler(Exception, unexpected)
