"""Sessions: create, list, show, rename, delete; the transcript; history import; export/import."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from app.api import schemas, views
from app.api.deps import (
    CallerDep,
    DbDep,
    EngineDep,
    MetricsDep,
    OwnedSessionId,
    PagingDep,
    SettingsDep,
    check_capacity,
    check_session_quota,
)
from app.api.errors import APIError
from app.engine import ROLES, SessionOptions
from memory_store import MemoryParams
from memory_store.errors import InvalidExport, SessionNotFound
from memory_store.models import ChatSession, Message

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def _show(db: DbDep, session_id: str) -> schemas.SessionOut:
    with db() as s:
        row = s.get(ChatSession, session_id)
        if row is None:
            raise SessionNotFound(session_id)
        return views.session_out(row, views.message_counts(s, [session_id])[session_id])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.SessionOut)
def create_session(
    body: schemas.SessionCreate,
    engine: EngineDep,
    db: DbDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> schemas.SessionOut:
    """Start a conversation with its own window and memory. 403 ``quota_exceeded`` when the
    tenant holds `MEMCHAT_MAX_SESSIONS_PER_TENANT` sessions; 422 for a memory capacity above
    `MEMCHAT_MAX_MEMORY_CAPACITY`."""
    params = engine.params
    if body.memory is not None:
        changes = body.memory.model_dump(exclude_none=True)
        params = MemoryParams.from_dict(params.to_dict() | changes)
    check_capacity(params.capacity, settings, "memory.capacity")
    check_session_quota(db, settings, caller.tenant_id)
    options = SessionOptions(
        window=body.window,
        system_prompt=body.system_prompt,
        params=params,
        memory_enabled=body.memory_enabled,
    )
    sid = engine.create_session(title=body.title, options=options, tenant_id=caller.tenant_id)
    return _show(db, sid)


@router.get("", response_model=schemas.SessionList)
def list_sessions(db: DbDep, page: PagingDep, caller: CallerDep) -> schemas.SessionList:
    """The caller's sessions, newest first."""
    mine = ChatSession.tenant_id == caller.tenant_id
    with db() as s:
        total = s.scalar(select(func.count(ChatSession.id)).where(mine)) or 0
        rows = s.scalars(
            select(ChatSession)
            .where(mine)
            .order_by(ChatSession.created_at.desc(), ChatSession.id)
            .limit(page.limit)
            .offset(page.offset)
        ).all()
        counts = views.message_counts(s, [r.id for r in rows])
        data = [views.session_out(r, counts[r.id]) for r in rows]
    return schemas.SessionList(data=data, total=total, limit=page.limit, offset=page.offset)


@router.get("/{session_id}", response_model=schemas.SessionOut)
def get_session(session_id: OwnedSessionId, db: DbDep) -> schemas.SessionOut:
    return _show(db, session_id)


@router.patch("/{session_id}", response_model=schemas.SessionOut)
def rename_session(
    session_id: OwnedSessionId, body: schemas.SessionUpdate, db: DbDep
) -> schemas.SessionOut:
    with db.begin() as s:
        row = s.get(ChatSession, session_id)
        if row is None:
            raise SessionNotFound(session_id)
        row.title = body.title
    return _show(db, session_id)


