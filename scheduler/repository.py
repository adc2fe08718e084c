"""Data access for the control plane: every read and write of the job tables goes through here.

Rules (binding for the API, the CLI and the workers; see docs/ARCHITECTURE.md):

- Every function takes a :class:`~sqlalchemy.orm.Session` first and **never commits**: callers
  own the transaction (``with session_factory() as s, s.begin(): ...``, or
  :func:`scheduler.database.run_in_transaction`, which also retries lost connections).
- Writes are idempotent, so a redelivered task or a retried transaction is harmless:
  predictions are inserted with ``ON CONFLICT (job_id, item_index) DO NOTHING``, epoch metrics
  are upserted, model versions / evaluations / artifacts are keyed by their job.
- Missing rows raise :class:`NotFoundError` (``str()`` is e.g. ``"job 42 not found"``).
- Functions that change a job's state lock the job row first (``SELECT ... FOR UPDATE`` on
  PostgreSQL; on SQLite every transaction is already ``BEGIN IMMEDIATE``, see
  :func:`scheduler.database.make_engine`), so concurrent workers finishing the last chunks of a
  job finalise it exactly once.

Lifecycle of a classify job: ``create_job`` -> ``add_job_items`` (items + chunks) -> per chunk
task: ``claim_chunk`` -> ``record_predictions`` (per batch) -> ``complete_chunk`` (or
``fail_chunk`` after the last retry). The job finishes when its last chunk does:
``succeeded`` (per-file read errors inside a successful chunk are normal outcomes), ``partial``
(some chunks failed), ``failed`` (every chunk failed) or ``cancelled`` (cancel was requested).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from scheduler.schema import (
    Artifact,
    ChunkStatus,
    EpochMetric,
    EvaluationReport,
    Job,
    JobChunk,
    JobItem,
    JobKind,
    JobStatus,
    ModelStage,
    ModelVersion,
    PredictionRow,
    utcnow,
)

__all__ = [
    "ITEM_BATCH_SIZE",
    "NoRollbackTargetError",
    "NotFoundError",
    "PredictionRecord",
    "add_job_items",
    "chunk_status_counts",
    "claim_chunk",
    "complete_chunk",
    "count_prediction_errors",
    "count_predictions",
    "create_job",
    "fail_chunk",
    "finish_job",
    "get_artifact",
    "get_chunk",
    "get_evaluation",
    "get_job",
    "get_model_version",
    "get_production_model",
    "is_cancel_requested",
    "iter_job_items",
    "iter_predictions",
    "list_artifacts",
    "list_chunks",
    "list_epoch_metrics",
    "list_jobs",
    "list_model_versions",
    "list_open_jobs",
    "list_predictions",
    "mark_job_running",
    "pending_chunk_indices",
    "promote_model_version",
    "record_artifact",
    "record_epoch_metric",
    "record_evaluation",
    "record_predictions",
    "register_model_version",
    "release_chunk",
    "request_cancel",
    "rollback_production",
    "set_progress",
    "take_stale_chunks",
    "touch_chunk",
]

#: Rows per INSERT batch for job items; bounds memory however many paths a job has.
ITEM_BATCH_SIZE = 5000


class NotFoundError(LookupError):
    """A row the caller named does not exist; ``str()`` is e.g. ``"job 42 not found"``."""

    def __init__(self, kind: str, id: object) -> None:
        self.kind = kind
        self.id = id
        super().__init__(f"{kind} {id} not found")


class NoRollbackTargetError(RuntimeError):
    """``rollback_production`` has no production model, or no earlier one to restore."""


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One classified input as a worker reports it (``error`` set when the file was unreadable)."""

    item_index: int
    path: str
    file_sha256: str | None
    label: str | None
    confidence: float | None
    top_k: tuple[tuple[str, float], ...] = ()
    error: str | None = None


# --------------------------------------------------------------------------- helpers


