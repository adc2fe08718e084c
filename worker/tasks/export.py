"""``mriq.export``: a model version exported to ONNX or TorchScript, verified (issue 14).

Sent by ``scheduler.submission.submit_export`` (``mriq models export``, ``POST
/models/{id}/export``). The checkpoint is loaded as for classification (verified by sha256,
cached per process); ``core.export.export_model`` writes ``<job folder>/model-<id><suffix>``
only once the export's outputs match the checkpoint's within 1e-4, and the file is recorded
as an artifact (kind "export") of the job and of the model version. A redelivered message
for a finished job is skipped; one for a running job re-exports to the same path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import Task

from core.formats import EXPORT_SUFFIXES
from scheduler import repository
from scheduler.database import is_retryable
from scheduler.schema import JobStatus
from worker import runtime, sessions
from worker.appsettings import job_dir
from worker.tasks.common import (
    error_text,
    finish,
    job_heartbeat,
    job_model_version,
    task_settings,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from scheduler.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ExportJob:
    status: JobStatus
    fmt: str
    model_version_id: int
    checkpoint_path: str
    checkpoint_sha256: str


def _start(session: Session, job_id: int) -> _ExportJob:
    job = repository.mark_job_running(session, job_id)
    version = job_model_version(session, job)
    return _ExportJob(
        status=JobStatus(job.status),
        fmt=str((job.params or {})["format"]),
        model_version_id=int(version.id),
        checkpoint_path=str(version.checkpoint_path),
        checkpoint_sha256=str(version.checkpoint_sha256),
    )


def export_job(task: Task, job_id: int) -> str:
    settings = task_settings(task)
    try:
        job = sessions.with_session(settings, lambda s: _start(s, job_id))
    except Exception as exc:
        finish(settings, job_id, JobStatus.FAILED, error_text(exc))
        return f"failed: {error_text(exc)}"
    if job.status != JobStatus.RUNNING:
        return f"skipped: job is {job.status}"
    try:
        with job_heartbeat(task, settings, job_id):
            return _export(settings, job_id, job)
    except Exception as exc:
        if is_retryable(exc):  # as in train_job: the recovery sweep re-sends it later
            log.error("export job %s: database unreachable; left to the recovery sweep", job_id)
            raise
        log.exception("export job %s failed", job_id)
        finish(settings, job_id, JobStatus.FAILED, error_text(exc))
        return f"failed: {error_text(exc)}"


def _export(settings: Settings, job_id: int, job: _ExportJob) -> str:
    from core.export import export_model

    runtime.configure_threads()
    # Exported on the CPU whatever the worker's device: the verification runs there too.
    model = runtime.load_model(job.checkpoint_path, job.checkpoint_sha256, device="cpu")
    out = job_dir(settings, job_id) / f"model-{job.model_version_id}{EXPORT_SUFFIXES[job.fmt]}"
    result = export_model(model.checkpoint, out, format=job.fmt)  # type: ignore[arg-type]

    def record(session: Session) -> None:
        repository.record_artifact(
            session,
            job_id=job_id,
            kind=repository.EXPORT_ARTIFACT,
            path=str(result.path),
            model_version_id=job.model_version_id,
        )
        repository.finish_job(session, job_id, JobStatus.SUCCEEDED)

    sessions.with_session(settings, record)
    return f"exported {result.format} to {result.path} (max diff {result.max_abs_diff:.2g})"
