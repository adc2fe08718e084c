"""Classify jobs end to end through a real worker process, broker and database."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import ChunkStatus, JobKind, JobStatus
from scheduler.settings import Settings
from tests.worker.conftest import (
    StartWorker,
    TinyModel,
    make_settings,
    migrated_factory,
    register_tiny_model,
    wait_until,
    write_images,
)

N_GOOD = 38
N_BROKEN = 2
N_ITEMS = N_GOOD + N_BROKEN
CHUNK = 16  # -> chunks of 16, 16, 8


def _register_model(factory: sessionmaker[Session], model: TinyModel) -> int:
    with factory.begin() as session:
        version = register_tiny_model(session, model)
        return int(version.id)


def _create_classify_job(
    factory: sessionmaker[Session], model_version_id: int, paths: list[Path]
) -> tuple[int, int]:
    with factory.begin() as session:
        job = repository.create_job(
            session,
            kind=JobKind.CLASSIFY,
            params={"top_k": 3, "count": len(paths), "batch_size": 8},
            model_version_id=model_version_id,
        )
        job_id = int(job.id)
        repository.add_job_items(session, job_id, [str(p) for p in paths], chunk_size=CHUNK)
        n_chunks = len(repository.list_chunks(session, job_id))
    return job_id, n_chunks


def _job(factory: sessionmaker[Session], job_id: int) -> tuple[JobStatus, int, int, str | None]:
    with factory() as session:
        job = repository.get_job(session, job_id)
        return JobStatus(job.status), job.progress_done, job.progress_total, job.error


def _run_classify_job(
    settings: Settings,
    factory: sessionmaker[Session],
    start_worker: StartWorker,
    tiny_model: TinyModel,
    tmp_path: Path,
) -> None:
    paths = write_images(tmp_path / "images", N_GOOD, broken=N_BROKEN)
    assert len(paths) == N_ITEMS
    version_id = _register_model(factory, tiny_model)
    job_id, n_chunks = _create_classify_job(factory, version_id, paths)
    assert n_chunks == 3

    worker = start_worker(settings)
    dispatcher = Dispatcher(settings)
    try:
        # Returns on the first reply; the long timeout only matters on a loaded machine.
        assert dispatcher.workers_alive(timeout=10.0)
        dispatcher.classify_chunks(job_id, range(n_chunks))
        wait_until(
            lambda: _job(factory, job_id)[0].is_terminal,
            timeout=180,
            what=f"job {job_id} to finish; worker log:\n{worker.log()}",
        )
        status, done, total, error = _job(factory, job_id)
        assert status == JobStatus.SUCCEEDED, (error, worker.log())
        assert (done, total) == (N_ITEMS, N_ITEMS)

        with factory() as session:
            rows = repository.list_predictions(session, job_id, limit=1000)
            chunks = repository.list_chunks(session, job_id)
        # Every item exactly once (the unique key makes more impossible; count proves none
        # is missing), in item order, with the right path.
        assert [r.item_index for r in rows] == list(range(N_ITEMS))
        assert [r.path for r in rows] == [str(p) for p in paths]
        errors = [r for r in rows if r.error is not None]
        assert sorted(Path(r.path).name for r in errors) == ["broken_0.png", "broken_1.png"]
        for row in rows:
            if row.error is None:
                assert row.label in tiny_model.classes
                assert row.confidence is not None and 0.0 < row.confidence <= 1.0
                assert len(row.top_k) == 3
                assert row.file_sha256 is not None and len(row.file_sha256) == 64
            else:
                assert row.label is None
        assert all(ChunkStatus(c.status) == ChunkStatus.SUCCEEDED for c in chunks)
        assert all(c.attempts == 1 for c in chunks)

        # Redelivery: the same chunk task again (a broker redelivering it, a duplicate
        # dispatch) records nothing new and leaves the finished job alone.
        dispatcher.classify_chunks(job_id, [0, 2])
        wait_until(
            lambda: worker.log().count("skipped: chunk or job already finished") >= 2,
            timeout=120,
            what=f"the duplicate chunks to be processed; worker log:\n{worker.log()}",
        )
        with factory() as session:
            assert repository.count_predictions(session, job_id) == N_ITEMS
            assert [c.attempts for c in repository.list_chunks(session, job_id)] == [1, 1, 1]
        assert _job(factory, job_id)[:3] == (JobStatus.SUCCEEDED, N_ITEMS, N_ITEMS)
    finally:
        dispatcher.close()


@pytest.mark.services
@pytest.mark.slow
def test_classify_job_redis_postgres(
    tmp_path: Path,
    postgres_url: str,
    redis_broker: str,
    start_worker: StartWorker,
    tiny_model: TinyModel,
) -> None:
    settings = make_settings(tmp_path, database_url=postgres_url, broker_url=redis_broker)
    factory = migrated_factory(postgres_url)
    try:
        _run_classify_job(settings, factory, start_worker, tiny_model, tmp_path)
    finally:
        factory.kw["bind"].dispose()


@pytest.mark.slow
def test_classify_job_embedded_filesystem_sqlite(
    tmp_path: Path, sqlite_url: str, start_worker: StartWorker, tiny_model: TinyModel
) -> None:
    """The embedded deployment (``mriq worker`` with no services): filesystem broker + SQLite."""
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    try:
        _run_classify_job(settings, factory, start_worker, tiny_model, tmp_path)
        # Consumed task messages do not pile up in the queue folder.
        queue = Path(settings.data_dir) / "broker" / "queue"
        assert not [p for p in queue.iterdir() if p.name.endswith((".gpu.msg", ".cpu.msg"))]
    finally:
        factory.kw["bind"].dispose()


@pytest.mark.services
def test_cancelled_job_chunks_record_nothing(
    tmp_path: Path,
    postgres_url: str,
    redis_broker: str,
    start_worker: StartWorker,
    tiny_model: TinyModel,
) -> None:
    settings = make_settings(tmp_path, database_url=postgres_url, broker_url=redis_broker)
    factory = migrated_factory(postgres_url)
    paths = write_images(tmp_path / "images", 4)
    version_id = _register_model(factory, tiny_model)
    job_id, n_chunks = _create_classify_job(factory, version_id, paths)
    with factory.begin() as session:
        repository.request_cancel(session, job_id)
    worker = start_worker(settings)
    dispatcher = Dispatcher(settings)
    try:
        dispatcher.classify_chunks(job_id, range(n_chunks))
        wait_until(
            lambda: "skipped: chunk or job already finished" in worker.log(),
            timeout=120,
            what=f"the chunk to be skipped; worker log:\n{worker.log()}",
        )
        with factory() as session:
            assert repository.count_predictions(session, job_id) == 0
        assert _job(factory, job_id)[0] == JobStatus.CANCELLED
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()


@pytest.mark.slow
def test_classify_job_reports_temperature_scaled_confidences(
    tmp_path: Path, sqlite_url: str, start_worker: StartWorker, tiny_model: TinyModel
) -> None:
    """The confidences and top-k a classify job stores are softmax(logits / T)."""
    from dataclasses import replace

    import numpy as np

    from core.calibration import Calibration, softmax
    from core.checkpoint import load_checkpoint, save_checkpoint
    from core.inference import Predictor

    temperature = 0.3  # sharpens a lot, so raw and calibrated confidences differ clearly
    raw = load_checkpoint(tiny_model.path, expected_sha256=tiny_model.sha256)
    path = tmp_path / "calibrated.pt"
    sha = save_checkpoint(
        path,
        model=raw.model,
        meta=replace(raw.meta, calibration=Calibration(temperature=temperature, calibrated=True)),
    )
    model = TinyModel(path=path, sha256=sha, classes=tiny_model.classes)
    paths = write_images(tmp_path / "images", 6)
    logits = np.stack([z for _, z, _ in Predictor(raw).predict_logits(paths)])
    expected = softmax(logits, temperature)
    uncalibrated = softmax(logits)

    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    version_id = _register_model(factory, model)
    job_id, n_chunks = _create_classify_job(factory, version_id, paths)
    worker = start_worker(settings)
    dispatcher = Dispatcher(settings)
    try:
        dispatcher.classify_chunks(job_id, range(n_chunks))
        wait_until(
            lambda: _job(factory, job_id)[0].is_terminal,
            timeout=180,
            what=f"job {job_id} to finish; worker log:\n{worker.log()}",
        )
        assert _job(factory, job_id)[0] == JobStatus.SUCCEEDED, worker.log()
        with factory() as session:
            rows = repository.list_predictions(session, job_id, limit=100)
        assert len(rows) == len(paths)
        for row, want, before in zip(rows, expected, uncalibrated, strict=True):
            order = np.argsort(-want, kind="stable")[:3]
            assert row.label == model.classes[int(order[0])]  # the argmax is unchanged
            assert row.confidence == pytest.approx(float(want[order[0]]), abs=1e-5)
            assert row.confidence != pytest.approx(float(before.max()), abs=1e-3)
            assert [label for label, _ in row.top_k] == [model.classes[int(i)] for i in order]
            assert [p for _, p in row.top_k] == pytest.approx(
                [float(want[i]) for i in order], abs=1e-5
            )
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