def _dialect_insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """INSERT with ``on_conflict_*`` support for the session's database."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect {name!r} (use SQLite or PostgreSQL)")


def _table(model: type[Any]) -> Table:
    return cast(Table, model.__table__)


def _lock_job(session: Session, job_id: int) -> Job:
    """Load the job row locked for update, refreshing any stale copy in the session.

    PostgreSQL: ``FOR NO KEY UPDATE``, so state transitions of one job are serialised across
    workers. Not plain ``FOR UPDATE``: inserting a prediction takes a ``FOR KEY SHARE`` lock on
    the job row (foreign-key check), and two workers that each inserted predictions and then
    completed their chunk in the same transaction would deadlock on ``FOR UPDATE``.
    SQLite ignores the clause; its transactions start with BEGIN IMMEDIATE (one writer).
    """
    job = session.scalars(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if job is None:
        raise NotFoundError("job", job_id)
    return job


def _get_chunk_for_update(session: Session, job_id: int, chunk_index: int) -> JobChunk:
    chunk = session.scalars(
        select(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.chunk_index == chunk_index)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if chunk is None:
        raise NotFoundError("chunk", f"{job_id}/{chunk_index}")
    return chunk


def _cancel_open_chunks(session: Session, job_id: int, statuses: Iterable[ChunkStatus]) -> None:
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.status.in_(list(statuses)))
        .values(status=ChunkStatus.CANCELLED, updated_at=utcnow()),
        execution_options={"synchronize_session": False},
    )


def _batched(iterable: Iterable[Any], n: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


# --------------------------------------------------------------------------- jobs


def create_job(
    session: Session,
    *,
    kind: JobKind | str,
    params: dict[str, Any],
    submitter: str | None = None,
    model_version_id: int | None = None,
) -> Job:
    """Insert a queued job and flush it so ``job.id`` is set."""
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
    job = _lock_job(session, job_id)
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
    for batch in _batched(chunk_rows, ITEM_BATCH_SIZE):
        session.execute(_table(JobChunk).insert(), batch)
    job.progress_total = count
    session.flush()
    return count


def _insert_items(session: Session, job_id: int, paths: Iterable[str]) -> int:
    psycopg_conn = _psycopg_connection(session)
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
    table = _table(JobItem)
    for batch in _batched(paths, ITEM_BATCH_SIZE):
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
    job = _lock_job(session, job_id)
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
    job = _lock_job(session, job_id)
    if job.is_terminal:
        return job
    job.cancel_requested = True
    _cancel_open_chunks(session, job_id, [ChunkStatus.PENDING])
    session.flush()
    if job.status == JobStatus.QUEUED:
        _finish(job, JobStatus.CANCELLED, None)
        session.flush()
    else:
        # If no chunk is running, nothing would call complete_chunk: finalise here.
        _finalize_if_done(session, job)
    return job


def is_cancel_requested(session: Session, job_id: int) -> bool:
    """True once cancel was requested (or the job is already cancelled)."""
    row = session.execute(
        select(Job.cancel_requested, Job.status).where(Job.id == job_id)
    ).one_or_none()
    if row is None:
        raise NotFoundError("job", job_id)
    return bool(row.cancel_requested) or row.status == JobStatus.CANCELLED


def _finish(job: Job, status: JobStatus, error: str | None) -> None:
    job.status = status
    job.error = error
    job.finished_at = utcnow()


def finish_job(
    session: Session, job_id: int, status: JobStatus | str, *, error: str | None = None
) -> Job:
    """Move a job to a terminal ``status``; a job that is already terminal is left as it is.

    Open chunks of the job are cancelled so nothing keeps running for a finished job.
    """
    status = JobStatus(status)
    if not status.is_terminal:
        raise ValueError(f"finish_job needs a terminal status, got {status!s}")
    job = _lock_job(session, job_id)
    if job.is_terminal:
        return job
    _finish(job, status, error)
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


# --------------------------------------------------------------------------- chunks


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


def list_open_jobs(session: Session) -> list[Job]:
    """Jobs that are queued or running, oldest first (what the worker recovery sweeps)."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .order_by(Job.id)
        )
    )


