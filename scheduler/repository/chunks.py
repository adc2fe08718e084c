"""A classify job's chunks: claiming, completing and failing them, the job's final status,
and their liveness (heartbeats, stale and dead-worker takeovers; see worker/recovery.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from scheduler.repository.base import NotFoundError, lock_chunk, lock_job, mark_finished
from scheduler.repository.predictions import (
    PredictionRecord,
    count_predictions,
    record_predictions,
)
from scheduler.schema import ChunkStatus, Job, JobChunk, JobItem, JobStatus, PredictionRow, utcnow

__all__ = [
    "abandon_chunk",
    "chunk_status_counts",
    "claim_chunk",
    "complete_chunk",
    "fail_chunk",
    "finalize_if_done",
    "get_chunk",
    "list_chunks",
    "pending_chunk_indices",
    "release_chunk",
    "running_chunks",
    "take_dead_chunk",
    "take_stale_chunks",
    "touch_chunk",
]


def get_chunk(session: Session, job_id: int, chunk_index: int) -> JobChunk:
    chunk = session.get(JobChunk, (job_id, chunk_index))
    if chunk is None:
        raise NotFoundError("chunk", f"{job_id}/{chunk_index}")
    return chunk


def list_chunks(session: Session, job_id: int) -> list[JobChunk]:
    return list(
        session.scalars(
            select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.chunk_index)
        )
    )


def pending_chunk_indices(session: Session, job_id: int) -> list[int]:
    """Indices of chunks not started yet (what the dispatcher sends out)."""
    return list(
        session.scalars(
            select(JobChunk.chunk_index)
            .where(JobChunk.job_id == job_id, JobChunk.status == ChunkStatus.PENDING)
            .order_by(JobChunk.chunk_index)
        )
    )


def chunk_status_counts(session: Session, job_id: int) -> dict[ChunkStatus, int]:
    """Number of the job's chunks per status (every status present, zeros included)."""
    counts = dict.fromkeys(ChunkStatus, 0)
    rows = session.execute(
        select(JobChunk.status, func.count())
        .where(JobChunk.job_id == job_id)
        .group_by(JobChunk.status)
    )
    for status, n in rows:
        counts[ChunkStatus(status)] = int(n)
    return counts


# Liveness of chunks (see worker/recovery.py): ``updated_at`` of a running chunk is its
# heartbeat, that of a pending chunk the time it was (re)sent or may next be retried.


def touch_chunk(session: Session, job_id: int, chunk_index: int) -> bool:
    """Heartbeat of a running chunk: refresh ``updated_at``; False if it is not running."""
    return _update_running(session, job_id, chunk_index, (), updated_at=utcnow())


