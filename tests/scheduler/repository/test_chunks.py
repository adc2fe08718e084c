"""scheduler.repository.chunks: items and chunks, claiming, completing, failing, the
job's final status, concurrent finalisation.

On real SQLite and PostgreSQL databases (``db_url`` runs both)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository as repo
from scheduler.repository import NotFoundError
from scheduler.schema import ChunkStatus, JobKind, JobStatus
from tests.scheduler.repository.factories import make_classify_job, make_paths, make_record


def test_add_job_items_makes_chunks_with_correct_ranges(session: Session) -> None:
    job_id = make_classify_job(session, 10_000, 256)
    chunks = repo.list_chunks(session, job_id)
    assert len(chunks) == 40
    assert [(c.start_index, c.stop_index) for c in chunks[:2]] == [(0, 256), (256, 512)]
    assert (chunks[-1].start_index, chunks[-1].stop_index) == (9984, 10_000)
    assert all(c.status is ChunkStatus.PENDING and c.attempts == 0 for c in chunks)
    assert all(a.stop_index == b.start_index for a, b in zip(chunks, chunks[1:], strict=False))
    assert repo.get_job(session, job_id).progress_total == 10_000
    assert repo.pending_chunk_indices(session, job_id) == list(range(40))
    items = list(repo.iter_job_items(session, job_id))
    assert len(items) == 10_000
    assert items[1234] == (1234, "/data/img_01234.png")
    assert list(repo.iter_job_items(session, job_id, start=9998)) == [
        (9998, "/data/img_09998.png"),
        (9999, "/data/img_09999.png"),
    ]


def test_add_job_items_edge_cases(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.CLASSIFY, params={}).id
        assert repo.add_job_items(session, job_id, iter([]), chunk_size=256) == 0
        assert repo.list_chunks(session, job_id) == []
    with session.begin():
        other = repo.create_job(session, kind=JobKind.CLASSIFY, params={}).id
        assert repo.add_job_items(session, other, make_paths(5), chunk_size=256) == 5
        assert [(c.start_index, c.stop_index) for c in repo.list_chunks(session, other)] == [(0, 5)]
    with pytest.raises(ValueError, match="already has items"), session.begin():
        repo.add_job_items(session, other, make_paths(5), chunk_size=256)
    with pytest.raises(ValueError, match="chunk_size"), session.begin():
        repo.add_job_items(session, other, make_paths(5), chunk_size=0)


def test_claim_chunk_returns_only_unrecorded_items(session: Session) -> None:
    job_id = make_classify_job(session, 10, 4)  # chunks [0,4) [4,8) [8,10)
    with session.begin():
        items = repo.claim_chunk(session, job_id, 1)
        assert items == [(i, f"/data/img_{i:05d}.png") for i in range(4, 8)]
        assert repo.get_job(session, job_id).status is JobStatus.RUNNING
        assert repo.record_predictions(session, job_id, [make_record(4), make_record(6)]) == 2
    with session.begin():
        # Redelivery after a crash: only what is missing is handed out again.
        items = repo.claim_chunk(session, job_id, 1)
        assert items == [(5, "/data/img_00005.png"), (7, "/data/img_00007.png")]
        assert repo.get_chunk(session, job_id, 1).attempts == 2
        assert repo.get_chunk(session, job_id, 1).status is ChunkStatus.RUNNING
        repo.record_predictions(session, job_id, [make_record(5), make_record(7)])
        assert repo.complete_chunk(session, job_id, 1) is None  # other chunks still pending
    with session.begin():
        assert repo.claim_chunk(session, job_id, 1) is None  # finished chunk
        assert repo.get_chunk(session, job_id, 1).attempts == 2
    with pytest.raises(NotFoundError, match=f"chunk {job_id}/99 not found"), session.begin():
        repo.claim_chunk(session, job_id, 99)


def test_complete_chunks_job_succeeds_with_per_file_errors(session: Session) -> None:
    job_id = make_classify_job(session, 6, 3)
    for chunk in (0, 1):
        with session.begin():
            items = repo.claim_chunk(session, job_id, chunk)
            assert items is not None
            records = [make_record(i) for i, _ in items]
            records[0] = make_record(items[0][0], error="/data/x.png: empty file")
            repo.record_predictions(session, job_id, records)
            final = repo.complete_chunk(session, job_id, chunk)
    assert final is JobStatus.SUCCEEDED
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.finished_at is not None
    assert (job.progress_done, job.progress_total) == (6, 6)
    assert repo.count_prediction_errors(session, job_id) == 2
    session.rollback()
    with session.begin():
        assert repo.complete_chunk(session, job_id, 1) is None  # already finished: no-op
        assert repo.claim_chunk(session, job_id, 0) is None


def test_fail_chunk_makes_job_partial(session: Session) -> None:
    job_id = make_classify_job(session, 6, 3)
    with session.begin():
        repo.claim_chunk(session, job_id, 0)
        repo.record_predictions(session, job_id, [make_record(i) for i in range(3)])
        assert repo.complete_chunk(session, job_id, 0) is None
    with session.begin():
        repo.claim_chunk(session, job_id, 1)
        repo.record_predictions(session, job_id, [make_record(3)])
        final = repo.fail_chunk(session, job_id, 1, "worker lost 3 times")
    assert final is JobStatus.PARTIAL
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.PARTIAL and "1 of 2 chunks failed" in (job.error or "")
    assert job.progress_done == 6
    rows = repo.list_predictions(session, job_id)
    assert [r.error for r in rows[3:]] == [None, "worker lost 3 times", "worker lost 3 times"]
    assert repo.get_chunk(session, job_id, 1).status is ChunkStatus.FAILED


def test_all_chunks_failed_makes_job_failed(session: Session) -> None:
    job_id = make_classify_job(session, 4, 2)
    with session.begin():
        assert repo.fail_chunk(session, job_id, 0, "boom") is None
    with session.begin():
        assert repo.fail_chunk(session, job_id, 1, "boom") is JobStatus.FAILED
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.FAILED
    assert job.error == "2 of 2 chunks failed; first error: boom"
    assert repo.count_prediction_errors(session, job_id) == 4


def test_concurrent_last_chunks_finalise_the_job_once(
    session_factory: sessionmaker[Session],
) -> None:
    """Two workers record their last batch and complete their chunk in one transaction each,
    at the same moment: no deadlock (FK KEY SHARE vs the job lock), and exactly one of them
    finalises the job."""
    with session_factory() as s:
        job_id = make_classify_job(s, 4, 1)
    for chunk in range(4):
        with session_factory() as s, s.begin():
            repo.claim_chunk(s, job_id, chunk)
    with session_factory() as s, s.begin():
        repo.record_predictions(s, job_id, [make_record(0), make_record(1)])
        repo.complete_chunk(s, job_id, 0)
        repo.complete_chunk(s, job_id, 1)
    barrier = threading.Barrier(2, timeout=30)
    # PostgreSQL: both transactions hold their inserted rows (and the FK lock on the job row)
    # before either completes its chunk. SQLite cannot overlap writers, so no second barrier.
    inserted = threading.Barrier(2, timeout=30)
    overlap = session_factory.kw["bind"].dialect.name == "postgresql"
    results: list[JobStatus | None] = []
    errors: list[BaseException] = []

    def finish(chunk: int) -> None:
        try:
            with session_factory() as s:
                barrier.wait()
                with s.begin():
                    repo.record_predictions(s, job_id, [make_record(chunk)])
                    if overlap:
                        inserted.wait()
                    results.append(repo.complete_chunk(s, job_id, chunk))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(chunk,)) for chunk in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results, key=str) == sorted([None, JobStatus.SUCCEEDED], key=str)
    with session_factory() as s:
        job = repo.get_job(s, job_id)
        assert job.status is JobStatus.SUCCEEDED and job.progress_done == 4


def test_redelivered_running_chunk_after_cancel_finishes_the_job(session: Session) -> None:
    job_id = make_classify_job(session, 4, 2)
    with session.begin():
        repo.claim_chunk(session, job_id, 0)  # the worker then dies without completing
        repo.claim_chunk(session, job_id, 1)
        repo.complete_chunk(session, job_id, 1)
    with session.begin():
        assert repo.request_cancel(session, job_id).status is JobStatus.RUNNING
    with session.begin():
        assert repo.claim_chunk(session, job_id, 0) is None  # redelivery: nothing to do
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.CANCELLED
    assert repo.get_chunk(session, job_id, 0).status is ChunkStatus.CANCELLED
