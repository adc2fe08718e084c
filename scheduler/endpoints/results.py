"""A job's results: predictions (JSON pages or one CSV stream), metrics, artifacts and their
downloads (confined to the job and model folders, never the database or the broker's files).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path as FsPath
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy.orm import Session

from scheduler import explanations, export, repository
from scheduler.api_models import (
    ERROR_RESPONSES,
    MAX_ID,
    MAX_PAGE,
    ArtifactOut,
    EpochOut,
    ErrorOut,
    EvaluationOut,
    ExplanationRequested,
    JobIdPath,
    MetricsOut,
    PredictionOut,
    PredictionPage,
)
from scheduler.endpoints.deps import (
    AuthDependencies,
    DispatcherDep,
    SessionsDep,
    SettingsDep,
)
from scheduler.paths import InvalidPathError, PathOutsideRootsError, confine
from scheduler.schema import PredictionRow

__all__ = ["prediction_outs", "router"]

router = APIRouter(tags=["results"], dependencies=AuthDependencies)


@router.get(
    "/jobs/{job_id}/predictions",
    response_model=PredictionPage,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/csv": {}},
                                "description": "A page of predictions, or all as CSV."}},
)
def predictions(
    job_id: JobIdPath,
    sessions: SessionsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> PredictionPage | StreamingResponse:
    """A classify job's predictions in input order. ``format=csv`` streams every row
    (columns item_index, path, label, confidence, top_k as JSON, error, explanation: the
    artifact path relative to the job folder); paging applies
    to JSON only."""
    with sessions() as session:
        repository.get_job(session, job_id)  # 404 before any streaming starts
        if format == "json":
            total = repository.count_predictions(session, job_id)
            rows = repository.list_predictions(session, job_id, offset=offset, limit=limit)
            return PredictionPage(
                job_id=job_id, total=total, offset=offset, limit=limit,
                items=prediction_outs(session, job_id, rows),
            )
    return StreamingResponse(
        export.stream_predictions_csv(sessions, job_id),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}.csv"'},
    )


def prediction_outs(
    session: Session, job_id: int, rows: Sequence[PredictionRow]
) -> list[PredictionOut]:
    """The rows as the API shows them: an explanation is its artifact's download URL."""
    ids = repository.artifact_ids(session, job_id, (r.explanation for r in rows))
    return [
        PredictionOut.model_validate(r).with_explanation(
            f"/artifacts/{ids[r.explanation]}" if r.explanation in ids else None
        )
        for r in rows
    ]


ItemIdPath = Annotated[int, Path(ge=1, le=2**63 - 1, description="Item (prediction) id.")]


@router.post(
    "/jobs/{job_id}/predictions/{item_id}/explanation",
    response_model=ExplanationRequested, status_code=202,
    responses={**ERROR_RESPONSES, 409: {"model": ErrorOut}, 503: {"model": ErrorOut}},
)
def request_explanation(
    job_id: JobIdPath, item_id: ItemIdPath, sessions: SessionsDep, dispatcher: DispatcherDep
) -> ExplanationRequested:
    """Explain one prediction with Grad-CAM (a worker task; asking again re-explains it).
    The answer is the prediction as it is now: its ``explanation`` URL appears once the
    worker is done. 404: unknown job or item; 409: an error row or not a classify job."""
    try:
        explanations.request_explanation(sessions, dispatcher, job_id, item_id)
    except explanations.NotExplainableError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except explanations.ExplanationNotSentError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
    with sessions() as session:
        row = explanations.explanation_of(session, job_id, item_id)
        (item,) = prediction_outs(session, job_id, [row])
    return ExplanationRequested(job_id=job_id, item_id=item_id, item=item)


@router.get("/jobs/{job_id}/metrics", response_model=MetricsOut, responses=ERROR_RESPONSES)
def metrics(job_id: JobIdPath, sessions: SessionsDep) -> MetricsOut:
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


@router.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactOut],
            responses=ERROR_RESPONSES)
def artifacts(job_id: JobIdPath, sessions: SessionsDep) -> list[ArtifactOut]:
    """Files the job produced (plots, reports); download them from ``url``."""
    with sessions() as session:
        repository.get_job(session, job_id)
        rows = repository.list_artifacts(session, job_id)
        return [ArtifactOut.model_validate(a).model_copy(update={"url": f"/artifacts/{a.id}"})
                for a in rows]


@router.get("/artifacts/{artifact_id}", response_class=FileResponse,
            responses={**ERROR_RESPONSES, 403: {"model": ErrorOut},
                       200: {"content": {"application/octet-stream": {}}}})
def download_artifact(
    artifact_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Artifact id.")],
    settings: SettingsDep,
    sessions: SessionsDep,
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