@router.delete("/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_session(session_id: OwnedSessionId, engine: EngineDep) -> Response:
    """Remove the session with its transcript, memory and window states."""
    engine.delete_session(session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{session_id}/messages", response_model=schemas.MessageList)
def list_messages(session_id: OwnedSessionId, db: DbDep, page: PagingDep) -> schemas.MessageList:
    """The transcript, oldest first (the text stays even when its memory is forgotten)."""
    with db() as s:
        if s.get(ChatSession, session_id) is None:
            raise SessionNotFound(session_id)
        where = Message.session_id == session_id
        total = s.scalar(select(func.count(Message.id)).where(where)) or 0
        rows = s.scalars(
            select(Message).where(where).order_by(Message.seq).limit(page.limit).offset(page.offset)
        ).all()
        data = [
            schemas.MessageOut(
                id=m.seq,
                role=m.role,
                content=m.content,
                turn=m.turn,
                tokens=m.n_tokens,
                location=m.location,
                created_at=views.utc(m.created_at),
            )
            for m in rows
        ]
    return schemas.MessageList(data=data, total=total, limit=page.limit, offset=page.offset)


@router.post("/{session_id}/messages", response_model=schemas.ImportResponse)
def import_messages(
    session_id: OwnedSessionId,
    body: schemas.ImportRequest,
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> schemas.ImportResponse:
    """Append history without generating; what overflows the window goes to memory."""
    if len(body.messages) > settings.max_import_messages:
        raise APIError(
            413,
            f"{len(body.messages)} messages in one import; the limit is "
            f"{settings.max_import_messages}",
            code="too_many_messages",
            param="messages",
        )
    for i, m in enumerate(body.messages):
        check_size(m.content, settings.max_message_chars, f"messages.{i}.content")
    done = engine.import_history(session_id, [m.model_dump() for m in body.messages])
    metrics.turns.labels(kind="import").inc()
    return schemas.ImportResponse(
        message_ids=done.message_ids,
        turn=done.turn,
        memory_entries=done.memory_entries,
        memory_tokens=done.memory_tokens,
    )


@router.get("/{session_id}/export")
def export_session(session_id: OwnedSessionId, engine: EngineDep) -> Response:
    """The session as one JSON file (transcript, memory, window states), to import elsewhere."""
    doc = engine.export(session_id)
    return Response(
        json.dumps(doc, separators=(",", ":")),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="memchat-{session_id}.json"'},
    )


@router.post("/import", status_code=status.HTTP_201_CREATED, response_model=schemas.SessionOut)
async def import_session(
    engine: EngineDep,
    db: DbDep,
    settings: SettingsDep,
    caller: CallerDep,
    doc: Annotated[dict[str, Any], Body()],
) -> schemas.SessionOut:
    """Create a session of the caller from an exported file; a file that fails its checks
    imports nothing. The same quota and capacity limits as a new session apply."""
    _check_export(doc)
    check_capacity(_exported_capacity(doc), settings, "session.params.memory.capacity")
    await run_in_threadpool(check_session_quota, db, settings, caller.tenant_id)
    sid = await run_in_threadpool(engine.import_, doc, None, caller.tenant_id)
    return await run_in_threadpool(_show, db, sid)


def _check_export(doc: dict[str, Any]) -> None:
    """Refuse (InvalidExport) an export the engine could not run: a window out of the range a new
    session may have, a message role it does not know, text no database can store. The import
    checks the rest (structure, blobs, checksum)."""
    session = doc.get("session")
    window = session.get("window") if isinstance(session, dict) else None
    lo, hi = 32, 8192  # as schemas.SessionCreate.window
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or not lo <= window <= hi
    ):
        raise InvalidExport(f"session.window: {window!r} is not a window of {lo} to {hi} tokens")
    tables = doc.get("tables")
    rows = tables.get("messages") if isinstance(tables, dict) else None
    for i, row in enumerate(rows if isinstance(rows, list) else []):
        if not isinstance(row, dict):
            continue  # the import's own checks name it
        where = f"tables.messages[{i}]"
        if row.get("role") not in ROLES:
            role = row.get("role")
            raise InvalidExport(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        try:
            schemas.storable(row.get("content"))
        except ValueError as exc:
            raise InvalidExport(f"{where}.content {exc}") from exc


def _exported_capacity(doc: dict[str, Any]) -> int:
    """The memory capacity an export document's session has (the default when it says none;
    a malformed document is left to the import's own checks)."""
    session = doc.get("session")
    params = session.get("params") if isinstance(session, dict) else None
    memory = params.get("memory") if isinstance(params, dict) else None
    capacity = memory.get("capacity") if isinstance(memory, dict) else None
    if isinstance(capacity, int) and not isinstance(capacity, bool):
        return capacity
    return MemoryParams().capacity


def check_size(text: str, limit: int, param: str) -> None:
    """413 when a message is longer than the configured limit."""
    if len(text) > limit:
        raise APIError(
            413,
            f"{param} has {len(text)} characters; the limit is {limit}",
            code="message_too_long",
            param=param,
        )
