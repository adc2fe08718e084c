"""``mriq.finalize``: re-derive a classify job's final status from its chunks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import Task

from scheduler import repository
from scheduler.schema import ChunkStatus
from worker import sessions
from worker.tasks.common import task_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def finalize_job(task: Task, job_id: int) -> str:
    """Re-derive a classify job's final status from its chunks (idempotent repair).

    ``complete_chunk`` on an already terminal chunk changes nothing but re-runs the "all
    chunks terminal -> finish the job" check, which a lost message may have skipped.
    """

    def fn(session: Session) -> str:
        job = repository.get_job(session, job_id)
        if job.is_terminal:
            return f"already {job.status}"
        chunks = repository.list_chunks(session, job_id)
        if not chunks or any(not ChunkStatus(c.status).is_terminal for c in chunks):
            return "chunks still open"
        status = repository.complete_chunk(
            session, job_id, chunks[-1].chunk_index, status=ChunkStatus(chunks[-1].status)
        )
        return f"finished as {status}"

    return sessions.with_session(task_settings(task), fn)
