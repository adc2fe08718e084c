"""The HTTP API: submit jobs, follow them, fetch predictions/metrics/artifacts, manage models.

``create_app(settings)`` builds the FastAPI app (OpenAPI docs at ``/docs``). Submission goes
through :mod:`scheduler.submission`, exactly like the CLI. The process never imports torch.
Request/response models live in :mod:`scheduler.api_models`, the ASGI guards in
:mod:`scheduler.api_guards`, the routes in :mod:`scheduler.endpoints` (one router per
resource); this module wires them together and maps exceptions to status codes.

Security and robustness rules:
- When ``settings.api_token`` is set every route except ``/health`` and the docs needs
  ``Authorization: Bearer <token>`` (401 with ``WWW-Authenticate`` otherwise; compared in
  constant time). The token is checked on the headers, before any byte of the body is read
  (FastAPI parses bodies before dependencies run, so a dependency alone would let an
  anonymous client make the server parse ~100 MB of JSON).
- Input paths are confined to ``settings.data_roots`` (403, nothing read or stored; the
  message names the submitted path, never what a symlink or glob resolved to outside);
  artifact downloads are confined to the job and model folders under ``settings.data_dir``
  (never the database or the broker's files). Responses name no server path (checkpoint
  files, artifact locations): ids and download URLs only.
- Request bodies of authenticated clients are bounded before they are parsed (413), as are
  classify inputs (``settings.max_paths_per_job``) and every string; ids are bounded to the
  column range. Bad input gives 4xx (404 unknown id, 422 malformed), never 500.
- An unavailable dependency is a 503 with ``Retry-After``, never a 500: the database down,
  every pooled connection busy for ``settings.api_db_pool_timeout`` seconds, or the broker
  refusing a new job (the job is then marked failed, not left queued).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from scheduler import repository, web
from scheduler.api_guards import BodyLimitMiddleware, TokenAuthMiddleware
from scheduler.api_models import BODY_BYTES_BASE, BODY_BYTES_PER_PATH, printable
from scheduler.database import (
    DatabaseNotMigratedError,
    ensure_migrated,
    make_engine,
    make_session_factory,
)
from scheduler.endpoints import health, jobs, models, results, review
from scheduler.endpoints.deps import ApiState, api_state
from scheduler.paths import InvalidPathError, PathOutsideRootsError
from scheduler.refusals import (
    DispatchError,
    NoProductionModelError,
    SubmissionError,
    TooManyInputsError,
)
from scheduler.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

#: Seconds a client is told to wait after a 503 for an unreachable database or broker.
RETRY_AFTER_DOWN_S = 5


def _engine(settings: Settings) -> Engine:
    """The API's engine, its pool bounded by the settings (a file or server database)."""
    url = settings.resolved_database_url
    if make_url(url).database in (None, "", ":memory:"):
        return make_engine(url)  # one in-memory connection: no queue pool to size
    size = settings.api_db_pool_size
    # Up to ``size`` more under a burst; a request that finds all busy for pool_timeout
    # seconds gets 503 + Retry-After instead of a 500 or an unbounded wait.
    return make_engine(url, pool_size=size, max_overflow=size,
                       pool_timeout=settings.api_db_pool_timeout)


def create_app(settings: Settings) -> FastAPI:
    """Build the API for ``settings``; stops with DatabaseNotMigratedError on an unmigrated
    database (every process checks the schema before serving)."""
    engine = _engine(settings)
    ensure_migrated(engine)
    state = ApiState(settings=settings, engine=engine, sessions=make_session_factory(engine))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(
        title="mriq",
        version="0.1.0",
        description=(
            "Batch jobs that train, evaluate and apply CNN classifiers for brain MRI slices. "
            "Jobs run on workers; this API stores them and reports their progress and results."
        ),
        lifespan=lifespan,
    )
    app.state.mriq = state
    _add_guards(app, settings)
    _add_exception_handlers(app)
    # Every router is included here (web and uploads too, once they exist).
    for router in (jobs.router, results.router, models.router, health.router,
                   review.review_router):
        app.include_router(router)
    app.include_router(web.create_router(settings, state.sessions, state.dispatcher))
    return app


