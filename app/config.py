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
    # int4 by default: the bundled GGUF's own 4-bit grid (Q4_1), 1.5x the decode rate of int8
    # here, closer to fp32 than int8, and the same recall-dev-hard mc (0.700)
    weights: Literal["fp32", "bf16", "int8", "int4"] = Field(
        "int4",
        description="Format of the model's linear weights: int4 (weight-only, 4-bit per group of "
        "32 inputs; fastest decoding on CPU), int8 (per channel), bf16, or fp32 (exact). "
        "See app/weights.py.",
    )

    # conversations
    window: int = Field(1024, ge=32, le=8192, description="Default working window in tokens.")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="Default reply length cap.")
    temperature: float = Field(
        0.0, ge=0, le=2, description="Sampling temperature when a request gives none (0 = greedy)."
    )
    max_cached_sessions: int = Field(16, ge=1, description="Sessions kept in RAM (LRU).")
    decode_batch: int = Field(
        4,
        ge=1,
        le=64,
        description="Sessions whose decoding steps share one forward pass when they generate at "
        "the same time (1: each on its own).",
    )

    # server
    host: str = Field("127.0.0.1", description="Address `python -m app serve` binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port `python -m app serve` binds.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging.")
    json_logs: bool = Field(True, description="JSON log lines (else plain text).")

    # auth
    auth_enabled: bool = Field(
        False,
        description="Require an API key (Authorization: Bearer) on /v1; off: every request "
        "acts as the tenant 'local'.",
    )
    allow_insecure: bool = Field(
        False,
        description="Start with auth off on an address other than loopback (refused otherwise).",
    )

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
    max_sessions_per_tenant: int = Field(
        1000, ge=0, description="Most sessions a tenant may hold (more: 403); 0 = no limit."
    )
    max_memory_capacity: int = Field(
        65536,
        ge=1,
        description="Largest memory capacity (entries per layer and KV head) a session may have "
        "(above: 422); also caps the default.",
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=0,
        description="Requests per minute per API key (token bucket per process, bursts up to a "
        "minute's worth; more: 429); 0 = no limit.",
    )


LOOPBACK_HOSTS = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name a server binds) reaches only this machine."""
    import ipaddress

    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything


class InsecureConfig(RuntimeError):
    """Auth is off and the server would listen beyond this machine."""


def check_exposure(settings: Settings, host: str | None = None) -> None:
    """Refuse to serve without auth on a non-loopback address unless `allow_insecure` says so.
    Raises InsecureConfig with what to do."""
    host = settings.host if host is None else host
    if settings.auth_enabled or settings.allow_insecure or is_loopback(host):
        return
    raise InsecureConfig(
        f"refusing to listen on {host} with auth off: anyone who reaches it could read and "
        "change every session. Set MEMCHAT_AUTH_ENABLED=true (and create keys with "
        "`python -m app keys create --tenant NAME`), listen on 127.0.0.1, or set "
        "MEMCHAT_ALLOW_INSECURE=true to accept it."
    )
