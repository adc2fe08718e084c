"""Disk full while a job writes its files (issue 13, part 6): the job fails with a reason
that names the file, and nothing half-written is left or registered.

Each test puts the files on its own small tmpfs (tests/faults/conftest.py: small_tmpfs);
the database stays on the shared server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import JobKind, JobStatus
from tests.faults.conftest import (
    RedisServer,
    TinyModel,
    Workers,
    assert_each_item_once,
    chunk_table,
    count_rows,
    create_classify_job,
    fault_settings,
    fill_disk,
    private_postgres,
    register_model,
    small_tmpfs,
    wait_job_done,
    wait_until,
    write_small_images,
)
from tests.worker.conftest import migrated_factory

pytestmark = [pytest.mark.faults, pytest.mark.services]

FOLDERS = ("Astrocitoma T1", "Carcinoma T1")


def test_disk_full_during_training_fails_the_job_naming_the_file(
    tmp_path: Path, postgres_url: str, own_redis: RedisServer, workers: Workers
) -> None:
    """A resnet18 checkpoint is ~45 MB: 100 MB hold last.pt of epoch 0 and best.pt of
    epoch 1, not epoch 1's last.pt as well."""
    from core.synth import synthesize

    data = tmp_path / "synth"
    synthesize(data, per_folder=6, seed=1, image_size_range=(40, 48), folders=list(FOLDERS))
    with small_tmpfs("100m") as disk:
        settings = fault_settings(
            tmp_path, database_url=postgres_url, broker_url=own_redis.url, data_dir=disk
        )
        factory = migrated_factory(postgres_url)
        params = {
            "data": str(data),
            "arch": "resnet18",
            "epochs": 2,
            "image_size": 32,
            "batch_size": 8,
            "labels": "15",
            "weights": "none",
            "device": "cpu",
            "warm_start": False,
        }
        with factory.begin() as session:
            job_id = int(repository.create_job(session, kind=JobKind.TRAIN, params=params).id)
        dispatcher = Dispatcher(settings)
        worker = workers.start(settings)
        dispatcher.train(job_id)
        try:
            status = wait_job_done(factory, job_id, worker.log, timeout=300)
            assert status == JobStatus.FAILED, worker.log()
            out = disk / "jobs" / str(job_id)
            with factory() as session:
                job = repository.get_job(session, job_id)
                error = str(job.error)
                assert repository.list_artifacts(session, job_id) == []
                versions = [
                    v
                    for v in repository.list_model_versions(session)
                    if v.training_job_id == job_id
                ]
            assert "No space left on device" in error, error
            assert str(out / "last.pt") in error, error
            assert versions == [], "a failed training registers no model"
            leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
            assert leftovers == [], "half-written temporaries fill the disk for good"
            # What is left is whole: the previous epoch's checkpoint still verifies.
            from core.checkpoint import load_checkpoint, read_sidecar

            for name in ("last.prev.pt", "best.pt"):
                load_checkpoint(out / name, expected_sha256=read_sidecar(out / name))
        finally:
            dispatcher.close()
            factory.kw["bind"].dispose()
            for w in workers.started:
                w.stop()


def test_disk_full_during_csv_export_names_the_file_and_leaves_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    from typer.testing import CliRunner

    from scheduler import cli
    from scheduler.database import make_engine, make_session_factory, upgrade

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    n = 2000  # ~200 bytes a row: ~400 kB of CSV for a 64 kB disk
    try:
        with make_session_factory(engine).begin() as session:
            job_id = int(repository.create_job(session, kind=JobKind.CLASSIFY, params={}).id)
            paths = [f"{tmp_path}/images/{'long-name-' * 8}{i:05d}.png" for i in range(n)]
            repository.add_job_items(session, job_id, paths, chunk_size=500)
            repository.record_predictions(
                session,
                job_id,
                [
                    repository.PredictionRecord(
                        item_index=i,
                        path=path,
                        file_sha256="a" * 64,
                        label="Normal",
                        confidence=0.5,
                        top_k=(("Normal", 0.5),),
                        error=None,
                    )
                    for i, path in enumerate(paths)
                ],
            )
    finally:
        engine.dispose()
    env = {"MRIQ_DATA_DIR": str(tmp_path / "state"), "MRIQ_DATABASE_URL": sqlite_url}
    with small_tmpfs("64k") as disk:
        out = disk / "preds.csv"
        result = CliRunner().invoke(cli.app, ["results", str(job_id), "--out", str(out)], env=env)
        assert result.exit_code == 1, result.output
        assert f"{out}: cannot write the export (No space left on device)" in result.stderr
        assert list(disk.iterdir()) == [], "no half-written export, under any name"


