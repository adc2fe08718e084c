"""Housekeeping tasks: scheduled retraining (``mriq.retrain``, sent by beat) and the
filesystem broker's janitor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Task

from scheduler import repository
from scheduler.dispatch import clean_filesystem_broker
from scheduler.schema import JobKind, JobStatus
from worker import sessions
from worker.tasks.common import task_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

#: The submitter of the training jobs :func:`retrain` submits.
RETRAIN_SUBMITTER = "mriq-retrain"


def _retraining_busy(session: Session) -> bool:
    for status in (JobStatus.QUEUED, JobStatus.RUNNING):
        jobs = repository.list_jobs(session, status=status, kind=JobKind.TRAIN, limit=1000)
        if any(j.submitter == RETRAIN_SUBMITTER for j in jobs):
            return True
    return False


def retrain(task: Task) -> str:
    """Submit a training job on ``settings.retrain_data_dir`` (what beat runs on its cron).

    Skipped while an earlier retraining job is still queued or running, so a slow run never
    piles up behind itself; warm-starts from the production model when there is one.
    """
    settings = task_settings(task)
    data_dir = settings.retrain_data_dir
    if not data_dir:
        return "skipped: settings.retrain_data_dir is not set"
    from scheduler.dispatch import Dispatcher
    from scheduler.submission import submit_train

    if sessions.with_session(settings, _retraining_busy):
        return "skipped: a retraining job is already queued or running"
    has_production = sessions.with_session(
        settings, lambda s: repository.get_production_model(s) is not None
    )
    job_id = submit_train(
        sessions.session_factory(settings),
        Dispatcher(settings, app=task.app),
        settings,
        str(data_dir),
        {"warm_start": has_production},
        submitter=RETRAIN_SUBMITTER,
    )
    return f"submitted train job {job_id}"


def broker_janitor(task: Task) -> str:
    return f"removed {clean_filesystem_broker(task_settings(task))} message files"
