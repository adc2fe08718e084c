"""Dashboard page of model versions: stage, metrics, lineage, plots; promote and roll back.

Both changes ask for a confirmation page first (a GET shows what will happen, its form
POSTs with the CSRF token) and then run the repository functions the JSON API runs, in a
transaction of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from scheduler import repository, review
from scheduler.api_models import MAX_ID
from scheduler.schema import Artifact, Job, ModelStage, ModelVersion
from scheduler.web.context import WebContext, page_route_class

__all__ = ["ModelRow", "router"]

ModelIdPath = Annotated[int, Path(ge=1, le=MAX_ID)]


@dataclass(frozen=True)
class ModelRow:
    """A model version with what its page shows beside the row itself."""

    version: ModelVersion
    macro_f1: float | None
    accuracy: float | None
    data: str | None  # the training job's data folder
    warm_start_from: int | None
    plots: tuple[Artifact, ...]
    reviews_used: int | None = None  # None: trained without reviews


def _metric(version: ModelVersion, *keys: str) -> float | None:
    for key in keys:
        value = (version.metrics or {}).get(key)
        if isinstance(value, int | float):
            return float(value)
    return None


def _row(session: Session, version: ModelVersion) -> ModelRow:
    data = warm = None
    plots: tuple[Artifact, ...] = ()
    if version.training_job_id is not None:
        job = session.get(Job, version.training_job_id)
        if job is not None:
            data = str((job.params or {}).get("data") or "") or None
            warm = job.model_version_id
            plots = tuple(a for a in repository.list_artifacts(session, job.id)
                          if a.path.lower().endswith(".png"))
    return ModelRow(version, _metric(version, "test_macro_f1", "val_macro_f1"),
                    _metric(version, "test_accuracy", "val_accuracy"), data, warm, plots,
                    review.lineage(version)["reviews_used"])


def router(ctx: WebContext) -> APIRouter:
    api = APIRouter(route_class=page_route_class(ctx), include_in_schema=False)

    @api.get("/ui/models")
    def models_page(request: Request) -> Response:
        with ctx.sessions() as session:
            rows = [_row(session, v) for v in repository.list_model_versions(session)]
            return ctx.render(request, "models.html", {"rows": rows,
                                                       "production": ModelStage.PRODUCTION})

    @api.get("/ui/models/{model_id}/promote")
    def confirm_promote(request: Request, model_id: ModelIdPath) -> Response:
        with ctx.sessions() as session:
            version = repository.get_model_version(session, model_id)
            current = repository.get_production_model(session)
            return ctx.render(request, "confirm.html", _promote_text(version, current))

    @api.post("/ui/models/{model_id}/promote")
    async def promote(request: Request, model_id: ModelIdPath) -> Response:
        await ctx.form(request)
        with ctx.sessions() as session, session.begin():
            repository.promote_model_version(session, model_id)
        return RedirectResponse("/ui/models", status_code=303)

    @api.get("/ui/models/rollback")
    def confirm_rollback(request: Request) -> Response:
        with ctx.sessions() as session:
            current = repository.get_production_model(session)
            if current is None:
                raise repository.NoRollbackTargetError("there is no production model to roll back")
            return ctx.render(request, "confirm.html", {
                "title": "Roll back the production model",
                "question": (f"Archive model version {current.id} ({current.arch}) and restore "
                             "the version that was in production before it?"),
                "action": "/ui/models/rollback", "button": "Roll back",
            })

    @api.post("/ui/models/rollback")
    async def rollback(request: Request) -> Response:
        await ctx.form(request)
        with ctx.sessions() as session, session.begin():
            repository.rollback_production(session)
        return RedirectResponse("/ui/models", status_code=303)

    return api


def _promote_text(version: ModelVersion, current: ModelVersion | None) -> dict[str, Any]:
    if current is not None and current.id != version.id:
        effect = f"Model version {current.id} ({current.arch}) will be archived."
    elif current is not None:
        effect = "It already is the production model: nothing changes."
    else:
        effect = "There is no production model yet."
    return {
        "title": f"Promote model version {version.id}",
        "question": f"Make model version {version.id} ({version.arch}) the production "
                    f"model? New classify jobs will use it. {effect}",
        "action": f"/ui/models/{version.id}/promote", "button": "Promote",
    }
