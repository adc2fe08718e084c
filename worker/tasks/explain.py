"""``mriq.explain``: the on-demand Grad-CAM of one prediction of a classify job.

Sent by ``scheduler.explanations.request_explanation`` (the API's ``POST
/jobs/{id}/predictions/{item}/explanation``, ``mriq explain``, the dashboard's button),
which validated the request; this task re-reads the rows anyway (ids only, as every task),
so a job or item deleted meanwhile is skipped, not an error. The model is the job's model
version, verified by sha256 and cached per process as for classification; the files and
records are the ones a classify job with ``--explain`` makes (worker/explaining.py), so
explaining an item twice replaces its one overlay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import Task

from scheduler import explanations, repository
from scheduler.pathtext import filesystem_path
from worker import explaining, runtime, sessions
from worker.appsettings import job_dir
from worker.tasks.common import job_model_version, task_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)


# A plain frozen record, alike by shape to evaluate's _EvalJob: no logic to share.
@dataclass(frozen=True)
class _Target:
    path: str
    checkpoint_path: str
    checkpoint_sha256: str


def _target(session: Session, job_id: int, item_id: int) -> _Target | str:
    """What to explain, or why there is nothing to (the request's own checks, again)."""
    try:
        row = explanations.explanation_of(session, job_id, item_id)
    except (repository.NotFoundError, explanations.NotExplainableError) as exc:
        return str(exc)
    try:
        version = job_model_version(session, repository.get_job(session, job_id))
    except ValueError as exc:
        return str(exc)
    return _Target(row.path, str(version.checkpoint_path), str(version.checkpoint_sha256))


def explain_item(task: Task, job_id: int, item_id: int) -> str:
    """Explain item ``item_id`` (a prediction row id) of classify job ``job_id``."""
    settings = task_settings(task)
    target = sessions.with_session(settings, lambda s: _target(s, job_id, item_id))
    if isinstance(target, str):
        log.warning("explanation of item %s skipped: %s", item_id, target)
        return f"skipped: {target}"
    runtime.configure_threads()
    model = runtime.load_model(
        target.checkpoint_path, target.checkpoint_sha256, device=settings.default_device
    )
    cached = runtime.load_explainer(model, roots=settings.data_roots)
    out_dir = job_dir(settings, job_id)
    with cached.lock:
        overlays = explaining.explain_items(
            cached.explainer, [(item_id, filesystem_path(target.path))], out_dir
        )
    if not overlays:
        # explain_items logged the reason (the file is gone or unreadable now).
        return f"failed: item {item_id} could not be explained"
    sessions.with_session(
        settings, lambda s: explaining.record_explanations(s, job_id, out_dir, overlays)
    )
    return f"explained item {item_id}: {overlays[item_id]}"
