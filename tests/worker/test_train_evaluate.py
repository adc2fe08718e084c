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
from scheduler.settings import Settings
from tests.worker.conftest import TinyModel, make_settings, migrated_factory, register_tiny_model
from worker.app import create_celery_app
from worker.appsettings import job_dir

FOLDERS = ("Astrocitoma T1", "Carcinoma T1", "Ependimoma T1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, per_folder=10, seed=1, image_size_range=(40, 56), folders=list(FOLDERS))
    return root


def _with_root(settings: Settings, folder: Path) -> Settings:
    # The module's data set lives outside tmp_path; workers confine data to the roots.
    return settings.model_copy(update={"data_roots": (*settings.data_roots, folder)})


def _job(factory: sessionmaker[Session], job_id: int) -> tuple[JobStatus, int, int, str | None]:
    with factory() as session:
        job = repository.get_job(session, job_id)
        return JobStatus(job.status), job.progress_done, job.progress_total, job.error


PLOT_KINDS = {"reliability_diagram", "per_class_metrics", "roc_curves", "confident_mistakes"}


@pytest.mark.slow
def test_train_task_records_everything(
    tmp_path: Path, sqlite_url: str, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.training

    # The split has a handful of validation images; calibrate anyway (the task runs here).
    monkeypatch.setattr(core.training, "CALIBRATION_MIN_VAL", 1)
    settings = _with_root(make_settings(tmp_path, database_url=sqlite_url, broker_url=None),
                          dataset)
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
        assert {"checkpoint", "metrics", "confusion_matrix"} | PLOT_KINDS <= kinds
        evaluation = repository.get_evaluation(session, job_id)
        assert evaluation.model_version_id == version.id
        # The version records best.pt's temperature and its test report's ECE/NLL.
        from core.checkpoint import load_checkpoint

        calibration = load_checkpoint(out / "best.pt").meta.calibration
        assert calibration.calibrated and version.calibrated
        assert version.temperature == calibration.temperature != 1.0
        report = evaluation.report
        assert report["temperature"] == version.temperature and report["calibrated"]
        for key in ("ece", "ece_uncalibrated", "nll", "nll_uncalibrated"):
            assert getattr(version, key) == pytest.approx(report[key]), key
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
    settings = _with_root(make_settings(tmp_path, database_url=sqlite_url, broker_url=None),
                          dataset)
    factory = migrated_factory(sqlite_url)
    with factory.begin() as session:
        version = register_tiny_model(session, tiny_model)
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
    assert set(artifacts) >= PLOT_KINDS
    for kind in PLOT_KINDS:
        assert artifacts[kind].read_bytes()[:4] == b"\x89PNG", kind
    stored = json.loads(artifacts["report"].read_text())
    assert stored["n"] == n_images
    # An uncalibrated model: temperature 1.0, the same ECE before and after.
    assert stored["temperature"] == 1.0 and stored["calibrated"] is False
    assert stored["ece"] == stored["ece_uncalibrated"] is not None
    factory.kw["bind"].dispose()


def _evaluate_job(factory: sessionmaker[Session], model: TinyModel, data: Path) -> int:
    with factory.begin() as session:
        version = register_tiny_model(session, model)
        return int(repository.create_job(
            session, kind=JobKind.EVALUATE, params={"data": str(data)},
            model_version_id=version.id,
        ).id)


def test_evaluate_skips_a_class_folder_linked_outside_the_roots(
    tmp_path: Path, sqlite_url: str, tiny_model: TinyModel
) -> None:
    from core.synth import synthesize

    root, outside = tmp_path / "root", tmp_path / "outside"
    synthesize(root / "data", per_folder=3, seed=2, image_size_range=(40, 48),
               folders=list(FOLDERS[:2]))
    synthesize(outside, per_folder=4, seed=3, image_size_range=(40, 48),
               folders=[FOLDERS[2]])
    # A class folder that is a link to a folder outside the roots, and one stray file link.
    (root / "data" / FOLDERS[2]).symlink_to(outside / FOLDERS[2])
    stray = next((outside / FOLDERS[2]).iterdir())
    (root / "data" / FOLDERS[0] / "zz_stray.png").symlink_to(stray)
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    settings = settings.model_copy(update={"data_roots": (root,)})
    factory = migrated_factory(sqlite_url)
    job_id = _evaluate_job(factory, tiny_model, root / "data")
    result = create_celery_app(settings).tasks[EVALUATE_TASK].apply(args=[job_id])
    status, done, total, error = _job(factory, job_id)
    assert status == JobStatus.SUCCEEDED, (error, result.result)
    # Only the images really inside the roots were evaluated: not the 4 behind the linked
    # class folder, not the stray link.
    assert (done, total) == (6, 6)
    with factory() as session:
        report = repository.get_evaluation(session, job_id).report
    assert report["n"] == 6 and not report.get("errors")
    factory.kw["bind"].dispose()


def test_evaluate_with_wrong_checksum_fails_the_job(
    tmp_path: Path, sqlite_url: str, dataset: Path, tiny_model: TinyModel
) -> None:
    settings = _with_root(make_settings(tmp_path, database_url=sqlite_url, broker_url=None),
                          dataset)
    factory = migrated_factory(sqlite_url)
    with factory.begin() as session:
        version = register_tiny_model(session, tiny_model, checkpoint_sha256="0" * 64)
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

    settings = _with_root(make_settings(tmp_path, database_url=sqlite_url, broker_url=None),
                          dataset)
    factory = migrated_factory(sqlite_url)
    with factory.begin() as session:
        version = register_tiny_model(session, tiny_model)
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
        assert sorted(a.kind for a in repository.list_artifacts(session, job_id)) == sorted(
            {"confusion_matrix", "report", *PLOT_KINDS}
        )
    factory.kw["bind"].dispose()
