"""Engine and database objects turned into wire models."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from app.api import schemas
from app.engine import BANDS, Engine, ReadReport, TurnStats
from memory_store.models import ChatSession, Message


def utc(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def session_out(row: ChatSession, n_messages: int) -> schemas.SessionOut:
    params = row.params or {}
    return schemas.SessionOut(
        id=row.id,
        title=row.title,
        system_prompt=row.system_prompt,
        window=row.window,
        turn=row.turn,
        messages=n_messages,
        memory_enabled=bool(params.get("memory_enabled", True)),
        memory=dict(params.get("memory", {})),
        model=row.model,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )


def message_counts(db: DbSession, session_ids: Iterable[str]) -> dict[str, int]:
    """Transcript length of each session (system block included)."""
    ids = list(session_ids)
    rows = db.execute(
        select(Message.session_id, func.count(Message.id))
        .where(Message.session_id.in_(ids))
        .group_by(Message.session_id)
    ).all()
    counts = {sid: 0 for sid in ids}
    counts.update({sid: int(n) for sid, n in rows})
    return counts


def _bands(weights: np.ndarray, totals: np.ndarray) -> schemas.BandWeights:
    share = np.divide(weights, totals, out=np.zeros(len(BANDS)), where=totals > 0)
    return schemas.BandWeights(**{b: float(v) for b, v in zip(BANDS, share, strict=True)})


def memory_read(
    engine: Engine,
    db: DbSession,
    session_id: str,
    report: ReadReport | None,
    top_messages: int = 5,
    top_tokens: int = 20,
) -> schemas.MemoryRead:
    """The messages and tokens the memory read gave most attention to, with their shares."""
    if report is None or not report.messages:
        return schemas.MemoryRead(memory_share=0.0, messages=[], tokens=[])
    band_totals = np.sum(list(report.messages.values()), axis=0)
    total = float(band_totals.sum())
    ranked = report.top_messages(top_messages)
    rows = {
        m.seq: m
        for m in db.scalars(
            select(Message).where(
                Message.session_id == session_id, Message.seq.in_([s for s, _ in ranked])
            )
        )
    }
    messages = [
        schemas.ReadMessage(
            message_id=seq,
            role=rows[seq].role if seq in rows else "system",
            content=rows[seq].content if seq in rows else "",
            weight=mass / total,
            bands=_bands(report.messages[seq], band_totals),
        )
        for seq, mass in ranked
    ]
    tokens_ranked = sorted(report.tokens.items(), key=lambda kv: -float(kv[1].sum()))[:top_tokens]
    tokens = [
        schemas.ReadToken(
            message_id=seq,
            position=pos,
            token=str(engine.lm.tokenizer.decode([report.token_ids[(seq, pos)]])),
            weight=float(m.sum()) / total,
            bands=_bands(m, band_totals),
        )
        for (seq, pos), m in tokens_ranked
    ]
    most = report.queries * report.heads * report.layers
    return schemas.MemoryRead(
        memory_share=total / most if most else 0.0, messages=messages, tokens=tokens
    )


def chat_response(
    engine: Engine, db: DbSession, session_id: str, reply: str, stats: TurnStats
) -> schemas.ChatResponse:
    read = memory_read(engine, db, session_id, stats.read)
    return schemas.ChatResponse(
        session_id=session_id,
        message_id=stats.reply_message_id,
        user_message_id=stats.user_message_id,
        reply=reply,
        finish_reason=stats.finish_reason,
        usage=usage(stats),
        memory_read=read,
        timings=schemas.Timings(
            first_token_s=stats.first_token_seconds,
            total_s=stats.seconds,
            memory_read_s=stats.read_seconds,
            memory_write_s=stats.write_seconds,
        ),
    )


def usage(stats: TurnStats) -> schemas.Usage:
    return schemas.Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=stats.prompt_tokens + stats.completion_tokens,
        memory_tokens=stats.memory_tokens,
        memory_tokens_read=len(stats.read.tokens) if stats.read else 0,
    )
