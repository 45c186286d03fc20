"""Dependencies of the route handlers, as ``Annotated`` aliases.

Who calls: `get_caller` (every ``/v1`` route; `app.main` attaches it to their routers) turns the
API key into a `Caller` (its tenant), or acts as the tenant ``local`` while auth is off, and
applies the per-key rate limit. Every route that takes a session id takes it as
`OwnedSessionId`, which answers the same 404 for another tenant's session as for an unknown id
(tests/api/test_auth.py checks that no such route is left without it).
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from app.api.errors import APIError
from app.auth import Caller, KeyChecker, RateLimiter
from app.config import Settings
from app.engine import Engine
from app.observability import Metrics
from memory_store.errors import SessionNotFound
from memory_store.models import LOCAL_TENANT_ID, ChatSession


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    """The chat engine; 503 while the model is still loading."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        failed = getattr(request.app.state, "load_error", None)
        message = f"model failed to load: {failed}" if failed else "model is loading; retry soon"
        raise APIError(
            503, message, "service_unavailable", "not_ready", headers={"Retry-After": "5"}
        )
    return engine


def get_db(request: Request) -> sessionmaker[DbSession]:
    db: sessionmaker[DbSession] = request.app.state.db
    return db


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
DbDep = Annotated[sessionmaker[DbSession], Depends(get_db)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

# security schemes (shown by /docs); auto_error=False: get_caller answers in the error shape
_bearer = HTTPBearer(auto_error=False, description="An API key: `python -m app keys create`.")
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The same key, for clients without Bearer."
)


def get_caller(
    request: Request,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> Caller:
    """The tenant (and key) a request acts for: 401 without a valid key while auth is on, 429
    over the key's rate limit."""
    if not settings.auth_enabled:
        return Caller(tenant_id=LOCAL_TENANT_ID)
    key = bearer.credentials if bearer is not None else api_key
    if not key:
        raise APIError(
            401,
            "an API key is required: send `Authorization: Bearer <key>` (or `X-API-Key: <key>`)",
            "authentication_error",
            "missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    checker: KeyChecker = request.app.state.keys
    caller = checker.caller(key.strip())
    if caller is None:
        raise APIError(
            401,
            "invalid or revoked API key",
            "authentication_error",
            "invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.take(caller.key_id or caller.tenant_id)
    if wait > 0:
        raise APIError(
            429,
            f"rate limit of {limiter.per_minute} requests per minute for this key reached; "
            f"retry in {math.ceil(wait)} s",
            "rate_limit_error",
            "rate_limited",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


_ID = re.compile(r"[0-9A-Za-z_-]+")  # session ids are uuid4().hex


def owned_session_id(
    session_id: Annotated[str, Path(max_length=200, description="The session's id.")],
    caller: CallerDep,
    db: DbDep,
) -> str:
    """The path's session id, once it is known to be the caller's: another tenant's session is
    the same 404 as an unknown id (nothing tells that it exists)."""
    if not _ID.fullmatch(session_id):  # no session has such an id (and NUL breaks PostgreSQL)
        raise SessionNotFound(session_id)
    with db() as s:
        owner = s.scalar(select(ChatSession.tenant_id).where(ChatSession.id == session_id))
    if owner is None or owner != caller.tenant_id:
        raise SessionNotFound(session_id)
    return session_id


OwnedSessionId = Annotated[str, Depends(owned_session_id)]


def check_session_quota(db: sessionmaker[DbSession], settings: Settings, tenant_id: str) -> None:
    """403 ``quota_exceeded`` when the tenant already holds `max_sessions_per_tenant` sessions
    (checked before a session is made: requests creating sessions at the same moment may each
    pass)."""
    limit = settings.max_sessions_per_tenant
    if limit <= 0:
        return
    with db() as s:
        n = s.scalar(select(func.count(ChatSession.id)).where(ChatSession.tenant_id == tenant_id))
    if (n or 0) >= limit:
        raise APIError(
            403,
            f"this tenant holds {n} sessions, the most it may (MEMCHAT_MAX_SESSIONS_PER_TENANT = "
            f"{limit}); delete one first",
            "permission_error",
            "quota_exceeded",
        )


def check_capacity(capacity: int, settings: Settings, param: str) -> None:
    """422 when a session's memory capacity is above `max_memory_capacity`."""
    if capacity > settings.max_memory_capacity:
        raise APIError(
            422,
            f"{param}: {capacity} is above the largest memory capacity this server allows "
            f"({settings.max_memory_capacity}, MEMCHAT_MAX_MEMORY_CAPACITY)",
            code="capacity_too_large",
            param=param,
        )


class Paging:
    """``?limit=&offset=`` of a list endpoint."""

    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000, description="Items to skip.")] = 0,
    ) -> None:
        self.limit, self.offset = limit, offset


PagingDep = Annotated[Paging, Depends()]
