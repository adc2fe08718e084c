"""Dashboard pages of jobs: the list, one job (progress, chunks, errors, predictions or
metrics and plots), one input's image page, thumbnails, artifacts and the CSV export.

Reads go through :mod:`scheduler.repository` (as the JSON API's do) and
:mod:`scheduler.web.queries` for the filtered keyset pages only the dashboard needs;
cancelling goes through :func:`scheduler.submission.cancel_job`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session

import scheduler.web.queries as queries
import scheduler.web.review as web_review
from scheduler import explanations, export, repository, review, submission
from scheduler.api_models import MAX_ID
from scheduler.schema import ChunkStatus, Job, JobKind, JobStatus, PredictionRow
from scheduler.web.context import BadFormError, WebContext, page_route_class
from scheduler.web.queries import PredictionCursor, PredictionFilter, PredictionSort
from scheduler.web.thumbnails import THUMB_SIDES, Rendering, artifact_file, thumbnail

__all__ = ["JOBS_PER_PAGE", "PREDICTIONS_PER_PAGE", "progress_of", "router"]

JOBS_PER_PAGE = 50
PREDICTIONS_PER_PAGE = 50
#: The chunk strip on a job page shows at most this many chunks (a 100k-input job has 196).
MAX_CHUNKS_SHOWN = 1000
ERRORS_SHOWN = 20
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
ItemPath = Annotated[int, Path(ge=0, le=MAX_ID)]
_SORTS: tuple[PredictionSort, ...] = ("index", "confidence_desc", "confidence_asc")
E = TypeVar("E", JobStatus, JobKind)


@dataclass(frozen=True)
class Progress:
    """A job's progress as the pages and the live-update JSON show it."""

    status: str
    done: int
    total: int
    percent: int
    terminal: bool
    rate: float | None  # items (or epochs) per second since the job started
    eta_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "done": self.done, "total": self.total,
                "percent": self.percent, "terminal": self.terminal,
                "rate": self.rate, "eta_s": self.eta_s}


def progress_of(job: Job, *, now: datetime | None = None) -> Progress:
    done, total = int(job.progress_done), int(job.progress_total)
    status = JobStatus(job.status)
    if total > 0:
        percent = min(100, int(100 * done / total))
    else:  # a train/evaluate job that counted nothing: done means done
        percent = 100 if status is JobStatus.SUCCEEDED else 0
    rate = eta = None
    if job.started_at is not None and done > 0:
        elapsed = ((job.finished_at or now or datetime.now(UTC)) - job.started_at).total_seconds()
        if elapsed > 0:
            rate = done / elapsed
            eta = None if job.is_terminal else max(0.0, (total - done) / rate)
    return Progress(status.value, done, total, percent, job.is_terminal,
                    rate, eta)


def _enum_or_none(enum: type[E], value: str | None, what: str) -> E | None:
    if not value:
        return None
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise BadFormError(f"{what}: must be one of {allowed}, not {value!r}") from None