# Liveness of chunks (see worker/recovery.py): ``updated_at`` of a running chunk is its
# heartbeat, that of a pending chunk the time it was (re)sent or may next be retried.


def touch_chunk(session: Session, job_id: int, chunk_index: int) -> bool:
    """Heartbeat of a running chunk: refresh ``updated_at``; False if it is not running."""
    result = session.execute(
        update(JobChunk)
        .where(
            JobChunk.job_id == job_id,
            JobChunk.chunk_index == chunk_index,
            JobChunk.status == ChunkStatus.RUNNING,
        )
        .values(updated_at=utcnow()),
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
    result = session.execute(
        update(JobChunk)
        .where(
            JobChunk.job_id == job_id,
            JobChunk.chunk_index == chunk_index,
            JobChunk.status == ChunkStatus.RUNNING,
            held,
            JobChunk.updated_at < before,
        )
        .values(status=ChunkStatus.PENDING, updated_at=utcnow()),
        execution_options={"synchronize_session": False},
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def abandon_chunk(session: Session, job_id: int, chunk_index: int) -> int:
    """The chunk's worker gave up on it (deadline missed, worker/liveness.py): a running
    chunk goes back to ``pending`` with ``abandons += 1``; returns the new count (0 when the
    chunk was no longer running, e.g. cancelled meanwhile: nothing to re-send)."""
    chunk = _get_chunk_for_update(session, job_id, chunk_index)
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
    job = _lock_job(session, job_id)
    chunk = _get_chunk_for_update(session, job_id, chunk_index)
    if ChunkStatus(chunk.status).is_terminal or job.is_terminal:
        return None
    if job.cancel_requested:
        chunk.status = ChunkStatus.CANCELLED
        chunk.updated_at = utcnow()
        session.flush()
        _finalize_if_done(session, job)
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
    job = _lock_job(session, job_id)
    chunk = _get_chunk_for_update(session, job_id, chunk_index)
    if not ChunkStatus(chunk.status).is_terminal:
        chunk.status = status
        chunk.error = error
        chunk.updated_at = utcnow()
    job.progress_done = count_predictions(session, job_id)
    session.flush()
    return _finalize_if_done(session, job)


def _finalize_if_done(session: Session, job: Job) -> JobStatus | None:
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
    _finish(job, final, final_error)
    session.flush()
    return final


def fail_chunk(session: Session, job_id: int, chunk_index: int, reason: str) -> JobStatus | None:
    """Give up on a chunk: an error prediction for each of its items without a row, then
    ``complete_chunk(..., status=FAILED)``. A chunk that is already terminal gets no rows."""
    _lock_job(session, job_id)
    chunk = _get_chunk_for_update(session, job_id, chunk_index)
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


# --------------------------------------------------------------------------- predictions


def record_predictions(session: Session, job_id: int, records: Sequence[PredictionRecord]) -> int:
    """Bulk insert predictions; rows whose (job_id, item_index) exists are skipped.

    Returns the number of rows actually added. PostgreSQL (psycopg 3): the rows are COPYed
    into a session-private staging table, then moved with one ``INSERT ... SELECT ... ON
    CONFLICT (job_id, item_index) DO NOTHING`` (multi-row VALUES statements spend most of their
    time in client-side query parsing; COPY does not). SQLite and other drivers: an
    ``executemany`` of ``INSERT ... ON CONFLICT DO NOTHING``.
    """
    if not records:
        return 0
    now = utcnow()
    psycopg_conn = _psycopg_connection(session)
    if psycopg_conn is not None:
        return _copy_predictions(psycopg_conn, job_id, records, now)
    rows = [
        {
            "job_id": job_id,
            "item_index": r.item_index,
            "path": r.path,
            "file_sha256": r.file_sha256,
            "label": r.label,
            "confidence": r.confidence,
            "top_k": _top_k_json(r.top_k),
            "error": r.error,
            "created_at": now,
        }
        for r in records
    ]
    stmt = _dialect_insert(session, _table(PredictionRow)).on_conflict_do_nothing(
        index_elements=["job_id", "item_index"]
    )
    # preserve_rowcount: SQLAlchemy otherwise drops the cursor's rowcount for INSERTs; for an
    # executemany sqlite3 reports the total of inserted rows (skipped conflicts count 0).
    result = session.execute(stmt, rows, execution_options={"preserve_rowcount": True})
    return int(result.rowcount)  # type: ignore[attr-defined]


def _top_k_json(top_k: Sequence[tuple[str, float]]) -> list[list[Any]]:
    return [[str(label), float(p)] for label, p in top_k]


def _psycopg_connection(session: Session) -> Any | None:
    """The psycopg 3 connection under the session's transaction, or None on other drivers."""
    connection = session.connection()
    if connection.dialect.name != "postgresql" or connection.dialect.driver != "psycopg":
        return None
    return connection.connection.driver_connection


_STAGE_TABLE = "mriq_prediction_stage"


def _copy_predictions(
    conn: Any, job_id: int, records: Sequence[PredictionRecord], now: datetime
) -> int:
    with conn.cursor() as cursor:
        # A temporary table is private to this connection; ON COMMIT DELETE ROWS empties it at
        # every commit and the DELETE below empties it for further calls in this transaction.
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE_TABLE} ("
            "item_index integer, path text, file_sha256 text, label text, "
            "confidence double precision, top_k text, error text) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(
            f"COPY {_STAGE_TABLE} (item_index, path, file_sha256, label, confidence, top_k, "
            "error) FROM STDIN"
        ) as copy:
            for r in records:
                copy.write_row(
                    (
                        r.item_index,
                        r.path,
                        r.file_sha256,
                        r.label,
                        r.confidence,
                        json.dumps(_top_k_json(r.top_k)),
                        r.error,
                    )
                )
        # A batch repeating an item_index is fine too: DO NOTHING skips the second row.
        cursor.execute(
            "INSERT INTO predictions (job_id, item_index, path, file_sha256, label, confidence, "
            "top_k, error, created_at) "
            f"SELECT %s, item_index, path, file_sha256, label, confidence, top_k::json, error, %s "
            f"FROM {_STAGE_TABLE} ON CONFLICT (job_id, item_index) DO NOTHING",
            (job_id, now),
        )
        added = cursor.rowcount
        cursor.execute(f"DELETE FROM {_STAGE_TABLE}")
    return int(added)


def count_predictions(session: Session, job_id: int) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(PredictionRow).where(PredictionRow.job_id == job_id)
        )
        or 0
    )


