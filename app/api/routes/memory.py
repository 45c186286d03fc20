"""A session's memory: inspect, explain a read, forget."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.api import schemas, views
from app.api.deps import DbDep, EngineDep, OwnedSessionId, PagingDep, SettingsDep
from app.api.routes.sessions import check_size

router = APIRouter(prefix="/v1/sessions/{session_id}/memory", tags=["memory"])


@router.get("", response_model=schemas.MemoryOut)
def get_memory(session_id: OwnedSessionId, engine: EngineDep, page: PagingDep) -> schemas.MemoryOut:
    """Every remembered message (one page, by id) with its strength, age, size and the attention
    it received, plus the memory's totals and what is in the window."""
    ov = engine.memory_overview(session_id, limit=page.limit, offset=page.offset)
    return schemas.MemoryOut(
        session_id=session_id,
        turn=ov.turn,
        entries=ov.entries,
        tokens=ov.tokens,
        bytes=ov.bytes,
        capacity=ov.capacity,
        window=schemas.WindowOut(
            size=ov.window_size, tokens=ov.window_tokens, message_ids=ov.window_message_ids
        ),
        messages=[schemas.RememberedMessageOut(**vars(m)) for m in ov.messages],
        total=ov.total_messages,
        limit=page.limit,
        offset=page.offset,
    )


@router.post("/query", response_model=schemas.MemoryRead)
def query_memory(
    session_id: OwnedSessionId,
    body: schemas.QueryRequest,
    engine: EngineDep,
    db: DbDep,
    settings: SettingsDep,
) -> schemas.MemoryRead:
    """Explain: which messages and tokens the memory read attends to when this text is the next
    user message, with shares per layer band. Nothing changes."""
    check_size(body.text, settings.max_message_chars, "text")
    report = engine.explain(session_id, body.text)
    with db() as s:
        return views.memory_read(
            engine, s, session_id, report, top_messages=20, top_tokens=body.top_tokens
        )


@router.get("/last-read", response_model=schemas.MemoryRead)
def last_read(
    session_id: OwnedSessionId, engine: EngineDep, db: DbDep, top_tokens: int = 50
) -> schemas.MemoryRead:
    """What the memory read attended to during the session's last turn in this process."""
    report = engine.last_read(session_id)
    with db() as s:
        return views.memory_read(
            engine, s, session_id, report, top_messages=20, top_tokens=max(1, min(top_tokens, 1000))
        )


@router.delete("/messages/{message_id}", response_model=schemas.ForgetResponse)
def forget_message(
    session_id: OwnedSessionId,
    message_id: Annotated[int, Path(ge=0, le=2**31 - 1, description="The message's id.")],
    engine: EngineDep,
) -> schemas.ForgetResponse:
    """Forget a message: its hidden states leave memory and window; its text stays."""
    return schemas.ForgetResponse(removed_entries=engine.forget_message(session_id, message_id))


@router.delete("", response_model=schemas.ForgetResponse)
def forget_all(session_id: OwnedSessionId, engine: EngineDep) -> schemas.ForgetResponse:
    """Forget every remembered hidden state of the session; the transcript stays."""
    return schemas.ForgetResponse(removed_entries=engine.forget_all(session_id))
