"""Settings: one pydantic-settings class, from the environment (``MEMCHAT_*``) and ``.env``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    """Dequantized model cache: ``$XDG_CACHE_HOME/memchat`` or ``~/.cache/memchat``."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memchat"


class Settings(BaseSettings):
    """Every setting of the service; built once by whoever starts the process, never at import."""

    model_config = SettingsConfigDict(env_prefix="MEMCHAT_", env_file=".env", extra="ignore")

    database_url: str = Field("sqlite:///memchat.db", description="SQLAlchemy URL of the store.")
    model_path: Path | None = Field(
        None,
        description="Local Hugging Face Llama-family model directory; unset = bundled SmolLM2.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="Dequantized model cache."
    )
    window: int = Field(1024, ge=32, description="Working window in tokens.")
    max_new_tokens: int = Field(256, ge=1, description="Reply length cap per turn.")
    threads: int | None = Field(None, ge=1, description="torch threads; unset = torch default.")
