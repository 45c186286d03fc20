"""Settings: one pydantic-settings class, from the environment (``MEMCHAT_*``) and ``.env``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    """Dequantized model cache: ``$XDG_CACHE_HOME/memchat`` or ``~/.cache/memchat``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memchat"


class Settings(BaseSettings):
    """Every setting of the service; built once by whoever starts the process, never at import."""

    model_config = SettingsConfigDict(env_prefix="MEMCHAT_", env_file=".env", extra="ignore")

    # storage and model
    database_url: str = Field("sqlite:///memchat.db", description="SQLAlchemy URL of the store.")
    auto_migrate: bool = Field(True, description="Run the Alembic migrations at server start.")
    model_path: Path | None = Field(
        None,
        description="Local Hugging Face Llama-family model directory; unset = bundled SmolLM2.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="Dequantized model cache."
    )
    threads: int | None = Field(None, ge=1, description="torch threads; unset = torch default.")

    # conversations
    window: int = Field(1024, ge=32, le=8192, description="Default working window in tokens.")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="Default reply length cap.")
    temperature: float = Field(
        0.0, ge=0, le=2, description="Sampling temperature when a request gives none (0 = greedy)."
    )
    max_cached_sessions: int = Field(16, ge=1, description="Sessions kept in RAM (LRU).")

    # server
    host: str = Field("127.0.0.1", description="Address `python -m app serve` binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port `python -m app serve` binds.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging.")
    json_logs: bool = Field(True, description="JSON log lines (else plain text).")

    # limits
    lock_timeout: float = Field(
        30.0, ge=0, description="Seconds a request waits for a busy session before a 409."
    )
    max_message_chars: int = Field(
        32000, ge=1, description="Longest chat message in characters (longer: 413)."
    )
    max_import_messages: int = Field(
        2000, ge=1, description="Most messages one history import may carry (more: 413)."
    )
