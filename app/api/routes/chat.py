"""One chat turn of a session, whole or streamed as Server-Sent Events."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker
from starlette.responses import Response

from app.api import schemas, views
from app.api.deps import DbDep, EngineDep, MetricsDep, OwnedSessionId, SettingsDep
from app.api.errors import error_body, to_api_error
from app.api.routes.sessions import check_size
from app.api.streaming import ThreadedTurn, sse
from app.engine import Engine, Turn, TurnStats
from app.observability import Metrics

router = APIRouter(prefix="/v1/sessions", tags=["chat"])
log = logging.getLogger("memchat.api")


def record_turn(metrics: Metrics, stats: TurnStats | None, kind: str) -> None:
    """Count a finished turn in the metrics."""
    if stats is None:
        return
    metrics.turns.labels(kind=kind).inc()
    metrics.tokens_generated.inc(stats.completion_tokens)
    metrics.memory_read_seconds.observe(stats.read_seconds)
    metrics.turn_seconds.observe(stats.seconds)
    if stats.first_token_seconds is not None:
        metrics.first_token_seconds.observe(stats.first_token_seconds)


@router.post(
    "/{session_id}/chat",
    response_model=schemas.ChatResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat(
    session_id: OwnedSessionId,
    body: schemas.ChatRequest,
    engine: EngineDep,
    db: DbDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    """One turn. With ``stream: true`` the answer is an event stream: ``delta`` events
    (``{"text": ...}``), then one ``done`` event carrying the same object as the non-streamed
    answer (usage, memory-read summary, timings); a failure mid-stream is an ``error`` event."""
    check_size(body.message, settings.max_message_chars, "message")
    turn = engine.chat(
        session_id,
        body.message,
        max_new_tokens=body.max_tokens,
        temperature=settings.temperature if body.temperature is None else body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop or (),
        min_tokens=body.min_tokens,
    )
    worker = ThreadedTurn(turn)
    # the first piece comes after the lock and the prompt: errors up to there are plain 4xx
    first = await worker.next()
    if not body.stream:
        pieces = []
        piece = first
        while piece is not None:
            pieces.append(piece)
            piece = await worker.next()
        assert turn.stats is not None
        record_turn(metrics, turn.stats, "chat")
        out = await run_in_threadpool(_respond, engine, db, session_id, "".join(pieces), turn)
        return JSONResponse(out.model_dump(mode="json"))

    async def events() -> AsyncIterator[dict[str, Any]]:
        reply, piece = "", first
        try:
            while piece is not None:
                reply += piece
                yield {"event": "delta", "data": {"text": piece}}
                piece = await worker.next()
        except Exception as exc:
            err = to_api_error(exc)
            if err is None:
                log.exception("turn failed mid-stream", exc_info=exc)
            error = (
                error_body(err.message, err.type, err.code, err.param)
                if err
                else error_body("internal server error", "server_error")
            )
            yield {"event": "error", "data": error}
            return
        finally:
            worker.cancel()  # no-op when the turn ended; stops it when the client left
        record_turn(metrics, turn.stats, "chat")
        out = await run_in_threadpool(_respond, engine, db, session_id, reply, turn)
        yield {"event": "done", "data": out.model_dump(mode="json")}

    return sse(events())


def _respond(
    engine: Engine, db: sessionmaker[DbSession], session_id: str, reply: str, turn: Turn
) -> schemas.ChatResponse:
    assert turn.stats is not None
    with db() as s:
        return views.chat_response(engine, s, session_id, reply, turn.stats)