def _add_guards(app: FastAPI, settings: Settings) -> None:
    limit = BODY_BYTES_BASE + BODY_BYTES_PER_PATH * settings.max_paths_per_job
    app.add_middleware(BodyLimitMiddleware, limit=limit)
    if settings.api_token is not None:
        # Added last, so it runs first: the token before the body limit, before the body.
        public = {"/health", app.docs_url, app.redoc_url, app.openapi_url,
                  app.swagger_ui_oauth2_redirect_url}
        app.add_middleware(TokenAuthMiddleware, token=settings.api_token.get_secret_value(),
                           public={p for p in public if p is not None})


# --------------------------------------------------------------------------------------
# Exceptions -> status codes
# --------------------------------------------------------------------------------------


def _json_error(status: int, exc: BaseException) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status)


def _unavailable(detail: str, retry_after: float) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503,
                        headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


async def _invalid_request(_r: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes each bad ``input`` back, and rendering that fails (a 500)
    # for the very inputs being refused: NaN/Infinity (not JSON) and lone surrogates
    # (not UTF-8). Location, message and type say what is wrong without the echo.
    detail = [
        {
            "loc": [printable(part) for part in error.get("loc", ())],
            "msg": printable(error.get("msg", "")),
            "type": printable(error.get("type", "")),
        }
        for error in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


async def _not_found(_r: Request, exc: repository.NotFoundError) -> JSONResponse:
    return _json_error(404, exc)


async def _outside(_r: Request, exc: PathOutsideRootsError) -> JSONResponse:
    # Rebuilt without ``resolved``: where a symlink points outside the roots is itself
    # information about the host the client must not get.
    return _json_error(403, PathOutsideRootsError(exc.path, exc.roots))


async def _invalid_path(_r: Request, exc: InvalidPathError) -> JSONResponse:
    return _json_error(422, exc)


async def _refused(_r: Request, exc: SubmissionError) -> JSONResponse:
    if isinstance(exc, TooManyInputsError):
        return _json_error(413, exc)
    if isinstance(exc, NoProductionModelError):
        return _json_error(409, exc)
    return _json_error(422, exc)


async def _no_rollback(_r: Request, exc: repository.NoRollbackTargetError) -> JSONResponse:
    return _json_error(409, exc)


async def _dispatch(_r: Request, exc: DispatchError) -> JSONResponse:
    # The reason names the broker's host and port: the log gets it, the client does not.
    log.warning("%s", exc)
    return _unavailable(exc.public_message, RETRY_AFTER_DOWN_S)


async def _unmigrated(_r: Request, exc: DatabaseNotMigratedError) -> JSONResponse:
    return _json_error(503, exc)


async def _pool_exhausted(request: Request, exc: PoolTimeoutError) -> JSONResponse:
    # Every pooled connection stayed busy for pool_timeout seconds: the database is up
    # but slow or overloaded; a client that comes back shortly will likely get through.
    settings = api_state(request).settings
    size = settings.api_db_pool_size
    return _unavailable(
        f"database busy: all {2 * size} connections of the API stayed in use for "
        f"{settings.api_db_pool_timeout:g} s (settings.api_db_pool_size); retry later",
        settings.api_db_pool_timeout,
    )


async def _db_down(_r: Request, exc: SQLAlchemyError) -> JSONResponse:
    # Inputs are validated before SQL; what reaches here is the database being unavailable.
    return _unavailable(f"database unavailable: {type(exc).__name__}", RETRY_AFTER_DOWN_S)


def _add_exception_handlers(app: FastAPI) -> None:
    # Registration order is irrelevant: Starlette picks the handler of the nearest class in
    # the exception's MRO (PoolTimeoutError before its base SQLAlchemyError).
    handlers: dict[type[Exception], Callable[..., Awaitable[JSONResponse]]] = {
        RequestValidationError: _invalid_request,
        repository.NotFoundError: _not_found,
        PathOutsideRootsError: _outside,
        InvalidPathError: _invalid_path,
        SubmissionError: _refused,
        repository.NoRollbackTargetError: _no_rollback,
        DispatchError: _dispatch,
        DatabaseNotMigratedError: _unmigrated,
        PoolTimeoutError: _pool_exhausted,
        SQLAlchemyError: _db_down,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
