"""worker.ledger.ChunkLedger: one classify chunk's database side, on a real SQLite file."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import ChunkStatus, JobKind, JobStatus, utcnow
from tests.worker.conftest import make_settings, migrated_factory
from worker.ledger import DEFAULT_BATCH_SIZE, ChunkLedger, PermanentChunkError


@pytest.fixture
def db(tmp_path: Path, sqlite_url: str):  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    try:
        yield settings, factory
    finally:
        factory.kw["bind"].dispose()


def _job(factory: sessionmaker[Session], n: int, *, with_model: bool = True) -> int:
    with factory.begin() as session:
        version_id = None
        if with_model:
            version = repository.register_model_version(
                session,
                training_job_id=None,
                arch="resnet18",
                label_mode="15",
                classes=["a", "b"],
                checkpoint_path="/models/m.pt",
                checkpoint_sha256="ab" * 32,
                metrics={},
            )
            version_id = int(version.id)
        job = repository.create_job(
            session, kind=JobKind.CLASSIFY, params={"top_k": 2}, model_version_id=version_id
        )
        repository.add_job_items(session, job.id, [f"/x/{i}.png" for i in range(n)], chunk_size=2)
        return int(job.id)


def _record(index: int, error: str | None = None) -> repository.PredictionRecord:
    return repository.PredictionRecord(
        item_index=index,
        path=f"/x/{index}.png",
        file_sha256=None,
        label=None if error else "a",
        confidence=None if error else 0.9,
        top_k=() if error else (("a", 0.9), ("b", 0.1)),
        error=error,
    )


def _chunk(factory: sessionmaker[Session], job_id: int, index: int) -> tuple[ChunkStatus, int]:
    with factory() as session:
        chunk = repository.get_chunk(session, job_id, index)
        return ChunkStatus(chunk.status), int(chunk.attempts)


def test_claim_hands_out_unrecorded_items_and_the_model(db) -> None:  # type: ignore[no-untyped-def]
    settings, factory = db
    job_id = _job(factory, 4)
    ledger = ChunkLedger(settings, job_id, 0)
    work = ledger.claim("w@host")
    assert work is not None
    assert work.items == [(0, "/x/0.png"), (1, "/x/1.png")]
    assert (work.attempts, work.top_k, work.batch_size) == (1, 2, DEFAULT_BATCH_SIZE)
    assert (work.checkpoint_path, work.checkpoint_sha256) == ("/models/m.pt", "ab" * 32)
    assert ledger.record([_record(0)]) is False
    # A second claim (a redelivery) gets only the item without a row, attempts counted.
    again = ledger.claim("w@host")
    assert again is not None and again.items == [(1, "/x/1.png")] and again.attempts == 2


def test_complete_finishes_the_job_with_its_last_chunk(db) -> None:  # type: ignore[no-untyped-def]
    settings, factory = db
    job_id = _job(factory, 4)
    first, second = ChunkLedger(settings, job_id, 0), ChunkLedger(settings, job_id, 1)
    for ledger, indices in ((first, (0, 1)), (second, (2, 3))):
        assert ledger.claim() is not None
        ledger.record([_record(i) for i in indices])
    assert first.complete() is None  # the other chunk is still running
    assert second.complete() == JobStatus.SUCCEEDED
    # Terminal now: nothing more to claim.
    assert first.claim() is None


def test_fail_writes_error_rows_and_makes_the_job_partial(db) -> None:  # type: ignore[no-untyped-def]
    settings, factory = db
    job_id = _job(factory, 4)
    ok, bad = ChunkLedger(settings, job_id, 0), ChunkLedger(settings, job_id, 1)
    ok.claim()
    ok.record([_record(0), _record(1)])
    ok.complete()
    bad.claim()
    bad.record([_record(2)])
    assert bad.fail("model exploded") == JobStatus.PARTIAL
    with factory() as session:
        rows = repository.list_predictions(session, job_id)
    assert [r.error for r in rows] == [None, None, None, "model exploded"]
    assert _chunk(factory, job_id, 1)[0] == ChunkStatus.FAILED


def test_record_reports_a_cancel_request(db) -> None:  # type: ignore[no-untyped-def]
    settings, factory = db
    job_id = _job(factory, 4)
    ledger = ChunkLedger(settings, job_id, 0)
    ledger.claim()
    with factory.begin() as session:
        repository.mark_job_running(session, job_id)
        repository.request_cancel(session, job_id)
    assert ledger.record([_record(0)]) is True
    # The other chunk was pending, so the cancel request cancelled it: this one ends the job.
    assert ledger.complete(ChunkStatus.CANCELLED) == JobStatus.CANCELLED
    assert _chunk(factory, job_id, 0)[0] == ChunkStatus.CANCELLED


def test_abandon_counts_and_release_puts_the_chunk_back(db) -> None:  # type: ignore[no-untyped-def]
    settings, factory = db
    job_id = _job(factory, 2)
    ledger = ChunkLedger(settings, job_id, 0)
    ledger.claim()
    assert ledger.abandon() == 1
    assert _chunk(factory, job_id, 0)[0] == ChunkStatus.PENDING
    assert ledger.abandon() == 0  # no longer running: nothing to abandon
    ledger.claim()
    ledger.release(utcnow() + timedelta(seconds=60))
    assert _chunk(factory, job_id, 0) == (ChunkStatus.PENDING, 2)


def test_claim_without_a_model_version_is_permanent(db) -> None:  # type: ignore[no-untyped-def]
    settings, factory = db
    job_id = _job(factory, 2, with_model=False)
    with pytest.raises(PermanentChunkError, match="no model version"):
        ChunkLedger(settings, job_id, 0).claim()

