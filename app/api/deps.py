"""Dependencies of the route handlers, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from app.api.errors import APIError
from app.config import Settings
from app.engine import Engine
from app.observability import Metrics


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    """The chat engine; 503 while the model is still loading."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        failed = getattr(request.app.state, "load_error", None)
        message = f"model failed to load: {failed}" if failed else "model is loading; retry soon"
        raise APIError(
            503, message, "service_unavailable", "not_ready", headers={"Retry-After": "5"}
        )
    return engine


def get_db(request: Request) -> sessionmaker[DbSession]:
    db: sessionmaker[DbSession] = request.app.state.db
    return db


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


class Paging:
    """``?limit=&offset=`` of a list endpoint."""

    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000, description="Items to skip.")] = 0,
    ) -> None:
        self.limit, self.offset = limit, offset


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
DbDep = Annotated[sessionmaker[DbSession], Depends(get_db)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PagingDep = Annotated[Paging, Depends()]