def count_prediction_errors(session: Session, job_id: int) -> int:
    """Predictions of the job that are per-file errors (unreadable input, failed chunk)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(PredictionRow)
            .where(PredictionRow.job_id == job_id, PredictionRow.error.is_not(None))
        )
        or 0
    )


def list_predictions(
    session: Session, job_id: int, *, offset: int = 0, limit: int = 1000
) -> list[PredictionRow]:
    """A page of the job's predictions ordered by item_index."""
    return list(
        session.scalars(
            select(PredictionRow)
            .where(PredictionRow.job_id == job_id)
            .order_by(PredictionRow.item_index)
            .offset(offset)
            .limit(limit)
        )
    )


def iter_predictions(session: Session, job_id: int, batch: int = 5000) -> Iterator[PredictionRow]:
    """All of the job's predictions ordered by item_index, fetched in keyset pages of ``batch``
    rows (no OFFSET scans; memory stays flat because the session's identity map only holds
    rows weakly, so pages the caller dropped are freed). For a long export on SQLite, start the
    session with ``session.connection(execution_options=scheduler.database.READ_ONLY)`` so the
    stream does not hold the write lock."""
    last = -1
    while True:
        rows = list(
            session.scalars(
                select(PredictionRow)
                .where(PredictionRow.job_id == job_id, PredictionRow.item_index > last)
                .order_by(PredictionRow.item_index)
                .limit(batch)
            )
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].item_index


# --------------------------------------------------------------------------- training metrics


