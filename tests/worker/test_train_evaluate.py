"""Train and evaluate tasks with real core code and a real SQLite database.

The tasks run in this process through Celery's ``apply`` (the same task code a worker runs,
without a broker round trip, which test_classify already covers); 32 px, 1 epoch, resnet18.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.dispatch import EVALUATE_TASK, TRAIN_TASK
from scheduler.schema import JobKind, JobStatus
from tests.worker.conftest import TinyModel, make_settings, migrated_factory
from worker.app import create_celery_app
from worker.tasks import job_dir

FOLDERS = ("Astrocitoma T1", "Carcinoma T1", "Ependimoma T1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, per_folder=10, seed=1, image_size_range=(40, 56), folders=list(FOLDERS))
    return root


def _job(factory: sessionmaker[Session], job_id: int) -> tuple[JobStatus, int, int, str | None]:
    with factory() as session:
        job = repository.get_job(session, job_id)
        return JobStatus(job.status), job.progress_done, job.progress_total, job.error


@pytest.mark.slow
def test_train_task_records_everything(tmp_path: Path, sqlite_url: str, dataset: Path) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    params = {
        "data": str(dataset),
        "arch": "resnet18",
        "epochs": 1,
        "image_size": 32,
        "batch_size": 8,
        "lr": 1e-3,
        "labels": "15",
        "finetune": False,
        "warm_start": False,
        "weights": "none",
        "seed": 0,
        "device": "cpu",
    }
    with factory.begin() as session:
        job_id = int(repository.create_job(session, kind=JobKind.TRAIN, params=params).id)
    app = create_celery_app(settings)
    result = app.tasks[TRAIN_TASK].apply(args=[job_id])
    status, done, total, error = _job(factory, job_id)
    assert status == JobStatus.SUCCEEDED, (error, result.result)
    assert (done, total) == (1, 1)
    out = job_dir(settings, job_id)
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    with factory() as session:
        metrics = repository.list_epoch_metrics(session, job_id)
        assert [m.epoch for m in metrics] == [1]
        versions = [
            v for v in repository.list_model_versions(session) if v.training_job_id == job_id
        ]
        assert len(versions) == 1
        version = versions[0]
        assert version.arch == "resnet18" and version.stage == "candidate"
        assert version.checkpoint_path == str((out / "best.pt").resolve())
        from core.checkpoint import file_sha256

        assert version.checkpoint_sha256 == file_sha256(out / "best.pt")
        kinds = {a.kind for a in repository.list_artifacts(session, job_id)}
        assert {"checkpoint", "metrics"} <= kinds
        evaluation = repository.get_evaluation(session, job_id)
        assert evaluation.model_version_id == version.id
    # Redelivery of a finished training (a worker crashed after finish_job but before the
    # ack) changes nothing.
    again = app.tasks[TRAIN_TASK].apply(args=[job_id])
    assert str(again.result).startswith("skipped")
    with factory() as session:
        assert len(repository.list_model_versions(session)) == 1
    factory.kw["bind"].dispose()


@pytest.mark.slow
def test_evaluate_task(
    tmp_path: Path, sqlite_url: str, dataset: Path, tiny_model: TinyModel
) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    with factory.begin() as session:
        version = repository.register_model_version(
            session,
            training_job_id=None,
            arch="resnet18",
            label_mode="15",
            classes=list(tiny_model.classes),
            checkpoint_path=str(tiny_model.path),
            checkpoint_sha256=tiny_model.sha256,
            metrics={},
        )
        job_id = int(
            repository.create_job(
                session,
                kind=JobKind.EVALUATE,
                params={"data": str(dataset)},
                model_version_id=version.id,
            ).id
        )
        version_id = int(version.id)
    app = create_celery_app(settings)
    result = app.tasks[EVALUATE_TASK].apply(args=[job_id])
    status, done, total, error = _job(factory, job_id)
    assert status == JobStatus.SUCCEEDED, (error, result.result)
    n_images = 10 * len(FOLDERS)
    assert (done, total) == (n_images, n_images)
    with factory() as session:
        evaluation = repository.get_evaluation(session, job_id)
        assert evaluation.model_version_id == version_id
        assert evaluation.report["n"] == n_images
        artifacts = {a.kind: Path(a.path) for a in repository.list_artifacts(session, job_id)}
    assert artifacts["confusion_matrix"].is_file()
    assert json.loads(artifacts["report"].read_text())["n"] == n_images
    factory.kw["bind"].dispose()


def test_evaluate_with_wrong_checksum_fails_the_job(
    tmp_path: Path, sqlite_url: str, dataset: Path, tiny_model: TinyModel
) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    with factory.begin() as session:
        version = repository.register_model_version(
            session,
            training_job_id=None,
            arch="resnet18",
            label_mode="15",
            classes=list(tiny_model.classes),
            checkpoint_path=str(tiny_model.path),
            checkpoint_sha256="0" * 64,
            metrics={},
        )
        job_id = int(
            repository.create_job(
                session,
                kind=JobKind.EVALUATE,
                params={"data": str(dataset)},
                model_version_id=version.id,
            ).id
        )
    app = create_celery_app(settings)
    app.tasks[EVALUATE_TASK].apply(args=[job_id])
    status, _, _, error = _job(factory, job_id)
    assert status == JobStatus.FAILED
    assert error is not None and "sha256" in error
    factory.kw["bind"].dispose()


def test_retrain_submits_one_job_at_a_time(tmp_path: Path, sqlite_url: str, dataset: Path) -> None:
    from scheduler.dispatch import RETRAIN_TASK

    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    settings = settings.model_copy(
        update={"retrain_data_dir": dataset, "data_roots": (tmp_path, dataset)}
    )
    factory = migrated_factory(sqlite_url)
    app = create_celery_app(settings)
    first = app.tasks[RETRAIN_TASK].apply().result
    assert str(first).startswith("submitted train job"), first
    # The previous retraining is still queued: no second job piles up behind it.
    assert str(app.tasks[RETRAIN_TASK].apply().result).startswith("skipped")
    with factory() as session:
        (job,) = repository.list_jobs(session, kind=JobKind.TRAIN)
        assert job.params["data"] == str(dataset)
        assert job.params["warm_start"] is False  # no production model yet
    queue = Path(settings.data_dir) / "broker" / "queue"
    assert len([p for p in queue.iterdir() if p.name.endswith(".gpu.msg")]) == 1
    factory.kw["bind"].dispose()


@pytest.mark.slow
def test_evaluate_skips_while_another_run_of_the_job_is_alive(
    tmp_path: Path, sqlite_url: str, dataset: Path, tiny_model: TinyModel
) -> None:
    """A re-sent evaluate (recovery saw a stale heartbeat, or Celery requeued it after a pool
    child died) while another run of the job is still alive must not run beside it: both
    would write the same report files, and the loser's failure (its temporary file renamed
    away) could mark the job failed. The live run holds the job's lock file (here: this
    test); the second run skips, and once the lock is free a run records one report."""
    import fcntl

    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    with factory.begin() as session:
        version = repository.register_model_version(
            session,
            training_job_id=None,
            arch="resnet18",
            label_mode="15",
            classes=list(tiny_model.classes),
            checkpoint_path=str(tiny_model.path),
            checkpoint_sha256=tiny_model.sha256,
            metrics={},
        )
        job_id = int(
            repository.create_job(
                session,
                kind=JobKind.EVALUATE,
                params={"data": str(dataset)},
                model_version_id=version.id,
            ).id
        )
    app = create_celery_app(settings)
    folder = job_dir(settings, job_id)
    folder.mkdir(parents=True)
    with (folder / ".worker.lock").open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = app.tasks[EVALUATE_TASK].apply(args=[job_id]).result
        assert str(result).startswith("skipped: another worker"), result
        assert _job(factory, job_id)[0] == JobStatus.RUNNING
        with factory() as session:
            assert repository.list_artifacts(session, job_id) == []
            with pytest.raises(repository.NotFoundError):
                repository.get_evaluation(session, job_id)
    result = app.tasks[EVALUATE_TASK].apply(args=[job_id]).result
    assert _job(factory, job_id)[0] == JobStatus.SUCCEEDED, result
    with factory() as session:
        assert repository.get_evaluation(session, job_id).report["n"] == 10 * len(FOLDERS)
        assert sorted(a.kind for a in repository.list_artifacts(session, job_id)) == [
            "confusion_matrix",
            "report",
        ]
    factory.kw["bind"].dispose()
