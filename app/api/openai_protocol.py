"""Wire models of the OpenAI-compatible endpoint (``/v1/chat/completions``, ``/v1/models``).

Request fields follow the order of OpenAI's reference. Unknown fields are ignored, as OpenAI's
clients send newer ones; fields memchat cannot honour (``n`` > 1, tools, logprobs) are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.api.schemas import Storable, check_min_tokens


class TextPart(Storable):
    type: Literal["text"]
    text: str


class ChatMessage(Storable):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def memchat_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(Storable):
    """Body of ``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str = "memchat"
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    max_tokens: int | None = Field(None, ge=1, le=4096, description="Deprecated alias.")
    min_tokens: int | None = Field(
        None, ge=0, le=4096, description="The reply does not end before this many tokens (vLLM)."
    )
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    tools: list[dict[str, Any]] | None = None
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = Field(None, max_length=200, description="Names the session (memchat).")

    @field_validator("min_tokens", mode="after")
    @classmethod
    def _min_within_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        check_min_tokens(
            value, info.data.get("max_completion_tokens") or info.data.get("max_tokens")
        )
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "memchat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
