"""scheduler.repository.jobs: lifecycle, lookups, listing, cancellation.

On real SQLite and PostgreSQL databases (``db_url`` runs both)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from scheduler import repository as repo
from scheduler.repository import NotFoundError
from scheduler.schema import ChunkStatus, JobKind, JobStatus
from tests.scheduler.repository.factories import make_classify_job, make_record


def test_job_lifecycle(session: Session) -> None:
    with session.begin():
        job = repo.create_job(session, kind=JobKind.TRAIN, params={"epochs": 2}, submitter="alice")
        job_id = job.id
    job = repo.get_job(session, job_id)
    assert (job.status, job.kind, job.submitter) == (JobStatus.QUEUED, JobKind.TRAIN, "alice")
    assert job.params == {"epochs": 2} and job.started_at is None and not job.cancel_requested
    session.rollback()

    with session.begin():
        job = repo.mark_job_running(session, job_id)
        started = job.started_at
        assert job.status is JobStatus.RUNNING and started is not None
    with session.begin():
        assert repo.mark_job_running(session, job_id).started_at == started  # no-op
        repo.set_progress(session, job_id, 3, total=10)
    with session.begin():
        job = repo.finish_job(session, job_id, JobStatus.SUCCEEDED)
        assert job.status is JobStatus.SUCCEEDED and job.finished_at is not None
    with session.begin():
        # A terminal status is never overwritten.
        job = repo.finish_job(session, job_id, JobStatus.FAILED, error="late")
        assert job.status is JobStatus.SUCCEEDED and job.error is None
        assert (job.progress_done, job.progress_total) == (3, 10)
        assert repo.mark_job_running(session, job_id).status is JobStatus.SUCCEEDED
    with pytest.raises(ValueError, match="terminal"), session.begin():
        repo.finish_job(session, job_id, JobStatus.RUNNING)


def test_not_found_errors_name_the_row(session: Session) -> None:
    with pytest.raises(NotFoundError, match="^job 42 not found$") as info:
        repo.get_job(session, 42)
    assert (info.value.kind, info.value.id) == ("job", 42)
    for call in (
        lambda: repo.mark_job_running(session, 42),
        lambda: repo.request_cancel(session, 42),
        lambda: repo.is_cancel_requested(session, 42),
        lambda: repo.set_progress(session, 42, 1),
        lambda: repo.claim_chunk(session, 42, 0),
    ):
        with pytest.raises(NotFoundError, match="job 42 not found"):
            call()
        session.rollback()
    with pytest.raises(NotFoundError, match="model version 7 not found"):
        repo.get_model_version(session, 7)
    with pytest.raises(NotFoundError, match="artifact 7 not found"):
        repo.get_artifact(session, 7)
    with pytest.raises(NotFoundError, match="evaluation 7 not found"):
        repo.get_evaluation(session, 7)


def test_list_jobs_filters_newest_first(session: Session) -> None:
    with session.begin():
        ids = [
            repo.create_job(session, kind=kind, params={}).id
            for kind in (JobKind.TRAIN, JobKind.CLASSIFY, JobKind.CLASSIFY, JobKind.EVALUATE)
        ]
        repo.mark_job_running(session, ids[1])
    assert [j.id for j in repo.list_jobs(session)] == ids[::-1]
    assert [j.id for j in repo.list_jobs(session, kind="classify")] == [ids[2], ids[1]]
    assert [j.id for j in repo.list_jobs(session, status=JobStatus.RUNNING)] == [ids[1]]
    assert [j.id for j in repo.list_jobs(session, limit=2, offset=1)] == [ids[2], ids[1]]


def test_request_cancel_of_queued_job_is_immediate(session: Session) -> None:
    job_id = make_classify_job(session, 4, 2)
    with session.begin():
        job = repo.request_cancel(session, job_id)
        assert job.status is JobStatus.CANCELLED and job.finished_at is not None
    assert repo.is_cancel_requested(session, job_id)
    assert repo.chunk_status_counts(session, job_id)[ChunkStatus.CANCELLED] == 2
    session.rollback()
    with session.begin():
        assert repo.claim_chunk(session, job_id, 0) is None
        assert repo.request_cancel(session, job_id).status is JobStatus.CANCELLED  # no-op


def test_request_cancel_of_running_job_finishes_with_last_chunk(session: Session) -> None:
    job_id = make_classify_job(session, 9, 3)
    with session.begin():
        repo.claim_chunk(session, job_id, 0)
        repo.record_predictions(session, job_id, [make_record(0)])
    with session.begin():
        job = repo.request_cancel(session, job_id)
        assert job.status is JobStatus.RUNNING and job.cancel_requested
    assert repo.is_cancel_requested(session, job_id)
    counts = repo.chunk_status_counts(session, job_id)
    assert (counts[ChunkStatus.RUNNING], counts[ChunkStatus.CANCELLED]) == (1, 2)
    session.rollback()
    with session.begin():
        assert repo.claim_chunk(session, job_id, 1) is None  # cancelled: workers skip
        final = repo.complete_chunk(session, job_id, 0, status=ChunkStatus.CANCELLED)
    assert final is JobStatus.CANCELLED
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.CANCELLED and job.progress_done == 1


def test_request_cancel_with_nothing_running_finishes_now(session: Session) -> None:
    job_id = make_classify_job(session, 4, 2)
    with session.begin():
        repo.claim_chunk(session, job_id, 0)
        repo.complete_chunk(session, job_id, 0)
    with session.begin():
        assert repo.request_cancel(session, job_id).status is JobStatus.CANCELLED


def test_train_job_cancel_flag(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        repo.mark_job_running(session, job_id)
    assert not repo.is_cancel_requested(session, job_id)
    session.rollback()
    with session.begin():
        assert repo.request_cancel(session, job_id).status is JobStatus.RUNNING
    assert repo.is_cancel_requested(session, job_id)
    session.rollback()
    with session.begin():
        assert repo.finish_job(session, job_id, "cancelled").status is JobStatus.CANCELLED