def _update_running(
    session: Session,
    job_id: int,
    chunk_index: int,
    conditions: Iterable[ColumnElement[bool]],
    **values: object,
) -> bool:
    """Set ``values`` on the chunk if it is running and meets ``conditions``; True if so."""
    result = session.execute(
        update(JobChunk)
        .where(
            JobChunk.job_id == job_id,
            JobChunk.chunk_index == chunk_index,
            JobChunk.status == ChunkStatus.RUNNING,
            *conditions,
        )
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def take_stale_chunks(
    session: Session,
    job_id: int,
    *,
    statuses: Sequence[ChunkStatus],
    before: datetime,
    exclude_workers: Iterable[str] = (),
    unowned_only: bool = False,
) -> list[int]:
    """Indices of the job's chunks in ``statuses`` whose ``updated_at`` is older than
    ``before``; in the same statement they become ``pending`` stamped with the current time
    (the caller is about to send them again: a stale running chunk has no live claimant, it
    is waiting for a message like any pending one, and must not be re-sent again while that
    message waits behind a backlog).

    A compare-and-set: of several callers racing for a stale chunk exactly one gets it
    (PostgreSQL re-checks the WHERE clause after a concurrent update commits; SQLite has one
    writer), so a recovery sweep re-sends each chunk once per stale period. Chunks held by
    one of ``exclude_workers`` (workers known to be alive) are left alone; with
    ``unowned_only`` so is every chunk that records its worker.
    """
    if not statuses:
        return []
    excluded = list(exclude_workers)
    conditions = [
        JobChunk.job_id == job_id,
        JobChunk.status.in_(list(statuses)),
        JobChunk.updated_at < before,
    ]
    if unowned_only:
        conditions.append(JobChunk.worker.is_(None))
    elif excluded:
        conditions.append(or_(JobChunk.worker.is_(None), JobChunk.worker.not_in(excluded)))
    rows = session.execute(
        update(JobChunk)
        .where(*conditions)
        .values(status=ChunkStatus.PENDING, updated_at=utcnow())
        .returning(JobChunk.chunk_index),
        execution_options={"synchronize_session": False},
    )
    return sorted(int(index) for (index,) in rows)


def release_chunk(session: Session, job_id: int, chunk_index: int, *, not_before: datetime) -> None:
    """A running chunk goes back to ``pending`` because a retry was scheduled for
    ``not_before`` (its ``updated_at``), so no recovery sweep re-sends it during the backoff.
    Chunks in any other status are left alone."""
    session.execute(
        update(JobChunk)
        .where(
            JobChunk.job_id == job_id,
            JobChunk.chunk_index == chunk_index,
            JobChunk.status == ChunkStatus.RUNNING,
        )
        .values(status=ChunkStatus.PENDING, updated_at=not_before),
        execution_options={"synchronize_session": False},
    )


def running_chunks(session: Session) -> list[tuple[int, int, str | None, datetime]]:
    """``(job_id, chunk_index, worker, updated_at)`` of every running chunk of an open job."""
    rows = session.execute(
        select(JobChunk.job_id, JobChunk.chunk_index, JobChunk.worker, JobChunk.updated_at)
        .join(Job, Job.id == JobChunk.job_id)
        .where(
            JobChunk.status == ChunkStatus.RUNNING,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
        .order_by(JobChunk.job_id, JobChunk.chunk_index)
    )
    return [(int(j), int(c), w, u) for j, c, w, u in rows]


def take_dead_chunk(
    session: Session, job_id: int, chunk_index: int, *, worker: str | None, before: datetime
) -> bool:
    """Compare-and-set for one chunk the caller found held by a dead worker: a chunk still
    ``running``, still held by ``worker`` and not stamped since ``before`` becomes
    ``pending`` (stamped now); True when this caller took it and must send it again. Of
    several sweeps racing, one wins; a chunk a live worker re-claimed in between is kept."""
    held = JobChunk.worker.is_(None) if worker is None else JobChunk.worker == worker
    return _update_running(
        session,
        job_id,
        chunk_index,
        (held, JobChunk.updated_at < before),
        status=ChunkStatus.PENDING,
        updated_at=utcnow(),
    )


def abandon_chunk(session: Session, job_id: int, chunk_index: int) -> int:
    """The chunk's worker gave up on it (deadline missed, worker/liveness.py): a running
    chunk goes back to ``pending`` with ``abandons += 1``; returns the new count (0 when the
    chunk was no longer running, e.g. cancelled meanwhile: nothing to re-send)."""
    chunk = lock_chunk(session, job_id, chunk_index)
    if ChunkStatus(chunk.status) != ChunkStatus.RUNNING:
        return 0
    chunk.abandons = int(chunk.abandons or 0) + 1
    chunk.status = ChunkStatus.PENDING
    chunk.updated_at = utcnow()
    session.flush()
    return int(chunk.abandons)


def _unrecorded_items(session: Session, chunk: JobChunk) -> list[tuple[int, str]]:
    rows = session.execute(
        select(JobItem.item_index, JobItem.path)
        .outerjoin(
            PredictionRow,
            and_(
                PredictionRow.job_id == JobItem.job_id,
                PredictionRow.item_index == JobItem.item_index,
            ),
        )
        .where(
            JobItem.job_id == chunk.job_id,
            JobItem.item_index >= chunk.start_index,
            JobItem.item_index < chunk.stop_index,
            PredictionRow.id.is_(None),
        )
        .order_by(JobItem.item_index)
    )
    return [(int(index), str(path)) for index, path in rows]


def claim_chunk(
    session: Session, job_id: int, chunk_index: int, *, worker: str | None = None
) -> list[tuple[int, str]] | None:
    """Start (or restart) work on a chunk.

    Marks the chunk running, ``attempts += 1``, moves a queued job to running, and returns the
    ``(item_index, path)`` pairs that have **no prediction row yet** (a redelivered chunk only
    redoes what is missing). Returns None when the chunk is already terminal or the job is
    terminal or being cancelled: the task should then just return. (A chunk redelivered
    after cancel was requested is marked cancelled here, finishing the job if it was the last.)
    ``worker`` (the claiming Celery node name) is recorded on the chunk for the recovery sweep.
    """
    job = lock_job(session, job_id)
    chunk = lock_chunk(session, job_id, chunk_index)
    if ChunkStatus(chunk.status).is_terminal or job.is_terminal:
        return None
    if job.cancel_requested:
        chunk.status = ChunkStatus.CANCELLED
        chunk.updated_at = utcnow()
        session.flush()
        finalize_if_done(session, job)
        return None
    now = utcnow()
    chunk.status = ChunkStatus.RUNNING
    chunk.attempts += 1
    chunk.updated_at = now
    chunk.worker = worker
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.RUNNING
        job.started_at = now
    session.flush()
    return _unrecorded_items(session, chunk)


def complete_chunk(
    session: Session,
    job_id: int,
    chunk_index: int,
    *,
    status: ChunkStatus | str = ChunkStatus.SUCCEEDED,
    error: str | None = None,
) -> JobStatus | None:
    """Mark a chunk terminal, refresh progress, and finish the job if this was its last chunk.

    ``progress_done`` is recomputed from the predictions count (never incremented, so retries
    cannot double count). When every chunk is terminal the job becomes: ``cancelled`` if cancel
    was requested (or a chunk was cancelled), else ``failed`` if every chunk failed, else
    ``partial`` if some chunk failed, else ``succeeded``. Returns that status if the job finished
    in this call, else None. A chunk that is already terminal keeps its status (idempotent).
    """
    status = ChunkStatus(status)
    if not status.is_terminal:
        raise ValueError(f"complete_chunk needs a terminal chunk status, got {status!s}")
    job = lock_job(session, job_id)
    chunk = lock_chunk(session, job_id, chunk_index)
    if not ChunkStatus(chunk.status).is_terminal:
        chunk.status = status
        chunk.error = error
        chunk.updated_at = utcnow()
    job.progress_done = count_predictions(session, job_id)
    session.flush()
    return finalize_if_done(session, job)


def finalize_if_done(session: Session, job: Job) -> JobStatus | None:
    """Finish a chunked job whose chunks are all terminal; returns the status it got, or None
    if it is not done (or has no chunks, or is already finished). The caller holds the lock."""
    if job.is_terminal:
        return None
    counts = chunk_status_counts(session, job.id)
    total = sum(counts.values())
    if total == 0 or any(counts[s] for s in ChunkStatus if not s.is_terminal):
        return None
    failed = counts[ChunkStatus.FAILED]
    final_error: str | None = None
    if job.cancel_requested or counts[ChunkStatus.CANCELLED]:
        final = JobStatus.CANCELLED
    elif failed:
        final = JobStatus.FAILED if failed == total else JobStatus.PARTIAL
        first_error = session.scalar(
            select(JobChunk.error)
            .where(JobChunk.job_id == job.id, JobChunk.status == ChunkStatus.FAILED)
            .order_by(JobChunk.chunk_index)
            .limit(1)
        )
        final_error = f"{failed} of {total} chunks failed" + (
            f"; first error: {first_error}" if first_error else ""
        )
    else:
        final = JobStatus.SUCCEEDED
    job.progress_done = count_predictions(session, job.id)
    mark_finished(job, final, final_error)
    session.flush()
    return final


def fail_chunk(session: Session, job_id: int, chunk_index: int, reason: str) -> JobStatus | None:
    """Give up on a chunk: an error prediction for each of its items without a row, then
    ``complete_chunk(..., status=FAILED)``. A chunk that is already terminal gets no rows."""
    lock_job(session, job_id)
    chunk = lock_chunk(session, job_id, chunk_index)
    if not ChunkStatus(chunk.status).is_terminal:
        missing = _unrecorded_items(session, chunk)
        record_predictions(
            session,
            job_id,
            [
                PredictionRecord(
                    item_index=index,
                    path=path,
                    file_sha256=None,
                    label=None,
                    confidence=None,
                    top_k=(),
                    error=reason,
                )
                for index, path in missing
            ],
        )
    return complete_chunk(session, job_id, chunk_index, status=ChunkStatus.FAILED, error=reason)
