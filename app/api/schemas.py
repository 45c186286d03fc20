"""Wire models of the native API (``/v1/sessions...``); the OpenAI ones are in ``openai_protocol``.

Inputs forbid unknown fields so that a typo is a 422 naming the field, not a silent default.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Role = Literal["system", "user", "assistant"]


def storable(value: Any) -> Any:
    """Refuse text no database column can hold: NUL (PostgreSQL's text refuses it) and lone
    surrogates (not encodable as UTF-8). Other control characters are kept as sent."""
    for text in value if isinstance(value, list) else [value]:
        if not isinstance(text, str):
            continue
        if "\x00" in text:
            raise ValueError("must not contain NUL (\\u0000) characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("is not valid Unicode (a lone surrogate)") from exc
    return value


class Storable(BaseModel):
    """A request model: strict types (``false`` is not a number, ``"3"`` not an integer) and
    text that can be stored (see `storable`)."""

    model_config = ConfigDict(strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable(value)


def check_min_tokens(min_tokens: int | None, max_tokens: int | None) -> None:
    """A reply cannot be held open past its own length cap: ValueError (a 422) if it would."""
    if min_tokens and max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})")


class _In(Storable):
    model_config = ConfigDict(extra="forbid")


# ----- sessions --------------------------------------------------------------------------------
class MemoryParamsIn(_In):
    """Memory parameters of a new session; any left out take the server's defaults."""

    top_k: int | None = Field(None, ge=1, le=256, description="Entries read per KV head and query.")
    decay: float | None = Field(
        None, gt=0, le=1, description="Strength kept per turn since an entry was last refreshed."
    )
    floor: float | None = Field(None, ge=0, lt=1, description="Entries weaker than this go.")
    capacity: int | None = Field(
        None, ge=1, le=10_000_000, description="Most entries per (layer, KV head)."
    )
    merge_threshold: float | None = Field(
        None, ge=0, le=1.01, description="Key cosine at which a new entry merges (> 1: never)."
    )
    merge_weight: float | None = Field(None, gt=0, le=1, description="w in m <- m + w (h - m).")
    reinforce: float | None = Field(
        None, ge=0, le=100, description="Strength gained per unit of attention received."
    )


class SessionCreate(_In):
    """Body of ``POST /v1/sessions``."""

    title: str | None = Field(None, max_length=200)
    system_prompt: str | None = Field(None, max_length=20_000)
    window: int | None = Field(None, ge=32, le=8192, description="Working window in tokens.")
    memory: MemoryParamsIn | None = None
    memory_enabled: bool = Field(True, description="False: tokens leaving the window are dropped.")


class SessionUpdate(_In):
    """Body of ``PATCH /v1/sessions/{id}``."""

    title: str = Field(max_length=200)


class SessionOut(BaseModel):
    """A session as the API shows it."""

    id: str
    title: str
    system_prompt: str | None
    window: int
    turn: int
    messages: int
    memory_enabled: bool
    memory: dict[str, float | int | str]
    model: str
    created_at: datetime
    updated_at: datetime


class Page(BaseModel):
    """Pagination of a list."""

    total: int
    limit: int
    offset: int


class SessionList(Page):
    data: list[SessionOut]


# ----- messages --------------------------------------------------------------------------------
class MessageIn(_In):
    role: Role
    content: str


class ImportRequest(_In):
    """Body of ``POST /v1/sessions/{id}/messages``: history to append without generating."""

    messages: list[MessageIn] = Field(min_length=1)


class ImportResponse(BaseModel):
    message_ids: list[int]
    turn: int
    memory_entries: int
    memory_tokens: int


class MessageOut(BaseModel):
    """One transcript message. ``location``: window, memory, forgotten or dropped."""

    id: int
    role: str
    content: str
    turn: int
    tokens: int
    location: str
    created_at: datetime


class MessageList(Page):
    data: list[MessageOut]


# ----- chat ------------------------------------------------------------------------------------
class ChatRequest(_In):
    """Body of ``POST /v1/sessions/{id}/chat``."""

    message: str = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] | None = Field(None, max_length=8)
    min_tokens: int = Field(
        0, ge=0, le=4096, description="The reply does not end before this many tokens."
    )

    @field_validator("min_tokens", mode="after")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        check_min_tokens(value, info.data.get("max_tokens"))
        return value


class BandWeights(BaseModel):
    """Share of the memory read's attention per layer band (lower/middle/upper third)."""

    lower: float
    middle: float
    upper: float


class ReadMessage(BaseModel):
    """A message the memory read attended to; ``weight`` is its share of the memory's attention
    (all layers), ``bands`` its share within each layer band."""

    message_id: int
    role: str
    content: str
    weight: float
    bands: BandWeights


class ReadToken(BaseModel):
    """A remembered token the memory read attended to."""

    message_id: int
    position: int
    token: str
    weight: float
    bands: BandWeights


class MemoryRead(BaseModel):
    """What the memory read attended to. ``memory_share``: the fraction of all attention (every
    layer, head and query token) that went to memory rather than the window."""

    memory_share: float
    messages: list[ReadMessage]
    tokens: list[ReadToken]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    memory_tokens: int = Field(description="Tokens held in the session's memory.")
    memory_tokens_read: int = Field(description="Remembered tokens the read attended to.")


class Timings(BaseModel):
    first_token_s: float | None
    total_s: float
    memory_read_s: float
    memory_write_s: float


class ChatResponse(BaseModel):
    """A finished turn (the body without streaming, the ``done`` event with it)."""

    session_id: str
    message_id: int
    user_message_id: int
    reply: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    memory_read: MemoryRead
    timings: Timings


# ----- memory ----------------------------------------------------------------------------------
class RememberedMessageOut(BaseModel):
    message_id: int
    role: str
    content: str
    turn: int
    tokens: int = Field(description="Remembered tokens.")
    entries: int = Field(description="Key/value entries over all layers and KV heads.")
    mean_strength: float
    min_strength: float
    turn_written: int
    age_turns: int
    attention: float = Field(description="Attention mass its entries received so far.")


class WindowOut(BaseModel):
    size: int
    tokens: int
    message_ids: list[int]


class MemoryOut(Page):
    """``GET /v1/sessions/{id}/memory``: the remembered messages (one page) and totals."""

    session_id: str
    turn: int
    entries: int
    tokens: int
    bytes: int
    capacity: int = Field(description="Most entries per (layer, KV head).")
    window: WindowOut
    messages: list[RememberedMessageOut]


class QueryRequest(_In):
    """Body of ``POST /v1/sessions/{id}/memory/query``."""

    text: str = Field(min_length=1)
    top_tokens: int = Field(50, ge=1, le=1000)


class ForgetResponse(BaseModel):
    removed_entries: int


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    """The one error shape of every endpoint."""

    error: ErrorBody
