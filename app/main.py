"""The FastAPI app factory: settings, database, model (loaded once, in the background), routes.

``create_app()`` builds everything from ``Settings``; nothing happens at import. Start it with
``python -m app serve`` (uvicorn) or ``uvicorn --factory app.main:create_app``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import sessionmaker

from app.api import errors
from app.api.deps import get_caller
from app.api.routes import chat, health, memory, openai, sessions
from app.auth import KeyChecker, RateLimiter
from app.config import Settings, check_exposure, is_loopback
from app.db import make_engine, upgrade_database
from app.engine import Engine
from app.model import LoadedModel, load_model
from app.observability import Metrics, RequestContextMiddleware, configure_logging
from memory_store import MemoryParams

log = logging.getLogger("memchat")
WEB_DIR = Path(__file__).parent / "web"  # the page at / (static files, no build step)


def _start_engine(app: FastAPI, settings: Settings, lm: LoadedModel | None) -> None:
    """Load the model and build the engine; /readyz says 503 until this is done."""
    try:
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        if lm is None:
            log.info("loading model", extra={"model_path": str(settings.model_path or "bundled")})
            # transformers' weight-loading bar writes to stderr without a line end: in a server
            # it would splice itself into the next log line (and break a JSON log line)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            lm = load_model(settings.model_path, settings.cache_dir, weights=settings.weights)
        engine = Engine(
            lm,
            app.state.db,
            window=settings.window,
            params=default_params(settings),
            max_new_tokens=settings.max_new_tokens,
            max_cached_sessions=settings.max_cached_sessions,
            lock_timeout=settings.lock_timeout,
            decode_batch=settings.decode_batch,
        )
        app.state.metrics.set_memory_entries_function(engine.cached_memory_entries)
        app.state.engine = engine
        log.info("model ready", extra={"model": lm.name})
    except Exception as exc:  # reported by /readyz and every model route
        app.state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("model failed to load")


def default_params(settings: Settings) -> MemoryParams:
    """Memory parameters of a session that asks for none: the defaults, the capacity capped at
    `max_memory_capacity`."""
    params = MemoryParams()
    return MemoryParams.from_dict(
        params.to_dict() | {"capacity": min(params.capacity, settings.max_memory_capacity)}
    )


def create_app(settings: Settings | None = None, lm: LoadedModel | None = None) -> FastAPI:
    """Build the app. ``lm``: an already loaded model (tests share one); otherwise the model is
    loaded in a background thread after start-up.

    Start-up fails (`InsecureConfig`) when auth is off and ``settings.host`` is not a loopback
    address, unless ``allow_insecure``; ``python -m app serve`` checks the same before it starts
    uvicorn (a bare ``uvicorn --factory`` does not pass its ``--host`` to the settings)."""
    settings = settings or Settings()
    configure_logging(settings.log_level, json_logs=settings.json_logs)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_exposure(settings)
        if not settings.auth_enabled:
            insecure = not is_loopback(settings.host)
            (log.warning if insecure else log.info)(
                "auth is off: every request acts as the tenant 'local'",
                extra={"host": settings.host},
            )
        if settings.auto_migrate:
            await run_in_threadpool(upgrade_database, settings.database_url)
        bind = make_engine(settings.database_url)
        app.state.db = sessionmaker(bind, expire_on_commit=False)
        app.state.keys = KeyChecker(app.state.db)
        if lm is not None:
            _start_engine(app, settings, lm)
        else:
            threading.Thread(
                target=_start_engine, args=(app, settings, None), name="memchat-load", daemon=True
            ).start()
        yield
        bind.dispose()

    app = FastAPI(
        title="memchat",
        summary="A chatbot whose language model remembers each conversation in its hidden states.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = None
    app.state.load_error = None
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    errors.install(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    # open: health and metrics (for probes and scrapers), the page and its static files
    app.include_router(health.router)
    # everything under /v1 needs a key while auth is on, and acts for the key's tenant
    for module in (sessions, chat, memory, openai):
        app.include_router(
            module.router, dependencies=[Depends(get_caller)], responses=errors.error_responses()
        )
    # the web page, after the API so that no API path is shadowed
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    return app