def record_epoch_metric(
    session: Session,
    job_id: int,
    *,
    epoch: int,
    train_loss: float | None,
    val_loss: float | None,
    val_accuracy: float | None,
    val_macro_f1: float | None,
    lr: float | None,
    seconds: float | None,
) -> None:
    """Insert or overwrite the metrics of (job_id, epoch): a resumed run re-reports epochs."""
    values = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "val_macro_f1": val_macro_f1,
        "lr": lr,
        "seconds": seconds,
    }
    insert = _dialect_insert(session, _table(EpochMetric)).values(
        job_id=job_id, epoch=epoch, created_at=utcnow(), **values
    )
    session.execute(insert.on_conflict_do_update(index_elements=["job_id", "epoch"], set_=values))


def list_epoch_metrics(session: Session, job_id: int) -> list[EpochMetric]:
    return list(
        session.scalars(
            select(EpochMetric)
            .where(EpochMetric.job_id == job_id)
            .order_by(EpochMetric.epoch)
            .execution_options(populate_existing=True)
        )
    )


def record_evaluation(
    session: Session,
    *,
    job_id: int,
    model_version_id: int | None,
    dataset: str | None,
    report: dict[str, Any],
) -> EvaluationReport:
    """Store the job's evaluation report (one per job; a retry overwrites it).

    ``accuracy`` and ``macro_f1`` are copied out of ``report`` for listing and sorting.
    """
    accuracy = report.get("accuracy")
    macro_f1 = report.get("macro_f1")
    row = session.scalars(
        select(EvaluationReport).where(EvaluationReport.job_id == job_id)
    ).one_or_none()
    if row is None:
        row = EvaluationReport(job_id=job_id, created_at=utcnow())
        session.add(row)
    row.model_version_id = model_version_id
    row.dataset = dataset
    row.accuracy = None if accuracy is None else float(accuracy)
    row.macro_f1 = None if macro_f1 is None else float(macro_f1)
    row.report = dict(report)
    session.flush()
    return row


def get_evaluation(session: Session, job_id: int) -> EvaluationReport:
    """The evaluation report of a job; NotFoundError("evaluation", job_id) if none yet."""
    row = session.scalars(
        select(EvaluationReport).where(EvaluationReport.job_id == job_id)
    ).one_or_none()
    if row is None:
        raise NotFoundError("evaluation", job_id)
    return row


# --------------------------------------------------------------------------- model versions


CALIBRATION_FIELDS = (
    "temperature",
    "calibrated",
    "ece",
    "ece_uncalibrated",
    "nll",
    "nll_uncalibrated",
)


