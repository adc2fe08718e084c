"""A train job ``with_reviews`` / ``reviews_from``: it trains on its data plus the reviewed
items and its model version records which reviews (real core code, real SQLite, the task
run in-process through Celery's ``apply`` as in test_train_evaluate)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository, review
from scheduler.dispatch import TRAIN_TASK
from scheduler.schema import JobKind, JobStatus
from tests.worker.conftest import make_settings, migrated_factory
from tests.worker.test_train_evaluate import FOLDERS, _job, _with_root, dataset  # noqa: F401
from worker.app import create_celery_app
from worker.appsettings import job_dir
from worker.tasks.train import REVIEWS_DATA_DIR

TRAIN_PARAMS = {
    "arch": "resnet18", "epochs": 1, "image_size": 32, "batch_size": 8, "labels": "15",
    "weights": "none", "seed": 0, "device": "cpu",
}


def _reviewed_job(
    factory: sessionmaker[Session], images: list[Path], labels: list[str | None]
) -> tuple[int, list[int]]:
    """A classify job whose predictions of ``images`` are all "Astrocitoma"; each is
    corrected to its label (None: accepted). Returns the job and the review ids."""
    from core.labels import classes_for

    with factory.begin() as session:
        version = repository.register_model_version(
            session, training_job_id=None, arch="resnet18", label_mode="15",
            classes=list(classes_for("15")), checkpoint_path="/m.pt",
            checkpoint_sha256="ab" * 32, metrics={},
        )
        job = repository.create_job(
            session, kind=JobKind.CLASSIFY, params={}, model_version_id=version.id
        )
        repository.add_job_items(session, job.id, [str(p) for p in images], chunk_size=10)
        repository.record_predictions(session, job.id, [
            repository.PredictionRecord(
                item_index=i, path=str(p), file_sha256=None, label="Astrocitoma",
                confidence=0.4, top_k=(("Astrocitoma", 0.4),),
            )
            for i, p in enumerate(images)
        ])
        rows = repository.list_predictions(session, job.id)
        ids = [
            review.decide(
                session, row.id, status="accepted" if label is None else "corrected",
                label=label, reviewer="tester",
            ).id
            for row, label in zip(rows, labels, strict=True)
        ]
        return int(job.id), ids


@pytest.mark.slow
def test_train_with_reviews_trains_on_them_and_records_the_lineage(
    tmp_path: Path, sqlite_url: str, dataset: Path  # noqa: F811
) -> None:
    settings = _with_root(
        make_settings(tmp_path, database_url=sqlite_url, broker_url=None), dataset
    )
    factory = migrated_factory(sqlite_url)
    try:
        incoming = tmp_path / "incoming" / "Carcinoma T1"
        incoming.mkdir(parents=True)
        sources = sorted((dataset / "Carcinoma T1").iterdir())[:3]
        images = [Path(shutil.copy(p, incoming / f"new_{i}{p.suffix}"))
                  for i, p in enumerate(sources)]
        first_job, first_ids = _reviewed_job(factory, images[:2], ["Ependimoma", None])
        second_job, second_ids = _reviewed_job(factory, images[2:], ["Ependimoma"])

        # One training (they take the time): reviews_from picks job 1's reviews out of all
        # three; with_reviews (every review) runs in tests/e2e/test_review_loop.py.
        with factory.begin() as session:
            job_id = int(repository.create_job(
                session, kind=JobKind.TRAIN,
                params={"data": str(dataset), **TRAIN_PARAMS, "reviews_from": first_job},
            ).id)
        result = create_celery_app(settings).tasks[TRAIN_TASK].apply(args=[job_id])
        status, _, _, error = _job(factory, job_id)
        assert status == JobStatus.SUCCEEDED, (error, result.result)
        with factory() as session:
            version = next(v for v in repository.list_model_versions(session)
                           if v.training_job_id == job_id)
            assert (version.reviews_used, version.review_ids) == (2, sorted(first_ids))
            assert set(second_ids).isdisjoint(version.review_ids)
            assert repository.get_evaluation(session, job_id).model_version_id == version.id
        # Trained on the data set plus job 1's reviews, linked into class folders by label.
        folder = job_dir(settings, job_id) / REVIEWS_DATA_DIR

        def linked(name: str) -> set[str]:
            return {os.path.realpath(p) for p in (folder / name).iterdir()}

        assert os.path.realpath(images[0]) in linked("Ependimoma T1")
        assert os.path.realpath(images[1]) in linked("Astrocitoma T1")
        assert os.path.realpath(images[2]) not in linked("Ependimoma T1")
        assert {os.path.realpath(p) for p in (dataset / "Carcinoma T1").iterdir()} <= linked(
            "Carcinoma T1"
        )
    finally:
        factory.kw["bind"].dispose()
