"""The HTTP API: submit jobs, follow them, fetch predictions/metrics/artifacts, manage models.

``create_app(settings)`` builds the FastAPI app (OpenAPI docs at ``/docs``). Submission goes
through :mod:`scheduler.submission`, exactly like the CLI. The process never imports torch.

Security and robustness rules:
- When ``settings.api_token`` is set every route except ``/health`` and the docs needs
  ``Authorization: Bearer <token>`` (401 with ``WWW-Authenticate`` otherwise; compared in
  constant time).
- Input paths are confined to ``settings.data_roots`` (403, nothing read or stored; the
  message names the submitted path, never what a symlink or glob resolved to outside);
  artifact downloads are confined to the job and model folders under ``settings.data_dir``
  (never the database or the broker's files).
- Request bodies are bounded before they are parsed (413), as are classify inputs
  (``settings.max_paths_per_job``) and every string; ids are bounded to the column range.
  Bad input gives 4xx (404 unknown id, 422 malformed), never 500.
"""

from __future__ import annotations

import contextlib
import csv
import hmac
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from datetime import datetime
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from scheduler import repository, submission
from scheduler.database import (
    DatabaseNotMigratedError,
    ensure_migrated,
    make_engine,
    make_session_factory,
)
from scheduler.paths import InvalidPathError, PathOutsideRootsError, confine
from scheduler.schema import JobKind, JobStatus, ModelStage

if TYPE_CHECKING:
    from scheduler.dispatch import Dispatcher
    from scheduler.settings import Settings

__all__ = ["create_app"]

# Ids are INTEGER columns: a larger value would overflow in PostgreSQL (a 500), so refuse it.
MAX_ID = 2**31 - 1
# Budget per classify input when bounding the request body (paths average far less).
BODY_BYTES_PER_PATH = 1024
BODY_BYTES_BASE = 64 * 1024
MAX_PAGE = 1000
CSV_FLUSH_BYTES = 64 * 1024


def _printable(value: Any) -> Any:
    """``value`` safe to put in a JSON response: ints stay, text loses lone surrogates."""
    if isinstance(value, int):
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _clean_text(value: str) -> str:
    # NUL bytes and lone surrogates pass JSON parsing but break os calls and UTF-8 columns.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 (no lone surrogates)") from None
    return value


PathText = Annotated[
    str, Field(min_length=1, max_length=submission.MAX_PATH_CHARS), AfterValidator(_clean_text)
]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
JobIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="Job id.")]
ModelIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="Model version id.")]


# --------------------------------------------------------------------------------------
# Request / response models
# --------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Request):
    inputs: list[PathText] = Field(
        ...,
        min_length=1,
        description=(
            "Image files, folders (recursive), globs or @list.txt files on the server, inside "
            "the data roots. At most settings.max_paths_per_job entries (413 beyond)."
        ),
    )
    model_version_id: Id | None = Field(None, description="Default: the production model.")
    top_k: int = Field(3, ge=1, le=44)


class TrainRequest(_Request):
    data: PathText = Field(..., description="Folder of class folders on the server.")
    arch: Literal[
        "efficientnet_b0", "efficientnet_b3", "resnet18", "resnet50", "densenet121",
        "mobilenet_v3_large", "convnext_tiny",
    ] = "efficientnet_b0"
    epochs: int = Field(10, ge=1, le=10_000)
    image_size: int = Field(224, ge=32, le=2048)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=10)
    labels: Literal["15", "44"] = "15"
    finetune: bool = False
    weights: PathText = Field("auto", description="auto, none, imagenet or a checkpoint path.")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: str | None = Field(
        None, max_length=16, pattern=r"^(auto|cpu|cuda|mps|cuda:\d{1,3})$",
        description="Default: settings.default_device.",
    )
    warm_start: bool = Field(False, description="Start from the production model's weights.")


class EvaluateRequest(_Request):
    model_version_id: Id
    data: PathText = Field(..., description="Folder of class folders; every image is used.")


class JobCreated(BaseModel):
    id: int


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: JobKind
    status: JobStatus
    params: dict[str, Any]
    progress_done: int
    progress_total: int
    submitter: str | None
    error: str | None
    cancel_requested: bool
    model_version_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    items: list[JobOut]
    limit: int
    offset: int
    next_offset: int | None


class PredictionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    item_index: int
    path: str
    file_sha256: str | None
    label: str | None
    confidence: float | None
    top_k: list[tuple[str, float]]
    error: str | None


class PredictionPage(BaseModel):
    job_id: int
    total: int
    offset: int
    limit: int
    items: list[PredictionOut]


class EpochOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    val_macro_f1: float | None
    lr: float | None
    seconds: float | None


class EvaluationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    model_version_id: int | None
    dataset: str | None
    accuracy: float | None
    macro_f1: float | None
    report: dict[str, Any]


class MetricsOut(BaseModel):
    job_id: int
    epochs: list[EpochOut]
    evaluation: EvaluationOut | None


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: int
    model_version_id: int | None
    kind: str
    path: str
    created_at: datetime
    url: str = ""


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: int
    arch: str
    label_mode: str
    classes: list[str]
    checkpoint_path: str
    checkpoint_sha256: str
    training_job_id: int | None
    metrics: dict[str, Any]
    stage: ModelStage
    created_at: datetime
    promoted_at: datetime | None
    temperature: float = Field(
        1.0, description="Temperature the reported confidences are scaled with (1.0: raw)."
    )
    calibrated: bool = Field(
        False, description="False for a model trained before calibration (temperature 1.0)."
    )
    ece: float | None = Field(None, description="Test-split ECE after the temperature.")
    ece_uncalibrated: float | None = Field(None, description="Test-split ECE before it.")
    nll: float | None = Field(None, description="Test-split NLL after the temperature.")
    nll_uncalibrated: float | None = Field(None, description="Test-split NLL before it.")


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: bool
    broker: bool


