"""The HTTP API: submit jobs, follow them, fetch predictions/metrics/artifacts, manage models.

``create_app(settings)`` builds the FastAPI app (OpenAPI docs at ``/docs``). Submission goes
through :mod:`scheduler.submission`, exactly like the CLI. The process never imports torch.
Request/response models live in :mod:`scheduler.api_models`, the ASGI guards in
:mod:`scheduler.api_guards`.

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
import csv
import hmac
import io
import logging
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from scheduler import repository, submission, web
from scheduler.api_guards import (
    UNAUTHORIZED_DETAIL,
    WWW_AUTHENTICATE,
    BodyLimitMiddleware,
    TokenAuthMiddleware,
)
from scheduler.api_models import (
    BODY_BYTES_BASE,
    BODY_BYTES_PER_PATH,
    CSV_FLUSH_BYTES,
    ERROR_RESPONSES,
    MAX_ID,
    MAX_PAGE,
    ArtifactOut,
    ClassifyRequest,
    EpochOut,
    ErrorOut,
    EvaluateRequest,
    EvaluationOut,
    HealthOut,
    JobCreated,
    JobIdPath,
    JobOut,
    JobPage,
    MetricsOut,
    ModelIdPath,
    ModelOut,
    PredictionOut,
    PredictionPage,
    TrainRequest,
    printable,
)
from scheduler.database import (
    DatabaseNotMigratedError,
    ensure_migrated,
    make_engine,
    make_session_factory,
)
from scheduler.paths import InvalidPathError, PathOutsideRootsError, confine
from scheduler.schema import JobKind, JobStatus

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from scheduler.dispatch import Dispatcher
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
    size = int(settings.api_db_pool_size)
    # Up to ``size`` more under a burst; a request that finds all busy for pool_timeout
    # seconds gets 503 + Retry-After instead of a 500 or an unbounded wait.
    return make_engine(url, pool_size=size, max_overflow=size,
                       pool_timeout=float(settings.api_db_pool_timeout))


def _unavailable(detail: str, retry_after: float) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503,
                        headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """Build the API for ``settings``; stops with DatabaseNotMigratedError on an unmigrated
    database (every process checks the schema before serving)."""
    engine = _engine(settings)
    ensure_migrated(engine)
    sessions = make_session_factory(engine)
    state: dict[str, Dispatcher] = {}

    def dispatcher() -> Dispatcher:
        # Created on first use: building the Celery app costs time the docs page does not need.
        if "d" not in state:
            from scheduler.dispatch import Dispatcher

            state["d"] = Dispatcher(settings)
        return state["d"]

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if "d" in state:
            with contextlib.suppress(Exception):
                state["d"].close()
        engine.dispose()

    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    bearer = HTTPBearer(auto_error=False, description="Required when MRIQ_API_TOKEN is set.")

    # TokenAuthMiddleware refuses a wrong token before the body is read; this dependency
    # declares the scheme in the OpenAPI document and checks again behind it.
    # Depends() as a default, not inside Annotated: with postponed annotations FastAPI
    # resolves annotation strings in module globals, where this closure's ``bearer`` is not.
    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail=UNAUTHORIZED_DETAIL,
                headers={"WWW-Authenticate": WWW_AUTHENTICATE},
            )

    app = FastAPI(
        title="mriq",
        version="0.1.0",
        description=(
            "Batch jobs that train, evaluate and apply CNN classifiers for brain MRI slices. "
            "Jobs run on workers; this API stores them and reports their progress and results."
        ),
        lifespan=lifespan,
    )
    limit = BODY_BYTES_BASE + BODY_BYTES_PER_PATH * int(settings.max_paths_per_job)
    app.add_middleware(BodyLimitMiddleware, limit=limit)
    if token is not None:
        # Added last, so it runs first: the token before the body limit, before the body.
        public = {"/health", app.docs_url, app.redoc_url, app.openapi_url,
                  app.swagger_ui_oauth2_redirect_url}
        app.add_middleware(TokenAuthMiddleware, token=token,
                           public={p for p in public if p is not None})
    auth = [Depends(require_token)]
    max_paths = int(settings.max_paths_per_job)

    # ---------------------------------------------------------------- error mapping

    def _json_error(status: int, exc: BaseException) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(repository.NotFoundError)
    async def _not_found(_r: Request, exc: repository.NotFoundError) -> JSONResponse:
        return _json_error(404, exc)

    @app.exception_handler(PathOutsideRootsError)
    async def _outside(_r: Request, exc: PathOutsideRootsError) -> JSONResponse:
        # Rebuilt without ``resolved``: where a symlink points outside the roots is itself
        # information about the host the client must not get.
        return _json_error(403, PathOutsideRootsError(exc.path, exc.roots))

    @app.exception_handler(InvalidPathError)
    async def _invalid_path(_r: Request, exc: InvalidPathError) -> JSONResponse:
        return _json_error(422, exc)

    @app.exception_handler(submission.SubmissionError)
    async def _refused(_r: Request, exc: submission.SubmissionError) -> JSONResponse:
        if isinstance(exc, submission.TooManyInputsError):
            return _json_error(413, exc)
        if isinstance(exc, submission.NoProductionModelError):
            return _json_error(409, exc)
        return _json_error(422, exc)

    @app.exception_handler(repository.NoRollbackTargetError)
    async def _no_rollback(_r: Request, exc: repository.NoRollbackTargetError) -> JSONResponse:
        return _json_error(409, exc)

    @app.exception_handler(submission.DispatchError)
    async def _dispatch(_r: Request, exc: submission.DispatchError) -> JSONResponse:
        # The reason names the broker's host and port: the log gets it, the client does not.
        log.warning("%s", exc)
        return _unavailable(exc.public_message, RETRY_AFTER_DOWN_S)

    @app.exception_handler(DatabaseNotMigratedError)
    async def _unmigrated(_r: Request, exc: DatabaseNotMigratedError) -> JSONResponse:
        return _json_error(503, exc)

    @app.exception_handler(PoolTimeoutError)
    async def _pool_exhausted(_r: Request, exc: PoolTimeoutError) -> JSONResponse:
        # Every pooled connection stayed busy for pool_timeout seconds: the database is up
        # but slow or overloaded; a client that comes back shortly will likely get through.
        size = int(settings.api_db_pool_size)
        return _unavailable(
            f"database busy: all {2 * size} connections of the API stayed in use for "
            f"{settings.api_db_pool_timeout:g} s (settings.api_db_pool_size); retry later",
            settings.api_db_pool_timeout,
        )

    @app.exception_handler(SQLAlchemyError)
    async def _db_down(_r: Request, exc: SQLAlchemyError) -> JSONResponse:
        # Inputs are validated before SQL; what reaches here is the database being unavailable.
        return _unavailable(f"database unavailable: {type(exc).__name__}", RETRY_AFTER_DOWN_S)

    # ---------------------------------------------------------------- jobs

    @app.post("/jobs/classify", response_model=JobCreated, status_code=201, tags=["jobs"],
              dependencies=auth, responses={**ERROR_RESPONSES, 403: {"model": ErrorOut},
                                            409: {"model": ErrorOut}, 413: {"model": ErrorOut}})
    def submit_classify(body: ClassifyRequest) -> JobCreated:
        """Classify images: one job, its inputs split into chunks that workers run in
        parallel. Folders and globs are expanded on the server (403 outside the data roots,
        413 beyond settings.max_paths_per_job items)."""
        if len(body.inputs) > max_paths:
            raise submission.TooManyInputsError(max_paths)
        job_id = submission.submit_classify(
            sessions, dispatcher(), settings, body.inputs,
            model_version_id=body.model_version_id, submitter="api", top_k=body.top_k,
        )
        return JobCreated(id=job_id)

    @app.post("/jobs/train", response_model=JobCreated, status_code=201, tags=["jobs"],
              dependencies=auth, responses={**ERROR_RESPONSES, 403: {"model": ErrorOut}})
    def submit_train(body: TrainRequest) -> JobCreated:
        """Train a model version on a folder of class folders (registered as a candidate)."""
        options = body.model_dump(exclude={"data"})
        job_id = submission.submit_train(
            sessions, dispatcher(), settings, body.data, options, submitter="api"
        )
        return JobCreated(id=job_id)

    @app.post("/jobs/evaluate", response_model=JobCreated, status_code=201, tags=["jobs"],
              dependencies=auth, responses={**ERROR_RESPONSES, 403: {"model": ErrorOut}})
    def submit_evaluate(body: EvaluateRequest) -> JobCreated:
        """Evaluate a model version on every image of a labelled folder."""
        job_id = submission.submit_evaluate(
            sessions, dispatcher(), settings, model_version_id=body.model_version_id,
            data_dir=body.data, submitter="api",
        )
        return JobCreated(id=job_id)

    @app.get("/jobs", response_model=JobPage, tags=["jobs"], dependencies=auth,
             responses={401: ERROR_RESPONSES[401]})
    def list_jobs(
        status: JobStatus | None = None,
        kind: JobKind | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    ) -> JobPage:
        """Jobs, newest first, optionally filtered by status and kind."""
        with sessions() as session:
            rows = repository.list_jobs(session, status=status, kind=kind, limit=limit,
                                        offset=offset)
            items = [JobOut.model_validate(j) for j in rows]
        return JobPage(items=items, limit=limit, offset=offset,
                       next_offset=offset + limit if len(items) == limit else None)

    @app.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], dependencies=auth,
             responses=ERROR_RESPONSES)
    def get_job(job_id: JobIdPath) -> JobOut:
        """One job with its status and progress (done/total)."""
        with sessions() as session:
            return JobOut.model_validate(repository.get_job(session, job_id))

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"], dependencies=auth,
              responses=ERROR_RESPONSES)
    def cancel(job_id: JobIdPath) -> JobOut:
        """Cancel a job: queued jobs stop at once, running ones at their next check."""
        submission.cancel_job(sessions, dispatcher(), job_id)
        with sessions() as session:
            return JobOut.model_validate(repository.get_job(session, job_id))

    @app.get(
        "/jobs/{job_id}/predictions",
        response_model=PredictionPage,
        tags=["results"],
        dependencies=auth,
        responses={**ERROR_RESPONSES, 200: {"content": {"text/csv": {}},
                                    "description": "A page of predictions, or all as CSV."}},
    )
    def predictions(
        job_id: JobIdPath,
        offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        format: Annotated[Literal["json", "csv"], Query()] = "json",
    ) -> Any:
        """A classify job's predictions in input order. ``format=csv`` streams every row
        (columns item_index, path, label, confidence, top_k as JSON, error); paging applies
        to JSON only."""
        with sessions() as session:
            repository.get_job(session, job_id)  # 404 before any streaming starts
            if format == "json":
                total = repository.count_predictions(session, job_id)
                rows = repository.list_predictions(session, job_id, offset=offset, limit=limit)
                return PredictionPage(
                    job_id=job_id, total=total, offset=offset, limit=limit,
                    items=[PredictionOut.model_validate(r) for r in rows],
                )
        return StreamingResponse(
            _csv_stream(job_id),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="job-{job_id}.csv"'},
        )

    def _csv_stream(job_id: int) -> Iterator[str]:
        # Its own session: the generator runs after the endpoint returned. Memory stays flat
        # (keyset pages from the repository, output flushed every 64 KiB).
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(submission.PREDICTION_COLUMNS)
        with sessions() as session:
            for row in repository.iter_predictions(session, job_id):
                writer.writerow(submission.prediction_csv_row(row))
                if buffer.tell() >= CSV_FLUSH_BYTES:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        yield buffer.getvalue()

    @app.get("/jobs/{job_id}/metrics", response_model=MetricsOut, tags=["results"],
             dependencies=auth, responses=ERROR_RESPONSES)
    def metrics(job_id: JobIdPath) -> MetricsOut:
        """Per-epoch training metrics and the evaluation report (test split or evaluate job)."""
        with sessions() as session:
            repository.get_job(session, job_id)
            epochs = [EpochOut.model_validate(m)
                      for m in repository.list_epoch_metrics(session, job_id)]
            try:
                evaluation: EvaluationOut | None = EvaluationOut.model_validate(
                    repository.get_evaluation(session, job_id)
                )
            except repository.NotFoundError:
                evaluation = None
        return MetricsOut(job_id=job_id, epochs=epochs, evaluation=evaluation)

    @app.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactOut], tags=["results"],
             dependencies=auth, responses=ERROR_RESPONSES)
    def artifacts(job_id: JobIdPath) -> list[ArtifactOut]:
        """Files the job produced (plots, reports); download them from ``url``."""
        with sessions() as session:
            repository.get_job(session, job_id)
            rows = repository.list_artifacts(session, job_id)
            return [ArtifactOut.model_validate(a).model_copy(update={"url": f"/artifacts/{a.id}"})
                    for a in rows]

    @app.get("/artifacts/{artifact_id}", tags=["results"], dependencies=auth,
             response_class=FileResponse,
             responses={**ERROR_RESPONSES, 403: {"model": ErrorOut},
                        200: {"content": {"application/octet-stream": {}}}})
    def download_artifact(
        artifact_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Artifact id.")],
    ) -> FileResponse:
        """Download an artifact file (only files inside the data folder are served)."""
        with sessions() as session:
            artifact = repository.get_artifact(session, artifact_id)
            raw_path = artifact.path
        # A tampered or migrated row must not turn the API into a file server for the host,
        # nor serve the SQLite database or broker messages that live in data_dir too.
        try:
            path = confine(FsPath(raw_path), [settings.jobs_dir, settings.models_dir])
        except PathOutsideRootsError:
            raise HTTPException(
                status_code=403, detail=f"artifact {artifact_id}: outside the data folder"
            ) from None
        except InvalidPathError:
            raise HTTPException(
                status_code=404, detail=f"artifact {artifact_id}: not a valid file path"
            ) from None
        if not path.is_file():
            raise HTTPException(status_code=404, detail=f"artifact {artifact_id}: file missing")
        return FileResponse(path, filename=path.name)

    # ---------------------------------------------------------------- models

    @app.get("/models", response_model=list[ModelOut], tags=["models"], dependencies=auth,
             responses={401: ERROR_RESPONSES[401]})
    def list_models() -> list[ModelOut]:
        """Model versions, newest first."""
        with sessions() as session:
            return [ModelOut.model_validate(m) for m in repository.list_model_versions(session)]

    @app.post("/models/rollback", response_model=ModelOut, tags=["models"], dependencies=auth,
              responses={401: ERROR_RESPONSES[401], 409: {"model": ErrorOut}})
    def rollback() -> ModelOut:
        """Archive the production model and restore the previously promoted one."""
        with sessions() as session, session.begin():
            return ModelOut.model_validate(repository.rollback_production(session))

    @app.get("/models/{model_id}", response_model=ModelOut, tags=["models"], dependencies=auth,
             responses=ERROR_RESPONSES)
    def get_model(model_id: ModelIdPath) -> ModelOut:
        """One model version with its metrics."""
        with sessions() as session:
            return ModelOut.model_validate(repository.get_model_version(session, model_id))

    @app.post("/models/{model_id}/promote", response_model=ModelOut, tags=["models"],
              dependencies=auth, responses=ERROR_RESPONSES)
    def promote(model_id: ModelIdPath) -> ModelOut:
        """Make a model version the production model (the previous one is archived)."""
        with sessions() as session, session.begin():
            return ModelOut.model_validate(repository.promote_model_version(session, model_id))

    # ---------------------------------------------------------------- health

    @app.get("/health", response_model=HealthOut, tags=["health"],
             responses={503: {"model": HealthOut}})
    def health() -> Any:
        """Database and broker reachability (no authentication: for load balancers and
        container health checks; it reveals nothing but two booleans)."""
        database = _database_ok()
        broker = _broker_ok()
        body = HealthOut(status="ok" if database and broker else "degraded",
                         database=database, broker=broker)
        return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)

    def _database_ok() -> bool:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def _broker_ok() -> bool:
        try:
            with dispatcher().app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False

    app.include_router(web.create_router(settings, sessions, dispatcher))
    return app