def _calibration_columns(calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    data = dict(calibration or {})
    unknown = set(data) - set(CALIBRATION_FIELDS)
    if unknown:
        raise ValueError(f"unknown calibration fields: {sorted(unknown)}")

    def opt(key: str) -> float | None:
        value = data.get(key)
        return None if value is None else float(value)

    return {
        "temperature": float(data.get("temperature", 1.0)),
        "calibrated": bool(data.get("calibrated", False)),
        "ece": opt("ece"),
        "ece_uncalibrated": opt("ece_uncalibrated"),
        "nll": opt("nll"),
        "nll_uncalibrated": opt("nll_uncalibrated"),
    }


def register_model_version(
    session: Session,
    *,
    training_job_id: int | None,
    arch: str,
    label_mode: str,
    classes: Sequence[str],
    checkpoint_path: str,
    checkpoint_sha256: str,
    metrics: dict[str, Any],
    calibration: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Register a trained checkpoint as a candidate; idempotent per ``training_job_id``.

    A retry for the same training job returns the existing row; while it is still a candidate
    its checkpoint and metrics are refreshed (the retry's files are the current ones).
    ``calibration`` holds any of ``CALIBRATION_FIELDS`` (absent: temperature 1.0, not
    calibrated, no ECE/NLL).
    """
    cal = _calibration_columns(calibration)
    if training_job_id is not None:
        existing = session.scalars(
            select(ModelVersion).where(ModelVersion.training_job_id == training_job_id)
        ).one_or_none()
        if existing is not None:
            if existing.stage == ModelStage.CANDIDATE:
                existing.arch = arch
                existing.label_mode = label_mode
                existing.classes = list(classes)
                existing.checkpoint_path = checkpoint_path
                existing.checkpoint_sha256 = checkpoint_sha256
                existing.metrics = dict(metrics)
                for key, value in cal.items():
                    setattr(existing, key, value)
                session.flush()
            return existing
    version = ModelVersion(
        training_job_id=training_job_id,
        arch=arch,
        label_mode=label_mode,
        classes=list(classes),
        checkpoint_path=checkpoint_path,
        checkpoint_sha256=checkpoint_sha256,
        metrics=dict(metrics),
        stage=ModelStage.CANDIDATE,
        created_at=utcnow(),
        **cal,
    )
    session.add(version)
    session.flush()
    return version


def get_model_version(session: Session, id: int) -> ModelVersion:
    version = session.get(ModelVersion, id)
    if version is None:
        raise NotFoundError("model version", id)
    return version


def list_model_versions(session: Session) -> list[ModelVersion]:
    """All model versions, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def get_production_model(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.stage == ModelStage.PRODUCTION)
    ).one_or_none()


def _production_for_update(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.stage == ModelStage.PRODUCTION)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def promote_model_version(session: Session, id: int) -> ModelVersion:
    """Make ``id`` the production model; the current production one becomes archived.

    Promoting the production model again is a no-op. The partial unique index on
    ``stage = 'production'`` guarantees a concurrent promotion cannot leave two.
    """
    version = get_model_version(session, id)
    current = _production_for_update(session)
    if current is not None and current.id == version.id:
        return version
    now = utcnow()
    if current is not None:
        current.stage = ModelStage.ARCHIVED
        current.archived_at = now
        # Flush the demotion first: the unit of work orders UPDATEs by primary key, not by our
        # intent, and the unique index would reject two production rows even transiently.
        session.flush()
    version.stage = ModelStage.PRODUCTION
    version.promoted_at = now
    version.archived_at = None
    session.flush()
    return version


def rollback_production(session: Session) -> ModelVersion:
    """Archive the production model and restore the most recently archived former production
    model; returns the restored one. Raises NoRollbackTargetError if there is no production
    model or no earlier one (nothing is changed then)."""
    current = _production_for_update(session)
    if current is None:
        raise NoRollbackTargetError("there is no production model to roll back")
    target = session.scalars(
        select(ModelVersion)
        .where(
            ModelVersion.stage == ModelStage.ARCHIVED,
            ModelVersion.promoted_at.is_not(None),
            ModelVersion.id != current.id,
        )
        .order_by(ModelVersion.archived_at.desc(), ModelVersion.id.desc())
        .limit(1)
    ).one_or_none()
    if target is None:
        raise NoRollbackTargetError(
            f"model version {current.id} is the only model that has been in production"
        )
    now = utcnow()
    current.stage = ModelStage.ARCHIVED
    current.archived_at = now
    session.flush()  # demote first, see promote_model_version
    target.stage = ModelStage.PRODUCTION
    target.promoted_at = now
    target.archived_at = None
    session.flush()
    return target


# --------------------------------------------------------------------------- artifacts


def record_artifact(
    session: Session,
    *,
    job_id: int,
    kind: str,
    path: str,
    model_version_id: int | None = None,
) -> Artifact:
    """Register a file a job produced; idempotent on (job_id, path)."""
    artifact = session.scalars(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.path == path)
    ).one_or_none()
    if artifact is None:
        artifact = Artifact(
            job_id=job_id,
            kind=kind,
            path=path,
            model_version_id=model_version_id,
            created_at=utcnow(),
        )
        session.add(artifact)
    else:
        artifact.kind = kind
        if model_version_id is not None:
            artifact.model_version_id = model_version_id
    session.flush()
    return artifact


def list_artifacts(session: Session, job_id: int) -> list[Artifact]:
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id))
    )


def get_artifact(session: Session, artifact_id: int) -> Artifact:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None:
        raise NotFoundError("artifact", artifact_id)
    return artifact
