"""Jobs: creation, their stored inputs, status transitions, cancellation, progress.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scheduler.repository.base import (
    NotFoundError,
    batched,
    lock_job,
    mark_finished,
    psycopg_connection,
    table_of,
)
from scheduler.repository.chunks import finalize_if_done
from scheduler.schema import ChunkStatus, Job, JobChunk, JobItem, JobKind, JobStatus, utcnow

__all__ = [
    "ITEM_BATCH_SIZE",
    "add_job_items",
    "create_job",
    "finish_job",
    "get_job",
    "is_cancel_requested",
    "iter_job_items",
    "list_jobs",
    "list_open_jobs",
    "mark_job_running",
    "request_cancel",
    "set_progress",
]


#: Rows per INSERT batch for job items; bounds memory however many paths a job has.
ITEM_BATCH_SIZE = 5000


def _cancel_open_chunks(session: Session, job_id: int, statuses: Iterable[ChunkStatus]) -> None:
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.status.in_(list(statuses)))
        .values(status=ChunkStatus.CANCELLED, updated_at=utcnow()),
        execution_options={"synchronize_session": False},
    )


def create_job(
    session: Session,
    *,
    kind: JobKind | str,
    params: dict[str, Any],
    submitter: str | None = None,
    model_version_id: int | None = None,
    review_below: float | None = None,
) -> Job:
    """Insert a queued job and flush it so ``job.id`` is set (``review_below``: a classify
    job's review threshold; None keeps the column's default)."""
    job = Job(
        kind=JobKind(kind),
        status=JobStatus.QUEUED,
        params=dict(params),
        progress_done=0,
        progress_total=0,
        submitter=submitter,
        cancel_requested=False,
        model_version_id=model_version_id,
        created_at=utcnow(),
    )
    if review_below is not None:
        job.review_below = review_below
    session.add(job)
    session.flush()
    return job


def add_job_items(session: Session, job_id: int, paths: Iterable[str], *, chunk_size: int) -> int:
    """Store a classify job's inputs in order and create its chunks; returns the item count.

    ``paths`` is consumed lazily in batches of :data:`ITEM_BATCH_SIZE`, so a generator over a
    huge folder never materialises in memory. Chunk ``i`` covers items
    ``[i * chunk_size, min((i + 1) * chunk_size, count))``. Sets ``progress_total``.
    Raises ``ValueError`` if the job already has items (items are written once per job).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    job = lock_job(session, job_id)
    has_items = session.scalar(select(JobItem.item_index).where(JobItem.job_id == job_id).limit(1))
    if has_items is not None:
        raise ValueError(f"job {job_id} already has items")

    count = _insert_items(session, job_id, paths)

    now = utcnow()
    chunk_rows = [
        {
            "job_id": job_id,
            "chunk_index": index,
            "start_index": start,
            "stop_index": min(start + chunk_size, count),
            "status": ChunkStatus.PENDING,
            "attempts": 0,
            "error": None,
            "updated_at": now,
        }
        for index, start in enumerate(range(0, count, chunk_size))
    ]
    for batch in batched(chunk_rows, ITEM_BATCH_SIZE):
        session.execute(table_of(JobChunk).insert(), batch)
    job.progress_total = count
    session.flush()
    return count


def _insert_items(session: Session, job_id: int, paths: Iterable[str]) -> int:
    psycopg_conn = psycopg_connection(session)
    if psycopg_conn is not None:
        # COPY streams rows to the server: several times faster than any INSERT form.
        count = 0
        with (
            psycopg_conn.cursor() as cursor,
            cursor.copy("COPY job_items (job_id, item_index, path) FROM STDIN") as copy,
        ):
            for path in paths:
                copy.write_row((job_id, count, str(path)))
                count += 1
        return count
    count = 0
    table = table_of(JobItem)
    for batch in batched(paths, ITEM_BATCH_SIZE):
        rows = [
            {"job_id": job_id, "item_index": count + offset, "path": str(path)}
            for offset, path in enumerate(batch)
        ]
        session.execute(table.insert(), rows)
        count += len(rows)
    return count


def iter_job_items(
    session: Session, job_id: int, *, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, str]]:
    """Yield ``(item_index, path)`` of a job's items in order (keyset pages, flat memory)."""
    last = start - 1
    while True:
        query = (
            select(JobItem.item_index, JobItem.path)
            .where(JobItem.job_id == job_id, JobItem.item_index > last)
            .order_by(JobItem.item_index)
            .limit(ITEM_BATCH_SIZE)
        )
        if stop is not None:
            query = query.where(JobItem.item_index < stop)
        rows = session.execute(query).all()
        if not rows:
            return
        yield from ((int(index), str(path)) for index, path in rows)
        last = rows[-1][0]


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError("job", job_id)
    return job


def list_jobs(
    session: Session,
    *,
    status: JobStatus | str | None = None,
    kind: JobKind | str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Job]:
    """Jobs newest first, optionally filtered by status and kind."""
    query = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
    if status is not None:
        query = query.where(Job.status == JobStatus(status))
    if kind is not None:
        query = query.where(Job.kind == JobKind(kind))
    return list(session.scalars(query))


def mark_job_running(session: Session, job_id: int) -> Job:
    """queued -> running (sets ``started_at``); any other status is left alone."""
    job = lock_job(session, job_id)
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.RUNNING
        job.started_at = utcnow()
        session.flush()
    return job


def request_cancel(session: Session, job_id: int) -> Job:
    """Ask a job to stop.

    queued -> cancelled at once; running -> ``cancel_requested`` and its pending chunks
    cancelled (running chunks stop between batches; the job becomes cancelled when its last
    chunk completes, or right away if no chunk is running). Terminal jobs are left alone.
    """
    job = lock_job(session, job_id)
    if job.is_terminal:
        return job
    job.cancel_requested = True
    _cancel_open_chunks(session, job_id, [ChunkStatus.PENDING])
    session.flush()
    if job.status == JobStatus.QUEUED:
        mark_finished(job, JobStatus.CANCELLED, None)
        session.flush()
    else:
        # If no chunk is running, nothing would call complete_chunk: finalise here.
        finalize_if_done(session, job)
    return job


def is_cancel_requested(session: Session, job_id: int) -> bool:
    """True once cancel was requested (or the job is already cancelled)."""
    row = session.execute(
        select(Job.cancel_requested, Job.status).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        raise NotFoundError("job", job_id)
    return bool(row.cancel_requested) or row.status == JobStatus.CANCELLED


def finish_job(
    session: Session, job_id: int, status: JobStatus | str, *, error: str | None = None
) -> Job:
    """Move a job to a terminal ``status``; a job that is already terminal is left as it is.

    Open chunks of the job are cancelled so nothing keeps running for a finished job.
    """
    status = JobStatus(status)
    if not status.is_terminal:
        raise ValueError(f"finish_job needs a terminal status, got {status!s}")
    job = lock_job(session, job_id)
    if job.is_terminal:
        return job
    mark_finished(job, status, error)
    _cancel_open_chunks(session, job_id, [ChunkStatus.PENDING, ChunkStatus.RUNNING])
    session.flush()
    return job


def set_progress(session: Session, job_id: int, done: int, total: int | None = None) -> None:
    values: dict[str, int] = {"progress_done": done}
    if total is not None:
        values["progress_total"] = total
    result = session.execute(
        update(Job).where(Job.id == job_id).values(**values),
        execution_options={"synchronize_session": "fetch"},
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFoundError("job", job_id)


def list_open_jobs(session: Session) -> list[Job]:
    """Jobs that are queued or running, oldest first (what the worker recovery sweeps)."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .order_by(Job.id)
        )
    )
