"""``/jobs``: submit classify/train/evaluate jobs, list and follow them, cancel them.

Submission goes through :mod:`scheduler.submission`, exactly like the CLI.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from scheduler import repository, submission
from scheduler.api_models import (
    ERROR_RESPONSES,
    MAX_ID,
    ClassifyRequest,
    ErrorOut,
    EvaluateRequest,
    JobCreated,
    JobIdPath,
    JobOut,
    JobPage,
    TrainRequest,
)
from scheduler.endpoints.deps import AuthDependencies, DispatcherDep, SessionsDep, SettingsDep
from scheduler.refusals import TooManyInputsError
from scheduler.schema import JobKind, JobStatus

__all__ = ["router"]

router = APIRouter(tags=["jobs"], dependencies=AuthDependencies)


@router.post("/jobs/classify", response_model=JobCreated, status_code=201,
             responses={**ERROR_RESPONSES, 403: {"model": ErrorOut}, 409: {"model": ErrorOut},
                        413: {"model": ErrorOut}})
def submit_classify(
    body: ClassifyRequest, settings: SettingsDep, sessions: SessionsDep,
    dispatcher: DispatcherDep,
) -> JobCreated:
    """Classify images: one job, its inputs split into chunks that workers run in
    parallel. Folders and globs are expanded on the server (403 outside the data roots,
    413 beyond settings.max_paths_per_job items)."""
    max_paths = settings.max_paths_per_job
    if len(body.inputs) > max_paths:
        raise TooManyInputsError(max_paths)
    job_id = submission.submit_classify(
        sessions, dispatcher, settings, body.inputs,
        model_version_id=body.model_version_id, submitter="api", top_k=body.top_k,
        review_below=body.review_below, explain=body.explain,
    )
    return JobCreated(id=job_id)


@router.post("/jobs/train", response_model=JobCreated, status_code=201,
             responses={**ERROR_RESPONSES, 403: {"model": ErrorOut}})
def submit_train(
    body: TrainRequest, settings: SettingsDep, sessions: SessionsDep, dispatcher: DispatcherDep
) -> JobCreated:
    """Train a model version on a folder of class folders (registered as a candidate)."""
    options = body.model_dump(exclude={"data"})
    job_id = submission.submit_train(
        sessions, dispatcher, settings, body.data, options, submitter="api"
    )
    return JobCreated(id=job_id)


@router.post("/jobs/evaluate", response_model=JobCreated, status_code=201,
             responses={**ERROR_RESPONSES, 403: {"model": ErrorOut}})
def submit_evaluate(
    body: EvaluateRequest, settings: SettingsDep, sessions: SessionsDep,
    dispatcher: DispatcherDep,
) -> JobCreated:
    """Evaluate a model version on every image of a labelled folder."""
    job_id = submission.submit_evaluate(
        sessions, dispatcher, settings, model_version_id=body.model_version_id,
        data_dir=body.data, submitter="api",
    )
    return JobCreated(id=job_id)


@router.get("/jobs", response_model=JobPage, responses={401: ERROR_RESPONSES[401]})
def list_jobs(
    sessions: SessionsDep,
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


@router.get("/jobs/{job_id}", response_model=JobOut, responses=ERROR_RESPONSES)
def get_job(job_id: JobIdPath, sessions: SessionsDep) -> JobOut:
    """One job with its status and progress (done/total)."""
    with sessions() as session:
        return JobOut.model_validate(repository.get_job(session, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=ERROR_RESPONSES)
def cancel(job_id: JobIdPath, sessions: SessionsDep, dispatcher: DispatcherDep) -> JobOut:
    """Cancel a job: queued jobs stop at once, running ones at their next check."""
    submission.cancel_job(sessions, dispatcher, job_id)
    with sessions() as session:
        return JobOut.model_validate(repository.get_job(session, job_id))
