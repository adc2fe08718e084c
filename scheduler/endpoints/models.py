"""``/models``: model versions, their promotion to production and the rollback."""

from __future__ import annotations

from fastapi import APIRouter

from scheduler import repository, submission
from scheduler.api_models import (
    ERROR_RESPONSES,
    ErrorOut,
    ExportRequest,
    JobCreated,
    ModelIdPath,
    ModelOut,
)
from scheduler.endpoints.deps import AuthDependencies, DispatcherDep, SessionsDep, SettingsDep

__all__ = ["router"]

router = APIRouter(tags=["models"], dependencies=AuthDependencies)


@router.get("/models", response_model=list[ModelOut], responses={401: ERROR_RESPONSES[401]})
def list_models(sessions: SessionsDep) -> list[ModelOut]:
    """Model versions, newest first."""
    with sessions() as session:
        return [ModelOut.model_validate(m) for m in repository.list_model_versions(session)]


@router.post("/models/rollback", response_model=ModelOut,
             responses={401: ERROR_RESPONSES[401], 409: {"model": ErrorOut}})
def rollback(sessions: SessionsDep) -> ModelOut:
    """Archive the production model and restore the previously promoted one."""
    with sessions() as session, session.begin():
        return ModelOut.model_validate(repository.rollback_production(session))


@router.get("/models/{model_id}", response_model=ModelOut, responses=ERROR_RESPONSES)
def get_model(model_id: ModelIdPath, sessions: SessionsDep) -> ModelOut:
    """One model version with its metrics."""
    with sessions() as session:
        return ModelOut.model_validate(repository.get_model_version(session, model_id))


@router.post("/models/{model_id}/promote", response_model=ModelOut, responses=ERROR_RESPONSES)
def promote(model_id: ModelIdPath, sessions: SessionsDep) -> ModelOut:
    """Make a model version the production model (the previous one is archived)."""
    with sessions() as session, session.begin():
        return ModelOut.model_validate(repository.promote_model_version(session, model_id))


@router.post("/models/{model_id}/export", response_model=JobCreated, status_code=202,
             responses=ERROR_RESPONSES)
def export(
    model_id: ModelIdPath, body: ExportRequest, settings: SettingsDep, sessions: SessionsDep,
    dispatcher: DispatcherDep,
) -> JobCreated:
    """Export a model version to ONNX or TorchScript (an export job; the verified file
    becomes an artifact of the job and of the model version)."""
    job_id = submission.submit_export(
        sessions, dispatcher, settings, model_id, body.format, submitter="api"
    )
    return JobCreated(id=job_id)
