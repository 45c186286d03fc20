"""SQLAlchemy 2 models: sessions, messages, and the stored memory.

Storage of the memory (see `memory_store.persistence` for the write/read rules):

- ``memory_chunks``: one row per (session, save, layer) with the entries that save wrote for that
  layer, all KV heads together: ``heads`` int8 [n], ``entry_ids`` int64 [n], ``keys``/``values``
  fp16 [n, D], ``message_ids``/``token_ids`` int64, ``positions``/``turn_written``/``refreshed``
  int32, ``s0``/``attention`` float32. A save writes an entry here when it is new, merged (payload
  changed) or moved out of a mostly-dead chunk; a chunk row is never updated, only deleted once
  none of its records is current.
- ``knn_chunks``: the same for the kNN-LM store, one row per (session, save): ``hidden`` fp16 [n,
  Dm] and ``next_token_ids``.
- ``memory_states``: per save one ``log`` row with the state changes (s0, refreshed, attention) of
  entries whose payload did not change, and the ids of stored entries that were removed; from time
  to time a ``snapshot`` (one row per layer, plus the kNN store) of the state of every live entry,
  after which older log rows are deleted. ``slots`` is layer * H + head, -1 for the kNN store.
- ``message_states``: the captured keys/values/hidden states of a message still in the window.

Ownership: every session belongs to a tenant (``tenants``); ``api_keys`` are the tenants' keys,
stored as hashes only. A session made without a tenant belongs to `LOCAL_TENANT_ID`, the tenant
the migration (and ``create_all``) creates, which acts for every request when auth is off.
Session names are unique per tenant.

All arrays are little-endian bytes (LargeBinary: BLOB on SQLite, bytea on PostgreSQL).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    event,
    insert,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def _now() -> datetime:
    return datetime.now(UTC)


def _uuid_hex() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    """Declarative base of every memchat table."""


def _session_fk() -> ForeignKey:
    return ForeignKey("chat_sessions.id", ondelete="CASCADE")


# The tenant of sessions made without one (the CLI chat, auth switched off); a fixed id, so that
# the migration, ``create_all`` and the column default agree on it.
LOCAL_TENANT_ID = "local"
LOCAL_TENANT_NAME = "local"


class Tenant(Base):
    """Who owns sessions and API keys; created with its first key (``python -m app keys``)."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid_hex)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


# ``create_all`` makes the local tenant too, as the migration does (sessions default to it).
event.listen(
    Tenant.__table__,
    "after_create",
    lambda target, connection, **_: connection.execute(
        insert(target).values(id=LOCAL_TENANT_ID, name=LOCAL_TENANT_NAME, created_at=_now())
    ),
)


class ApiKey(Base):
    """An API key of a tenant. Only the key's SHA-256 is stored (see app.auth), with its first
    characters (``prefix``) to tell keys apart in lists."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid_hex)
    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ChatSession(Base):
    """One conversation. The memory_* columns belong to memory_store.persistence."""

    __tablename__ = "chat_sessions"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid_hex)
    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id"), default=LOCAL_TENANT_ID
    )
    # the CLI's --session NAME, the OpenAI endpoint's X-Session-Id / user: unique per tenant
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    system_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    window: Mapped[int] = mapped_column(Integer, default=256)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # MemoryParams.to_dict()
    model: Mapped[str] = mapped_column(String(500), default="")
    turn: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now
    )
    # memory bookkeeping: saves held (optimistic check against stale writers), clock and id counters
    memory_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_turn: Mapped[int] = mapped_column(Integer, default=0)
    memory_next_id: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_next_knn_id: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)  # [L, H, D, Dm]

    messages: Mapped[list[Message]] = relationship(
        back_populates="session",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Message.seq",
    )


class Message(Base):
    """One chat message; `location` says whether its tokens are in the window or in memory."""

    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("session_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(32), _session_fk(), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # order within the session
    role: Mapped[str] = mapped_column(String(20))
    content: Mapped[str] = mapped_column(Text)
    turn: Mapped[int] = mapped_column(Integer, default=0)
    n_tokens: Mapped[int] = mapped_column(Integer, default=0)
    location: Mapped[str] = mapped_column(String(10), default="window")  # "window" | "memory"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    session: Mapped[ChatSession] = relationship(back_populates="messages")


class MemoryChunk(Base):
    """Entries of one layer (all KV heads) written by one save; immutable once written."""

    __tablename__ = "memory_chunks"

    session_id: Mapped[str] = mapped_column(String(32), _session_fk(), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    heads: Mapped[bytes] = mapped_column(LargeBinary)  # int8 [n]
    entry_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n]
    keys: Mapped[bytes] = mapped_column(LargeBinary)  # fp16 [n, D]
    values: Mapped[bytes] = mapped_column(LargeBinary)  # fp16 [n, D]
    message_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n]
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n]
    positions: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n]
    turn_written: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n]
    s0: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n]
    refreshed: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n]
    attention: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n]


class KnnChunk(Base):
    """kNN-LM entries written by one save; immutable once written."""

    __tablename__ = "knn_chunks"

    session_id: Mapped[str] = mapped_column(String(32), _session_fk(), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    entry_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n]
    hidden: Mapped[bytes] = mapped_column(LargeBinary)  # fp16 [n, Dm]
    next_token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n]
    message_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n]
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n]
    positions: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n]
    turn_written: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n]
    s0: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n]
    refreshed: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n]


class MemoryState(Base):
    """Entry states and removals: a per-save log row, or one part of a full snapshot."""

    __tablename__ = "memory_states"

    session_id: Mapped[str] = mapped_column(String(32), _session_fk(), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # log: 0; snapshot: the layer, L for the kNN store
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))  # "log" | "snapshot"
    n: Mapped[int] = mapped_column(Integer)
    slots: Mapped[bytes] = mapped_column(LargeBinary)  # int16 [n]: layer * H + head, -1 = kNN
    entry_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n]
    s0: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n]
    refreshed: Mapped[bytes] = mapped_column(LargeBinary)  # int32 [n]
    attention: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [n]
    n_drop: Mapped[int] = mapped_column(Integer, default=0)
    drop_slots: Mapped[bytes] = mapped_column(LargeBinary)  # int16 [n_drop]
    drop_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [n_drop]


class MessageState(Base):
    """Captured model states of a message still in the window, so the window survives a restart.

    Keyed by (session, message id) with no foreign key to ``messages``: the caller chooses the
    message id (memchat's engine uses the per-session ``Message.seq``, as in memory entries).
    """

    __tablename__ = "message_states"

    session_id: Mapped[str] = mapped_column(String(32), _session_fk(), primary_key=True)
    message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n_tokens: Mapped[int] = mapped_column(Integer)
    n_layers: Mapped[int] = mapped_column(Integer)
    n_kv_heads: Mapped[int] = mapped_column(Integer)
    head_dim: Mapped[int] = mapped_column(Integer)
    hidden_dim: Mapped[int] = mapped_column(Integer)  # 0 when no hidden states were stored
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int64 [T]
    keys: Mapped[bytes] = mapped_column(LargeBinary)  # fp16 [L, H, T, D], pre-RoPE
    values: Mapped[bytes] = mapped_column(LargeBinary)  # fp16 [L, H, T, D]
    hidden: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # fp16 [T, Dm]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


__all__ = [
    "LOCAL_TENANT_ID",
    "LOCAL_TENANT_NAME",
    "ApiKey",
    "Base",
    "ChatSession",
    "KnnChunk",
    "MemoryChunk",
    "MemoryState",
    "Message",
    "MessageState",
    "Tenant",
]
