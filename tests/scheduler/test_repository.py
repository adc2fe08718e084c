"""Repository behaviour on real SQLite and PostgreSQL databases (``db_url`` runs both)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository as repo
from scheduler.repository import NoRollbackTargetError, NotFoundError, PredictionRecord
from scheduler.schema import ChunkStatus, JobKind, JobStatus, ModelStage


def _paths(n: int) -> Iterator[str]:
    # A generator, as submission passes one: add_job_items must not need a list.
    return (f"/data/img_{i:05d}.png" for i in range(n))


def _record(i: int, *, error: str | None = None) -> PredictionRecord:
    if error is not None:
        return PredictionRecord(i, f"/data/img_{i:05d}.png", None, None, None, (), error)
    return PredictionRecord(
        item_index=i,
        path=f"/data/img_{i:05d}.png",
        file_sha256="ab" * 32,
        label="glioma",
        confidence=0.75,
        top_k=(("glioma", 0.75), ("normal", 0.2), ("meningioma", 0.05)),
        error=None,
    )


def _classify_job(session: Session, n: int, chunk_size: int) -> int:
    with session.begin():
        job = repo.create_job(session, kind=JobKind.CLASSIFY, params={"model": "prod"})
        assert repo.add_job_items(session, job.id, _paths(n), chunk_size=chunk_size) == n
        return job.id


# --------------------------------------------------------------------------- jobs


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


# --------------------------------------------------------------------------- items and chunks


def test_add_job_items_makes_chunks_with_correct_ranges(session: Session) -> None:
    job_id = _classify_job(session, 10_000, 256)
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
        assert repo.add_job_items(session, other, _paths(5), chunk_size=256) == 5
        assert [(c.start_index, c.stop_index) for c in repo.list_chunks(session, other)] == [(0, 5)]
    with pytest.raises(ValueError, match="already has items"), session.begin():
        repo.add_job_items(session, other, _paths(5), chunk_size=256)
    with pytest.raises(ValueError, match="chunk_size"), session.begin():
        repo.add_job_items(session, other, _paths(5), chunk_size=0)


def test_claim_chunk_returns_only_unrecorded_items(session: Session) -> None:
    job_id = _classify_job(session, 10, 4)  # chunks [0,4) [4,8) [8,10)
    with session.begin():
        items = repo.claim_chunk(session, job_id, 1)
        assert items == [(i, f"/data/img_{i:05d}.png") for i in range(4, 8)]
        assert repo.get_job(session, job_id).status is JobStatus.RUNNING
        assert repo.record_predictions(session, job_id, [_record(4), _record(6)]) == 2
    with session.begin():
        # Redelivery after a crash: only what is missing is handed out again.
        items = repo.claim_chunk(session, job_id, 1)
        assert items == [(5, "/data/img_00005.png"), (7, "/data/img_00007.png")]
        assert repo.get_chunk(session, job_id, 1).attempts == 2
        assert repo.get_chunk(session, job_id, 1).status is ChunkStatus.RUNNING
        repo.record_predictions(session, job_id, [_record(5), _record(7)])
        assert repo.complete_chunk(session, job_id, 1) is None  # other chunks still pending
    with session.begin():
        assert repo.claim_chunk(session, job_id, 1) is None  # finished chunk
        assert repo.get_chunk(session, job_id, 1).attempts == 2
    with pytest.raises(NotFoundError, match=f"chunk {job_id}/99 not found"), session.begin():
        repo.claim_chunk(session, job_id, 99)


def test_record_predictions_is_idempotent(session: Session) -> None:
    job_id = _classify_job(session, 2500, 256)
    batch = [_record(i) for i in range(2500)]
    with session.begin():
        assert repo.record_predictions(session, job_id, batch) == 2500
    with session.begin():
        assert repo.record_predictions(session, job_id, batch) == 0
        # Overlapping batch: only the new rows count.
        assert repo.record_predictions(session, job_id, [_record(1)]) == 0
        assert repo.record_predictions(session, job_id, []) == 0
    assert repo.count_predictions(session, job_id) == 2500
    rows = repo.list_predictions(session, job_id, offset=10, limit=3)
    assert [r.item_index for r in rows] == [10, 11, 12]
    assert rows[0].top_k == [["glioma", 0.75], ["normal", 0.2], ["meningioma", 0.05]]
    assert rows[0].label == "glioma" and rows[0].confidence == pytest.approx(0.75)
    assert rows[0].file_sha256 == "ab" * 32 and rows[0].error is None
    streamed = list(repo.iter_predictions(session, job_id, batch=700))
    assert [r.item_index for r in streamed] == list(range(2500))


def test_complete_chunks_job_succeeds_with_per_file_errors(session: Session) -> None:
    job_id = _classify_job(session, 6, 3)
    for chunk in (0, 1):
        with session.begin():
            items = repo.claim_chunk(session, job_id, chunk)
            assert items is not None
            records = [_record(i) for i, _ in items]
            records[0] = _record(items[0][0], error="/data/x.png: empty file")
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
    job_id = _classify_job(session, 6, 3)
    with session.begin():
        repo.claim_chunk(session, job_id, 0)
        repo.record_predictions(session, job_id, [_record(i) for i in range(3)])
        assert repo.complete_chunk(session, job_id, 0) is None
    with session.begin():
        repo.claim_chunk(session, job_id, 1)
        repo.record_predictions(session, job_id, [_record(3)])
        final = repo.fail_chunk(session, job_id, 1, "worker lost 3 times")
    assert final is JobStatus.PARTIAL
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.PARTIAL and "1 of 2 chunks failed" in (job.error or "")
    assert job.progress_done == 6
    rows = repo.list_predictions(session, job_id)
    assert [r.error for r in rows[3:]] == [None, "worker lost 3 times", "worker lost 3 times"]
    assert repo.get_chunk(session, job_id, 1).status is ChunkStatus.FAILED


def test_all_chunks_failed_makes_job_failed(session: Session) -> None:
    job_id = _classify_job(session, 4, 2)
    with session.begin():
        assert repo.fail_chunk(session, job_id, 0, "boom") is None
    with session.begin():
        assert repo.fail_chunk(session, job_id, 1, "boom") is JobStatus.FAILED
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.FAILED
    assert job.error == "2 of 2 chunks failed; first error: boom"
    assert repo.count_prediction_errors(session, job_id) == 4


def test_request_cancel_of_queued_job_is_immediate(session: Session) -> None:
    job_id = _classify_job(session, 4, 2)
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
    job_id = _classify_job(session, 9, 3)
    with session.begin():
        repo.claim_chunk(session, job_id, 0)
        repo.record_predictions(session, job_id, [_record(0)])
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
    job_id = _classify_job(session, 4, 2)
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


def test_concurrent_last_chunks_finalise_the_job_once(
    session_factory: sessionmaker[Session],
) -> None:
    """Two workers record their last batch and complete their chunk in one transaction each,
    at the same moment: no deadlock (FK KEY SHARE vs the job lock), and exactly one of them
    finalises the job."""
    with session_factory() as s:
        job_id = _classify_job(s, 4, 1)
    for chunk in range(4):
        with session_factory() as s, s.begin():
            repo.claim_chunk(s, job_id, chunk)
    with session_factory() as s, s.begin():
        repo.record_predictions(s, job_id, [_record(0), _record(1)])
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
                    repo.record_predictions(s, job_id, [_record(chunk)])
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
    job_id = _classify_job(session, 4, 2)
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


# --------------------------------------------------------------------------- metrics, reports


def test_epoch_metrics_upsert(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
    metrics = dict(val_loss=0.9, val_accuracy=0.5, val_macro_f1=0.4, lr=1e-3, seconds=12.5)
    with session.begin():
        repo.record_epoch_metric(session, job_id, epoch=1, train_loss=1.5, **metrics)
        repo.record_epoch_metric(session, job_id, epoch=2, train_loss=1.2, **metrics)
    with session.begin():
        # A resumed run reports epoch 2 again: overwritten, not duplicated.
        repo.record_epoch_metric(session, job_id, epoch=2, train_loss=1.1, **metrics)
        repo.record_epoch_metric(
            session,
            job_id,
            epoch=3,
            train_loss=float("nan"),
            val_loss=None,
            val_accuracy=None,
            val_macro_f1=None,
            lr=None,
            seconds=None,
        )
    rows = repo.list_epoch_metrics(session, job_id)
    assert [(r.epoch, r.train_loss) for r in rows[:2]] == [(1, 1.5), (2, 1.1)]
    assert rows[1].val_accuracy == 0.5 and rows[1].seconds == 12.5
    assert rows[2].epoch == 3 and rows[2].val_loss is None


def test_evaluation_is_idempotent_per_job(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.EVALUATE, params={}).id
        first = repo.record_evaluation(
            session,
            job_id=job_id,
            model_version_id=None,
            dataset="/data/test",
            report={"n": 10, "accuracy": 0.8, "macro_f1": 0.7, "classes": ["a", "b"]},
        )
    with session.begin():
        second = repo.record_evaluation(
            session,
            job_id=job_id,
            model_version_id=None,
            dataset="/data/test",
            report={"n": 10, "accuracy": 0.9, "macro_f1": 0.85},
        )
    assert first.id == second.id
    loaded = repo.get_evaluation(session, job_id)
    assert (loaded.accuracy, loaded.macro_f1, loaded.report["n"]) == (0.9, 0.85, 10)


# --------------------------------------------------------------------------- model versions


def _register(session: Session, training_job_id: int | None, sha: str = "0" * 64) -> int:
    return repo.register_model_version(
        session,
        training_job_id=training_job_id,
        arch="efficientnet_b0",
        label_mode="15",
        classes=["a", "b"],
        checkpoint_path=f"/models/{training_job_id}/best.pt",
        checkpoint_sha256=sha,
        metrics={"macro_f1": 0.5},
    ).id


def test_register_model_version_is_idempotent_per_training_job(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        first = _register(session, job_id)
    with session.begin():
        assert _register(session, job_id, sha="1" * 64) == first
    version = repo.get_model_version(session, first)
    assert version.stage is ModelStage.CANDIDATE and version.checkpoint_sha256 == "1" * 64
    assert version.classes == ["a", "b"] and version.created_at.tzinfo is not None
    assert [v.id for v in repo.list_model_versions(session)] == [first]


def test_promote_keeps_exactly_one_production_and_rollback_restores(session: Session) -> None:
    with session.begin():
        jobs = [repo.create_job(session, kind=JobKind.TRAIN, params={}).id for _ in range(3)]
        a, b, c = (_register(session, j) for j in jobs)
    assert repo.get_production_model(session) is None
    session.rollback()

    def production() -> int | None:
        with session.begin():
            current = repo.get_production_model(session)
            return None if current is None else current.id

    def stages() -> dict[int, ModelStage]:
        with session.begin():
            return {v.id: v.stage for v in repo.list_model_versions(session)}

    with session.begin():
        repo.promote_model_version(session, a)
    with session.begin():
        repo.promote_model_version(session, a)  # again: no-op
    assert production() == a
    with session.begin():
        promoted = repo.promote_model_version(session, b)
        assert promoted.stage is ModelStage.PRODUCTION and promoted.promoted_at is not None
    assert production() == b
    assert stages() == {a: ModelStage.ARCHIVED, b: ModelStage.PRODUCTION, c: ModelStage.CANDIDATE}
    with session.begin():
        repo.promote_model_version(session, c)
    with session.begin():
        assert repo.rollback_production(session).id == b
    assert stages() == {a: ModelStage.ARCHIVED, b: ModelStage.PRODUCTION, c: ModelStage.ARCHIVED}
    with session.begin():
        assert repo.rollback_production(session).id == c  # most recently archived former prod
    assert list(stages().values()).count(ModelStage.PRODUCTION) == 1


def test_rollback_without_target_changes_nothing(session: Session) -> None:
    with pytest.raises(NoRollbackTargetError, match="no production model"), session.begin():
        repo.rollback_production(session)
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        version = _register(session, job_id)
        repo.promote_model_version(session, version)
    with pytest.raises(NoRollbackTargetError, match="only model"), session.begin():
        repo.rollback_production(session)
    production = repo.get_production_model(session)
    assert production is not None and production.id == version


def test_database_refuses_two_production_models(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        a, b = _register(session, job_id), _register(session, None)
        repo.promote_model_version(session, a)
    with pytest.raises(IntegrityError), session.begin():
        repo.get_model_version(session, b).stage = ModelStage.PRODUCTION


# --------------------------------------------------------------------------- artifacts


def test_artifacts_are_idempotent_per_job_and_path(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        first = repo.record_artifact(
            session, job_id=job_id, kind="confusion_matrix", path="/jobs/1/cm.png"
        )
        repo.record_artifact(session, job_id=job_id, kind="csv", path="/jobs/1/p.csv")
    with session.begin():
        again = repo.record_artifact(
            session, job_id=job_id, kind="confusion_matrix", path="/jobs/1/cm.png"
        )
    assert again.id == first.id
    assert [a.kind for a in repo.list_artifacts(session, job_id)] == ["confusion_matrix", "csv"]
    assert repo.get_artifact(session, first.id).path == "/jobs/1/cm.png"