def _confidence(value: str | None, what: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        raise BadFormError(f"{what}: must be a number between 0 and 1, not {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise BadFormError(f"{what}: must be between 0 and 1, not {value!r}")
    return number


def prediction_filter(label: str | None, min_confidence: str | None,
                      max_confidence: str | None, errors: str | None,
                      sort: str | None) -> PredictionFilter:
    """The table's filter from query values (BadFormError naming the bad one)."""
    if sort and sort not in _SORTS:
        raise BadFormError(f"sort: must be one of {', '.join(_SORTS)}, not {sort!r}")
    if label is not None and len(label) > 100:
        raise BadFormError("label: longer than any label")
    return PredictionFilter(
        label=label or None,
        min_confidence=_confidence(min_confidence, "min_confidence"),
        max_confidence=_confidence(max_confidence, "max_confidence"),
        errors_only=errors in ("1", "on", "true"),
        sort=sort if sort in _SORTS else "index",
    )


def _cursor(after: str | None) -> PredictionCursor | None:
    if not after:
        return None
    try:
        return PredictionCursor.decode(after)
    except ValueError:
        raise BadFormError(f"after: not a page position: {after[:40]!r}") from None


def router(ctx: WebContext) -> APIRouter:
    api = APIRouter(route_class=page_route_class(ctx), include_in_schema=False)
    _add_job_routes(api, ctx)
    _add_item_routes(api, ctx)
    return api


def _add_job_routes(api: APIRouter, ctx: WebContext) -> None:
    """The jobs list, one job's page, their live-progress JSON and cancelling."""

    @api.get("/ui/")
    def jobs_page(request: Request, status: str | None = None, kind: str | None = None,
                  before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None) -> Response:
        wanted_status = _enum_or_none(JobStatus, status, "status")
        wanted_kind = _enum_or_none(JobKind, kind, "kind")
        with ctx.sessions() as session:
            jobs = queries.jobs_before(session, status=wanted_status, kind=wanted_kind,
                                       before=before, limit=JOBS_PER_PAGE)
            errors = queries.error_counts(session, [j.id for j in jobs])
            rows = [(job, progress_of(job), errors.get(job.id, 0)) for job in jobs]
        next_before = jobs[-1].id if len(jobs) == JOBS_PER_PAGE else None
        return ctx.render(request, "jobs.html", {
            "rows": rows, "status": wanted_status, "kind": wanted_kind,
            "statuses": list(JobStatus), "kinds": list(JobKind),
            "next_before": next_before, "first_page": before is None,
            "live": any(not p.terminal for _, p, _e in rows),
        })

    @api.get("/ui/jobs/progress.json")
    def jobs_progress(ids: Annotated[str, Query(max_length=2000)] = "") -> Response:
        try:
            wanted = [int(i) for i in ids.split(",") if i][:JOBS_PER_PAGE]
        except ValueError:
            raise BadFormError("ids: comma-separated job ids") from None
        out: dict[str, Any] = {}
        with ctx.sessions() as session:
            for job_id in wanted:
                job = session.get(Job, job_id)
                if job is not None:
                    out[str(job_id)] = progress_of(job).to_dict()
        return JSONResponse(out)

    @api.get("/ui/jobs/{job_id}")
    def job_page(request: Request, job_id: IdPath, label: str | None = None,
                 min_confidence: str | None = None, max_confidence: str | None = None,
                 errors: str | None = None, sort: str | None = None,
                 after: str | None = None) -> Response:
        flt = prediction_filter(label, min_confidence, max_confidence, errors, sort)
        cursor = _cursor(after)
        with ctx.sessions() as session:
            job = repository.get_job(session, job_id)
            data: dict[str, Any] = {"job": job, "progress": progress_of(job), "filter": flt,
                                    "sorts": _SORTS}
            data["model"] = (repository.get_model_version(session, job.model_version_id)
                             if job.model_version_id is not None else None)
            if job.kind == JobKind.CLASSIFY:
                data.update(_classify_view(session, job, flt, cursor))
            else:
                data.update(_training_view(session, job))
            return ctx.render(request, "job.html", data)

    @api.get("/ui/jobs/{job_id}/progress.json")
    def job_progress(job_id: IdPath) -> Response:
        with ctx.sessions() as session:
            job = repository.get_job(session, job_id)
            body = progress_of(job).to_dict()
            if job.kind == JobKind.CLASSIFY:
                body["errors"] = repository.count_prediction_errors(session, job_id)
        return JSONResponse(body)

    @api.post("/ui/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: IdPath) -> Response:
        await ctx.form(request)
        submission.cancel_job(ctx.sessions, ctx.dispatcher(), job_id)
        return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


def _add_item_routes(api: APIRouter, ctx: WebContext) -> None:
    """The CSV export, one input's page and the files: thumbnails, overlays, artifacts."""

    @api.get("/ui/jobs/{job_id}/predictions.csv")
    def predictions_csv(job_id: IdPath) -> Response:
        with ctx.sessions() as session:
            repository.get_job(session, job_id)  # 404 before the stream starts
        return StreamingResponse(
            export.stream_predictions_csv(ctx.sessions, job_id),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="job-{job_id}.csv"'},
        )

    @api.get("/ui/jobs/{job_id}/items/{item_index}")
    def item_page(request: Request, job_id: IdPath, item_index: ItemPath,
                  explanation: str | None = None) -> Response:
        with ctx.sessions() as session:
            job = repository.get_job(session, job_id)
            row = _prediction_or_404(session, job_id, item_index)
            here = f"/ui/jobs/{job_id}/items/{item_index}"
            controls = None
            if row.error is None and row.label is not None:
                item = review.get_item(session, int(row.id))
                controls = web_review.controls_of(ctx, session, item, here)
            return ctx.render(request, "item.html", {
                "job": job, "row": row, "explanation": row.explanation,
                "overlay": bool(row.explanation and row.explanation.endswith(".png")),
                "explanation_requested": explanation == "requested",
                "controls": controls, "history": review.history(session, int(row.id)),
            })

    @api.post("/ui/jobs/{job_id}/items/{item_index}/explanation")
    async def request_explanation(request: Request, job_id: IdPath,
                                  item_index: ItemPath) -> Response:
        await ctx.form(request)
        with ctx.sessions() as session:
            item_id = int(_prediction_or_404(session, job_id, item_index).id)
        try:
            explanations.request_explanation(ctx.sessions, ctx.dispatcher(), job_id, item_id)
        except explanations.NotExplainableError as exc:  # an error row: nothing to explain
            return ctx.error(request, 409, str(exc))
        except explanations.ExplanationNotSentError as exc:
            return ctx.error(request, 503, str(exc))
        return RedirectResponse(f"/ui/jobs/{job_id}/items/{item_index}?explanation=requested",
                                status_code=303)

    @api.get("/ui/jobs/{job_id}/items/{item_index}/image")
    def item_image(job_id: IdPath, item_index: ItemPath, side: int = 128,
                   rendering: str = "slice") -> Response:
        if rendering not in ("slice", "cropped"):
            raise BadFormError(f"rendering: must be slice or cropped, not {rendering!r}")
        if side not in THUMB_SIDES:
            raise BadFormError(f"side: must be one of {sorted(THUMB_SIDES)}, not {side}")
        with ctx.sessions() as session:
            stored = _prediction_or_404(session, job_id, item_index).path
        kind: Rendering = "cropped" if rendering == "cropped" else "slice"
        path = thumbnail(ctx.settings, stored, side=side, rendering=kind)
        return FileResponse(path, media_type="image/png",
                            headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/ui/jobs/{job_id}/items/{item_index}/explanation")
    def item_explanation(job_id: IdPath, item_index: ItemPath) -> Response:
        with ctx.sessions() as session:
            stored = _prediction_or_404(session, job_id, item_index).explanation
        if not stored:
            raise repository.NotFoundError(f"job {job_id} explanation", item_index)
        # Overlays are written under the job's folder: the artifacts' confinement applies.
        return FileResponse(artifact_file(ctx.settings, str(stored)), media_type="image/png")

    @api.get("/ui/artifacts/{artifact_id}")
    def artifact(artifact_id: IdPath) -> Response:
        with ctx.sessions() as session:
            stored = repository.get_artifact(session, artifact_id).path
        path = artifact_file(ctx.settings, stored)
        return FileResponse(path, filename=path.name)


def _prediction_or_404(session: Session, job_id: int, item_index: int) -> PredictionRow:
    repository.get_job(session, job_id)
    row = queries.get_prediction(session, job_id, item_index)
    if row is None:
        raise repository.NotFoundError(f"job {job_id} prediction", item_index)
    return row


def _classify_view(session: Session, job: Job, flt: PredictionFilter,
                   cursor: PredictionCursor | None) -> dict[str, Any]:
    rows = queries.filtered_predictions(session, job.id, flt, after=cursor,
                                        limit=PREDICTIONS_PER_PAGE)
    classes: list[str] = []
    if job.model_version_id is not None:
        classes = list(repository.get_model_version(session, job.model_version_id).classes)
    chunks = repository.list_chunks(session, job.id)[:MAX_CHUNKS_SHOWN]
    return {
        "rows": rows,
        # Unfiltered, the count is the job's progress (complete_chunk counts the rows).
        "matching": (queries.count_filtered_predictions(session, job.id, flt)
                     if flt != PredictionFilter(sort=flt.sort) else int(job.progress_done)),
        "match_cap": queries.MATCH_COUNT_CAP,
        "n_errors": repository.count_prediction_errors(session, job.id),
        "errors": queries.filtered_predictions(
            session, job.id, PredictionFilter(errors_only=True), limit=ERRORS_SHOWN),
        "chunk_counts": repository.chunk_status_counts(session, job.id),
        "chunks": chunks,
        "chunk_statuses": list(ChunkStatus),
        "classes": classes,
        "next_after": (queries.cursor_after(rows[-1], flt).encode()
                       if len(rows) == PREDICTIONS_PER_PAGE else None),
        "paged": cursor is not None,
    }


def _training_view(session: Session, job: Job) -> dict[str, Any]:
    try:
        evaluation = repository.get_evaluation(session, job.id)
    except repository.NotFoundError:
        evaluation = None
    artifacts = repository.list_artifacts(session, job.id)
    return {
        "epochs": repository.list_epoch_metrics(session, job.id),
        "evaluation": evaluation,
        "plots": [a for a in artifacts if a.path.lower().endswith(".png")],
        "files": [a for a in artifacts if not a.path.lower().endswith(".png")],
    }
