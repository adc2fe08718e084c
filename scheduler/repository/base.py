"""Shared by the repository's modules: its errors (re-exported by the package) and helpers
(not re-exported): the dialect's INSERT, the row locks that serialise a job's state
changes, batching.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, cast

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from scheduler.schema import Job, JobChunk, JobStatus, utcnow

__all__ = [
    "NoRollbackTargetError",
    "NotFoundError",
    "batched",
    "dialect_insert",
    "lock_chunk",
    "lock_job",
    "mark_finished",
    "psycopg_connection",
    "table_of",
]


class NotFoundError(LookupError):
    """A row the caller named does not exist; ``str()`` is e.g. ``"job 42 not found"``."""

    def __init__(self, kind: str, id: object) -> None:
        self.kind = kind
        self.id = id
        super().__init__(f"{kind} {id} not found")


class NoRollbackTargetError(RuntimeError):
    """``rollback_production`` has no production model, or no earlier one to restore."""


def dialect_insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """INSERT with ``on_conflict_*`` support for the session's database."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect {name!r} (use SQLite or PostgreSQL)")


def table_of(model: type[Any]) -> Table:
    return cast(Table, model.__table__)


def lock_job(session: Session, job_id: int) -> Job:
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


def lock_chunk(session: Session, job_id: int, chunk_index: int) -> JobChunk:
    chunk = session.scalars(
        select(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.chunk_index == chunk_index)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if chunk is None:
        raise NotFoundError("chunk", f"{job_id}/{chunk_index}")
    return chunk


def batched(iterable: Iterable[Any], n: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def psycopg_connection(session: Session) -> Any | None:
    """The psycopg 3 connection under the session's transaction, or None on other drivers."""
    connection = session.connection()
    if connection.dialect.name != "postgresql" or connection.dialect.driver != "psycopg":
        return None
    return connection.connection.driver_connection


def mark_finished(job: Job, status: JobStatus, error: str | None) -> None:
    job.status = status
    job.error = error
    job.finished_at = utcnow()
