"""Dashboard forms that submit jobs: classify (paths, folders, globs, @lists) and train.

The form values go through the JSON API's own request models
(:class:`scheduler.api_models.ClassifyRequest`, :class:`~scheduler.api_models.TrainRequest`)
and then the submission functions the API and the CLI call, so a refused input reads the
same everywhere (confinement to the data roots, limits, option checks). A refusal shows the
form again, with the values typed and the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from scheduler import repository, submission
from scheduler.api_models import ClassifyRequest, TrainRequest
from scheduler.options import EXPLAIN_MODES, JOB_DEVICES, REVIEW_BELOW_DEFAULT, option_choices
from scheduler.web.context import WebContext, page_route_class, refusal_of
from scheduler.web.session import CSRF_FIELD

__all__ = ["router"]

_TRAIN_FLAGS = ("finetune", "warm_start", "with_reviews")
# Classify form fields passed to ClassifyRequest as typed (empty: the API's default).
_CLASSIFY_FIELDS = ("model_version_id", "top_k", "review_below", "explain")


def _classify_request(form: dict[str, str]) -> ClassifyRequest:
    inputs = [line.strip() for line in form.get("inputs", "").splitlines() if line.strip()]
    body: dict[str, Any] = {"inputs": inputs}
    for name in _CLASSIFY_FIELDS:
        if form.get(name, "").strip():
            body[name] = form[name].strip()
    return ClassifyRequest.model_validate(body)


def _train_request(form: dict[str, str]) -> TrainRequest:
    # Empty fields take the API's defaults; unchecked boxes are absent from a form post.
    body: dict[str, Any] = {k: v.strip() for k, v in form.items()
                            if k not in (CSRF_FIELD, *_TRAIN_FLAGS) and v.strip()}
    for flag in _TRAIN_FLAGS:
        body[flag] = flag in form
    return TrainRequest.model_validate(body)


def router(ctx: WebContext) -> APIRouter:
    api = APIRouter(route_class=page_route_class(ctx), include_in_schema=False)

    def page(request: Request, *, status: int = 200, error: str | None = None,
             form: dict[str, str] | None = None, which: str | None = None) -> Response:
        with ctx.sessions() as session:
            models = repository.list_model_versions(session)
            return ctx.render(request, "submit.html", {
                "models": models, "archs": option_choices("arch"),
                "devices": JOB_DEVICES, "error": error, "which": which,
                "explain_modes": EXPLAIN_MODES, "review_below": REVIEW_BELOW_DEFAULT,
                "form": form or {}, "max_paths": ctx.settings.max_paths_per_job,
                "roots": [str(r) for r in ctx.settings.data_roots],
            }, status=status)

    @api.get("/ui/submit")
    def submit_page(request: Request) -> Response:
        return page(request)

    @api.post("/ui/submit/classify")
    async def submit_classify(request: Request) -> Response:
        form = await ctx.form(request)
        try:
            body = _classify_request(form)
            if len(body.inputs) > ctx.settings.max_paths_per_job:
                raise submission.TooManyInputsError(ctx.settings.max_paths_per_job)
            job_id = submission.submit_classify(
                ctx.sessions, ctx.dispatcher(), ctx.settings, body.inputs,
                model_version_id=body.model_version_id, submitter="web", top_k=body.top_k,
                review_below=body.review_below, explain=body.explain,
            )
        except Exception as exc:
            return _refused(page, request, exc, form, "classify")
        return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)

    @api.post("/ui/submit/train")
    async def submit_train(request: Request) -> Response:
        form = await ctx.form(request)
        try:
            body = _train_request(form)
            job_id = submission.submit_train(
                ctx.sessions, ctx.dispatcher(), ctx.settings, body.data,
                body.model_dump(exclude={"data"}), submitter="web",
            )
        except Exception as exc:
            return _refused(page, request, exc, form, "train")
        return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)

    return api


def _refused(page: Callable[..., Response], request: Request, exc: Exception,
             form: dict[str, str], which: str) -> Response:
    mapped = refusal_of(exc)
    if mapped is None:
        raise exc
    status, message = mapped
    return page(request, status=status, error=message, form=form, which=which)
