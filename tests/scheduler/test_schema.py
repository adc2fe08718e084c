"""scheduler.schema: the models' constraints and types as the databases store them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scheduler import repository as repo
from scheduler.schema import Job, JobKind, JobStatus


def test_foreign_keys_are_enforced(session: Session) -> None:
    with pytest.raises(IntegrityError), session.begin():
        repo.record_artifact(session, job_id=12345, kind="csv", path="/x.csv")


def test_timestamps_are_aware_utc(session: Session) -> None:
    local = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    with session.begin():
        job = repo.create_job(session, kind=JobKind.TRAIN, params={})
        job.started_at = local
        job_id = job.id
    session.expunge_all()
    loaded = repo.get_job(session, job_id)
    assert loaded.created_at.tzinfo is not None
    assert loaded.created_at.utcoffset() == timedelta(0)
    assert loaded.started_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert loaded.started_at is not None and loaded.started_at.tzinfo == UTC
    assert abs(datetime.now(UTC) - loaded.created_at) < timedelta(minutes=5)


def test_enums_are_stored_as_lowercase_values(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind="classify", params={"a": [1, 2]}).id
    raw = session.execute(text("SELECT kind, status FROM jobs WHERE id = :id"), {"id": job_id})
    assert tuple(raw.one()) == ("classify", "queued")
    session.rollback()
    job = session.get(Job, job_id)
    assert job is not None and job.kind is JobKind.CLASSIFY and job.status is JobStatus.QUEUED
    assert job.params == {"a": [1, 2]}


# --------------------------------------------------------------------------- retries
