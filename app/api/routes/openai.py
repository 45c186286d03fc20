"""The OpenAI-compatible chat endpoint.

A request names its session with an ``X-Session-Id`` header or the ``user`` field (an id of one of
the caller's sessions or a name, unique per tenant; an unknown name, or another tenant's session id,
creates the caller's own session by that name from the request: its system messages become the
system prompt, the messages before the last become history). A known session already holds the
conversation, so only the last message, which must be the user's, is read. Without a name the
request is stateless: a throwaway session holds its messages for the one turn.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.responses import Response

from app.api import openai_protocol as oa
from app.api.deps import CallerDep, DbDep, EngineDep, MetricsDep, SettingsDep, check_session_quota
from app.api.errors import APIError, error_body, to_api_error
from app.api.routes.chat import record_turn
from app.api.routes.sessions import check_size
from app.api.streaming import ThreadedTurn, sse
from app.auth import Caller
from app.config import Settings
from app.engine import Engine, SessionOptions, TurnStats
from memory_store.models import ChatSession

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger("memchat.api")


@router.get("/models", response_model=oa.ModelList)
def list_models(engine: EngineDep) -> oa.ModelList:
    """The one model this server runs."""
    return oa.ModelList(data=[oa.ModelCard(id=engine.lm.name, created=0)])


def _check(body: oa.ChatCompletionRequest, settings: Settings) -> None:
    if body.n not in (None, 1):
        raise APIError(422, "only n=1 is supported", param="n", code="unsupported")
    if body.tools:
        raise APIError(422, "tools are not supported", param="tools", code="unsupported")
    if body.logprobs:
        raise APIError(422, "logprobs are not supported", param="logprobs", code="unsupported")
    if body.messages[-1].role != "user":
        raise APIError(422, "the last message must be the user's", param="messages")
    if not body.messages[-1].text():
        last = f"messages.{len(body.messages) - 1}.content"
        raise APIError(422, "the last message (the user's) has no text", param=last)
    for i, m in enumerate(body.messages):
        check_size(m.text(), settings.max_message_chars, f"messages.{i}.content")


def _open_session(
    engine: Engine,
    db: DbDep,
    settings: Settings,
    caller: Caller,
    name: str | None,
    body: oa.ChatCompletionRequest,
) -> tuple[str, bool, bool]:
    """The caller's session the request talks to, whether it is a throwaway one, and whether
    this request created it. A new session gets the request's system messages as its prompt
    and the messages before the last as history, in the transaction that creates it. A named
    one counts against the tenant's session quota; a throwaway one (deleted after its turn)
    does not."""
    if name:
        with db() as s:
            row = s.get(ChatSession, name)
            if row is not None and row.tenant_id == caller.tenant_id:
                return name, False, False
        found = engine.find_session(name, caller.tenant_id)
        if found is not None:
            return found, False, False
        check_session_quota(db, settings, caller.tenant_id)
    system = [m.text() for m in body.messages if m.memchat_role() == "system"]
    options = SessionOptions(system_prompt="\n\n".join(system) if system else None)
    history = [
        {"role": m.memchat_role(), "content": m.text()}
        for m in body.messages[:-1]
        if m.memchat_role() != "system"
    ]
    if name:
        sid, created = engine.session_for_name(name, options, history, tenant_id=caller.tenant_id)
        return sid, False, created
    sid = engine.create_session(
        title="(stateless request)", options=options, history=history, tenant_id=caller.tenant_id
    )
    return sid, True, True


@router.post(
    "/chat/completions",
    response_model=oa.ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    body: oa.ChatCompletionRequest,
    engine: EngineDep,
    db: DbDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    caller: CallerDep,
    x_session_id: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """OpenAI's chat completion, streamed (``chat.completion.chunk`` events, ``[DONE]``) or
    not, over a memchat session."""
    _check(body, settings)
    sid, throwaway, new_session = await run_in_threadpool(
        _open_session, engine, db, settings, caller, x_session_id or body.user, body
    )
    try:
        turn = engine.chat(
            sid,
            body.messages[-1].text(),
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=settings.temperature if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_list(),
            min_tokens=body.min_tokens or 0,
        )
        worker = ThreadedTurn(turn)
        first = await worker.next()
    except BaseException:
        # a refused turn (e.g. a message too long for the window) leaves no session it created
        if new_session:
            await _discard(engine, sid, None)
        raise
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.lm.name

    if not body.stream:
        try:
            pieces = []
            piece = first
            while piece is not None:
                pieces.append(piece)
                piece = await worker.next()
        finally:
            if throwaway:
                await _discard(engine, sid, worker)
        stats = turn.stats
        assert stats is not None
        record_turn(metrics, stats, "completion")
        completion = oa.ChatCompletion(
            id=cid,
            created=created,
            model=model,
            choices=[
                oa.Choice(
                    message=oa.AssistantMessage(content="".join(pieces)),
                    finish_reason=_finish(stats),
                )
            ],
            usage=_usage(stats),
        )
        headers = {} if throwaway else {"X-Session-Id": sid}
        return JSONResponse(completion.model_dump(mode="json"), headers=headers)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: oa.Delta, finish: Any = None, usage: Any = None) -> dict[str, Any]:
        choices = [] if usage is not None else [oa.ChunkChoice(delta=delta, finish_reason=finish)]
        c = oa.ChatCompletionChunk(
            id=cid, created=created, model=model, choices=choices, usage=usage
        ).model_dump(mode="json")
        if not include_usage:
            c.pop("usage")
        c_choices: list[dict[str, Any]] = c["choices"]
        for ch in c_choices:  # a delta carries only what it sets
            ch["delta"] = {k: v for k, v in ch["delta"].items() if v is not None}
        return {"data": c}

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            yield chunk(oa.Delta(role="assistant", content=""))
            piece = first
            while piece is not None:
                yield chunk(oa.Delta(content=piece))
                piece = await worker.next()
            stats = turn.stats
            assert stats is not None
            record_turn(metrics, stats, "completion")
            yield chunk(oa.Delta(), finish=_finish(stats))
            if include_usage:
                yield chunk(oa.Delta(), usage=_usage(stats))
        except Exception as exc:
            err = to_api_error(exc)
            if err is None:
                log.exception("completion failed mid-stream", exc_info=exc)
            yield {
                "data": error_body(err.message, err.type, err.code, err.param)
                if err
                else error_body("internal server error", "server_error")
            }
        finally:
            worker.cancel()
            if throwaway:
                await _discard(engine, sid, worker)
        yield {"data": "[DONE]"}

    response = sse(events())
    if not throwaway:
        response.headers["X-Session-Id"] = sid
    return response


async def _discard(engine: Engine, sid: str, worker: ThreadedTurn | None) -> None:
    """Delete a throwaway session once its turn has ended, even when the request was cancelled
    (the client went away)."""
    with anyio.CancelScope(shield=True):
        if worker is not None:
            await worker.finished()
        await run_in_threadpool(engine.delete_session, sid)


def _finish(stats: TurnStats) -> str:
    return "length" if stats.finish_reason == "length" else "stop"


def _usage(stats: TurnStats) -> oa.CompletionUsage:
    return oa.CompletionUsage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=stats.prompt_tokens + stats.completion_tokens,
    )
