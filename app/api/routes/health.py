"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.responses import Response

from app.api.deps import DbDep, MetricsDep

router = APIRouter(tags=["health"])


@router.get("/livez")
def livez() -> dict[str, str]:
    """The process answers."""
    return {"status": "alive"}


@router.get("/readyz", responses={503: {"description": "Not ready: the model or the database."}})
def readyz(request: Request, db: DbDep) -> JSONResponse:
    """200 once the model is loaded and the database answers; 503 before, with the reason."""
    checks: dict[str, str] = {}
    state = request.app.state
    if getattr(state, "engine", None) is not None:
        checks["model"] = "ok"
    elif getattr(state, "load_error", None):
        checks["model"] = f"failed: {state.load_error}"
    else:
        checks["model"] = "loading"
    try:
        with db() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # reported, not raised: readiness is the answer
        checks["database"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", include_in_schema=False)
def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