@pytest.mark.slow
def test_disk_full_while_writing_evaluation_artifacts(
    tmp_path: Path, sqlite_url: str, tiny_model: TinyModel
) -> None:
    """The report and the confusion matrix go through a temporary that a full disk leaves
    behind no more than the file itself; the job fails naming the file, nothing is
    registered. (The task runs in this process through Celery's ``apply``.)"""
    from core.synth import synthesize
    from scheduler.dispatch import EVALUATE_TASK
    from worker.app import create_celery_app

    data = tmp_path / "synth"
    synthesize(data, per_folder=4, seed=1, image_size_range=(40, 48), folders=list(FOLDERS))
    factory = migrated_factory(sqlite_url)
    version_id = register_model(factory, tiny_model)
    with factory.begin() as session:
        job_id = int(
            repository.create_job(
                session,
                kind=JobKind.EVALUATE,
                params={"data": str(data)},
                model_version_id=version_id,
            ).id
        )
    with small_tmpfs("1m") as disk:
        settings = fault_settings(
            tmp_path, database_url=sqlite_url, broker_url="memory://", data_dir=disk
        )
        out = disk / "jobs" / str(job_id)
        out.mkdir(parents=True)
        fill_disk(disk, leave=8192)  # room for the report (a few kB), not for the plot as well
        create_celery_app(settings).tasks[EVALUATE_TASK].apply(args=[job_id])
        with factory() as session:
            job = repository.get_job(session, job_id)
            assert JobStatus(job.status) == JobStatus.FAILED, job.error
            error = str(job.error)
            assert repository.list_artifacts(session, job_id) == []
            with pytest.raises(repository.NotFoundError):
                repository.get_evaluation(session, job_id)
        assert "No space left on device" in error and str(out) in error, error
        left = sorted(p.name for p in out.iterdir())
        assert [n for n in left if "partial" in n or n.endswith(".tmp")] == [], left
        for name in left:
            if name.endswith((".json", ".png")):
                assert (out / name).stat().st_size > 0, f"{name} is half-written"
    factory.kw["bind"].dispose()


def test_database_disk_full_pauses_the_classify_job(
    tmp_path: Path, own_redis: RedisServer, workers: Workers, tiny_model: TinyModel
) -> None:
    """The database's own disk fills up while predictions are recorded: the worker retries
    with the reason in its log (paused, not failed: no error rows, no failed chunk), and
    once space is freed the job completes with every row exactly once. No retries to spare
    (task_max_retries=0): waiting for the database's disk is not a failure of the chunk."""
    n, chunk = 200, 50
    with small_tmpfs("128m") as disk, private_postgres(disk) as pg:
        settings = fault_settings(
            tmp_path, database_url=pg.url, broker_url=own_redis.url, task_max_retries=0
        )
        factory = migrated_factory(pg.url)
        paths = write_small_images(tmp_path / "images", n)
        job_id, n_chunks = create_classify_job(
            factory, register_model(factory, tiny_model), paths, chunk_size=chunk, batch_size=4
        )
        dispatcher = Dispatcher(settings)
        worker = workers.start(settings)
        dispatcher.classify_chunks(job_id, range(n_chunks))
        try:
            wait_until(
                lambda: 0 < count_rows(factory, job_id) < n // 2,
                timeout=120,
                interval=0.02,
                what=f"the job to be under way:\n{worker.log()}",
            )
            fill_disk(disk, leave=0)
            wait_until(
                lambda: "No space left on device" in worker.log(),
                timeout=120,
                interval=0.5,
                what=f"the worker to hit the full disk:\n{worker.log()}",
            )
            (disk / "filler").unlink()
            if not pg.is_up():  # PostgreSQL may stop itself when it cannot write its WAL
                pg.start()
            factory.kw["bind"].dispose()
            status = wait_job_done(factory, job_id, worker.log, timeout=300)
            assert status == JobStatus.SUCCEEDED, f"{chunk_table(factory, job_id)}\n{worker.log()}"
            assert_each_item_once(factory, job_id, n)
            with factory() as session:
                errors = [r for r in repository.iter_predictions(session, job_id) if r.error]
            assert errors == [], "a full disk must never become error rows"
        finally:
            dispatcher.close()
            factory.kw["bind"].dispose()
            for w in workers.started:
                w.stop()