class ErrorOut(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or wrong bearer token."},
    404: {"model": ErrorOut, "description": "Unknown job, model version or artifact."},
}


# --------------------------------------------------------------------------------------
# Body size limit (before parsing)
# --------------------------------------------------------------------------------------


class _BodyTooLarge(HTTPException):
    # An HTTPException, because FastAPI turns any other error raised while it reads the
    # body into "400 error parsing the body"; this way a streamed (chunked) body over the
    # limit gets its 413 from the app's own handler.
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body larger than {limit} bytes")


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class BodyLimitMiddleware:
    """Refuse request bodies above ``limit`` bytes with 413 before they are parsed.

    Checks Content-Length up front and also counts streamed (chunked) bodies, so a client
    cannot make the server buffer an unbounded JSON document.
    """

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False  # the server rejects malformed lengths itself
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        seen = 0
        started = False

        async def counting_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: Any, receive: Any, send: Any) -> None:
        response = JSONResponse(
            {"detail": f"request body larger than {self.limit} bytes"}, status_code=413
        )
        await response(scope, receive, send)


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """Build the API for ``settings``; stops with DatabaseNotMigratedError on an unmigrated
    database (every process checks the schema before serving)."""
    engine = make_engine(settings.resolved_database_url)
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
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="mriq"'},
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
                "loc": [_printable(part) for part in error.get("loc", ())],
                "msg": _printable(error.get("msg", "")),
                "type": _printable(error.get("type", "")),
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
        return _json_error(503, exc)

    @app.exception_handler(DatabaseNotMigratedError)
    async def _unmigrated(_r: Request, exc: DatabaseNotMigratedError) -> JSONResponse:
        return _json_error(503, exc)

    @app.exception_handler(SQLAlchemyError)
    async def _db_down(_r: Request, exc: SQLAlchemyError) -> JSONResponse:
        # Inputs are validated before SQL; what reaches here is the database being unavailable.
        return JSONResponse({"detail": f"database unavailable: {type(exc).__name__}"},
                            status_code=503)

    # ---------------------------------------------------------------- jobs

    @app.post("/jobs/classify", response_model=JobCreated, status_code=201, tags=["jobs"],
              dependencies=auth, responses={**_ERRORS, 403: {"model": ErrorOut},
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
              dependencies=auth, responses={**_ERRORS, 403: {"model": ErrorOut}})
    def submit_train(body: TrainRequest) -> JobCreated:
        """Train a model version on a folder of class folders (registered as a candidate)."""
        options = body.model_dump(exclude={"data"})
        job_id = submission.submit_train(
            sessions, dispatcher(), settings, body.data, options, submitter="api"
        )
        return JobCreated(id=job_id)

    @app.post("/jobs/evaluate", response_model=JobCreated, status_code=201, tags=["jobs"],
              dependencies=auth, responses={**_ERRORS, 403: {"model": ErrorOut}})
    def submit_evaluate(body: EvaluateRequest) -> JobCreated:
        """Evaluate a model version on every image of a labelled folder."""
        job_id = submission.submit_evaluate(
            sessions, dispatcher(), settings, model_version_id=body.model_version_id,
            data_dir=body.data, submitter="api",
        )
        return JobCreated(id=job_id)

    @app.get("/jobs", response_model=JobPage, tags=["jobs"], dependencies=auth,
             responses={401: _ERRORS[401]})
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
             responses=_ERRORS)
    def get_job(job_id: JobIdPath) -> JobOut:
        """One job with its status and progress (done/total)."""
        with sessions() as session:
            return JobOut.model_validate(repository.get_job(session, job_id))

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"], dependencies=auth,
              responses=_ERRORS)
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
        responses={**_ERRORS, 200: {"content": {"text/csv": {}},
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
             dependencies=auth, responses=_ERRORS)
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
             dependencies=auth, responses=_ERRORS)
    def artifacts(job_id: JobIdPath) -> list[ArtifactOut]:
        """Files the job produced (plots, reports); download them from ``url``."""
        with sessions() as session:
            repository.get_job(session, job_id)
            rows = repository.list_artifacts(session, job_id)
            return [ArtifactOut.model_validate(a).model_copy(update={"url": f"/artifacts/{a.id}"})
                    for a in rows]

    @app.get("/artifacts/{artifact_id}", tags=["results"], dependencies=auth,
             response_class=FileResponse,
             responses={**_ERRORS, 403: {"model": ErrorOut},
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
             responses={401: _ERRORS[401]})
    def list_models() -> list[ModelOut]:
        """Model versions, newest first."""
        with sessions() as session:
            return [ModelOut.model_validate(m) for m in repository.list_model_versions(session)]

    @app.post("/models/rollback", response_model=ModelOut, tags=["models"], dependencies=auth,
              responses={401: _ERRORS[401], 409: {"model": ErrorOut}})
    def rollback() -> ModelOut:
        """Archive the production model and restore the previously promoted one."""
        with sessions() as session, session.begin():
            return ModelOut.model_validate(repository.rollback_production(session))

    @app.get("/models/{model_id}", response_model=ModelOut, tags=["models"], dependencies=auth,
             responses=_ERRORS)
    def get_model(model_id: ModelIdPath) -> ModelOut:
        """One model version with its metrics."""
        with sessions() as session:
            return ModelOut.model_validate(repository.get_model_version(session, model_id))

    @app.post("/models/{model_id}/promote", response_model=ModelOut, tags=["models"],
              dependencies=auth, responses=_ERRORS)
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

    return app
