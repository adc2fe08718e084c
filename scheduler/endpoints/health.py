"""``/health``: database and broker reachability, without authentication."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

from scheduler.api_models import HealthOut
from scheduler.endpoints.deps import ApiState, StateDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
def health(state: StateDep) -> JSONResponse:
    """Database and broker reachability (no authentication: for load balancers and
    container health checks; it reveals nothing but two booleans)."""
    database = _database_ok(state.engine)
    broker = _broker_ok(state)
    body = HealthOut(status="ok" if database and broker else "degraded",
                     database=database, broker=broker)
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)


def _database_ok(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def _broker_ok(state: ApiState) -> bool:
    # The dispatcher is built here, not by a dependency: building it (or the broker being
    # misconfigured) is part of what this route reports on, never a 500.
    try:
        with state.dispatcher().app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
