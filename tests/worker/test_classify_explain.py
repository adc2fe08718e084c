"""A classify chunk with ``explain``: entropy stored, Grad-CAM of the selected predictions
recorded (files, ``predictions.explanation``, artifact rows), idempotent on a retry, never
failing the chunk. The chunk body runs in-process on a real database (SQLite and
PostgreSQL); the worker process around it is covered by tests/e2e/test_review_loop.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import Artifact, ChunkStatus, Job, JobKind, JobStatus, PredictionRow
from scheduler.settings import Settings
from tests.worker.conftest import (
    TinyModel,
    make_settings,
    migrated_factory,
    register_tiny_model,
    write_images,
)
from worker import liveness, runtime
from worker.appsettings import job_dir
from worker.ledger import ChunkLedger, ChunkWork
from worker.tasks import classify
from worker.tasks.common import CancelCheck

N_GOOD = 6


def _job(
    factory: sessionmaker[Session],
    model: TinyModel,
    paths: list[Path],
    *,
    explain: str,
    review_below: float,
) -> int:
    with factory.begin() as session:
        version = register_tiny_model(session, model)
        job = repository.create_job(
            session,
            kind=JobKind.CLASSIFY,
            params={"top_k": 3, "batch_size": 4, "explain": explain},
            model_version_id=version.id,
        )
        job.review_below = review_below
        repository.add_job_items(session, job.id, [str(p) for p in paths], chunk_size=100)
        return int(job.id)


def _confidence_split(model: TinyModel, paths: list[Path]) -> float:
    """A review_below with some predictions on each side, away from any confidence."""
    from core.checkpoint import load_checkpoint
    from core.inference import Predictor

    predictor = Predictor(load_checkpoint(model.path, expected_sha256=model.sha256))
    confs = sorted(p.confidence for p in predictor.predict(paths) if p.confidence is not None)
    mid = len(confs) // 2
    return (confs[mid - 1] + confs[mid]) / 2


def _rows(factory: sessionmaker[Session], job_id: int) -> list[PredictionRow]:
    with factory() as session:
        return repository.list_predictions(session, job_id)


def _explanation_artifacts(factory: sessionmaker[Session], job_id: int) -> set[str]:
    with factory() as session:
        return set(
            session.scalars(
                select(Artifact.path).where(
                    Artifact.job_id == job_id, Artifact.kind == "explanation"
                )
            )
        )


def _run(settings: Settings, job_id: int) -> tuple[ChunkLedger, ChunkWork, str]:
    ledger = ChunkLedger(settings, job_id, 0)
    work = ledger.claim("test@host")
    assert work is not None
    return ledger, work, classify._run_chunk(ledger, work)


@pytest.mark.services
def test_uncertain_predictions_are_explained_and_a_retry_redoes_only_the_missing(
    tmp_path: Path, db_url: str, tiny_model: TinyModel
) -> None:
    from core.calibration import entropy

    settings = make_settings(tmp_path, database_url=db_url, broker_url=None)
    factory = migrated_factory(db_url)
    try:
        paths = write_images(tmp_path / "images", N_GOOD, broken=1)
        below = _confidence_split(tiny_model, [p for p in paths if "broken" not in p.name])
        job_id = _job(factory, tiny_model, paths, explain="uncertain", review_below=below)
        ledger, work, outcome = _run(settings, job_id)
        assert outcome.startswith("classified"), outcome

        rows = _rows(factory, job_id)
        assert len(rows) == len(paths)
        explained = {r.id: r.explanation for r in rows if r.explanation is not None}
        uncertain = {r.id for r in rows if r.error is None and r.confidence < below}
        assert 0 < len(uncertain) < N_GOOD
        assert set(explained) == uncertain
        folder = job_dir(settings, job_id) / "explanations"
        for item_id, path in explained.items():
            assert Path(path) == (folder / f"{item_id}.png").resolve()
            assert Path(path).is_file() and (folder / f"{item_id}.npy").is_file()
        assert _explanation_artifacts(factory, job_id) == set(explained.values())
        for row in rows:
            if row.error is None:
                # Over all 15 calibrated probabilities, so more than the top-3 alone carry
                # (an untrained model spreads its mass), and at most that of a uniform one.
                assert row.entropy is not None
                assert entropy([p for _, p in row.top_k]) * 0.5 < row.entropy <= np.log(15)
            else:
                assert row.entropy is None and row.explanation is None

        # A retry after a death between the predictions and an explanation: the claim
        # hands out no items, and only the missing explanation is made again.
        lost = min(explained)
        Path(explained[lost]).unlink()
        with factory.begin() as session:
            session.get(PredictionRow, lost).explanation = None  # type: ignore[union-attr]
        model = runtime.load_model(str(tiny_model.path), tiny_model.sha256)
        retry = replace(work, items=[])
        classify._explain_chunk(
            ledger, retry, model, liveness.Progress(), CancelCheck(settings, job_id)
        )
        again = {r.id: r.explanation for r in _rows(factory, job_id) if r.explanation}
        assert again == explained and Path(explained[lost]).is_file()
        assert _explanation_artifacts(factory, job_id) == set(explained.values())
        with factory() as session:
            job = session.get(Job, job_id)
            assert job is not None and JobStatus(job.status) == JobStatus.SUCCEEDED
            chunk = repository.get_chunk(session, job_id, 0)
            assert ChunkStatus(chunk.status) == ChunkStatus.SUCCEEDED
    finally:
        factory.kw["bind"].dispose()


def test_explain_all_skips_unexplainable_files_and_stops_on_cancel(
    tmp_path: Path, sqlite_url: str, tiny_model: TinyModel
) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    try:
        paths = write_images(tmp_path / "images", N_GOOD)
        job_id = _job(factory, tiny_model, paths, explain="none", review_below=0.6)
        ledger, work, outcome = _run(settings, job_id)
        assert outcome.startswith("classified"), outcome
        assert all(r.explanation is None for r in _rows(factory, job_id))

        # "all" on a retry: a file gone since it was classified is left unexplained (and
        # logged); the chunk's other predictions are explained; nothing raises.
        paths[0].unlink()
        model = runtime.load_model(str(tiny_model.path), tiny_model.sha256)
        every = replace(work, items=[], explain="all")
        cancel = CancelCheck(settings, job_id)
        classify._explain_chunk(ledger, every, model, liveness.Progress(), cancel)
        rows = _rows(factory, job_id)
        assert [r.explanation is not None for r in rows] == [False] + [True] * (N_GOOD - 1)

        # Cancellation is checked before (and between) batches: nothing more is explained.
        with factory.begin() as session:
            for row in session.scalars(select(PredictionRow).where(PredictionRow.job_id == job_id)):
                row.explanation = None
            session.get(Job, job_id).cancel_requested = True  # type: ignore[union-attr]
        cancel = CancelCheck(settings, job_id)
        classify._explain_chunk(ledger, every, model, liveness.Progress(), cancel)
        assert all(r.explanation is None for r in _rows(factory, job_id))
    finally:
        factory.kw["bind"].dispose()


def test_the_explain_task_explains_one_item_on_demand(
    tmp_path: Path, sqlite_url: str, tiny_model: TinyModel
) -> None:
    from scheduler.dispatch import EXPLAIN_TASK
    from worker.app import create_celery_app

    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    try:
        paths = write_images(tmp_path / "images", 2, broken=1)
        job_id = _job(factory, tiny_model, paths, explain="none", review_below=0.6)
        _run(settings, job_id)
        rows = _rows(factory, job_id)
        good = next(r for r in rows if r.error is None)
        bad = next(r for r in rows if r.error is not None)
        explain = create_celery_app(settings).tasks[EXPLAIN_TASK]

        # Run in this process (the registered body, as the worker would run it).
        assert explain(job_id, good.id).startswith("explained")
        expected = str((job_dir(settings, job_id) / "explanations" / f"{good.id}.png").resolve())
        assert explain(job_id, good.id).startswith("explained")  # again: the same one file
        after = {r.id: r.explanation for r in _rows(factory, job_id)}
        assert after == {r.id: expected if r.id == good.id else None for r in rows}
        assert Path(expected).is_file()
        assert _explanation_artifacts(factory, job_id) == {expected}

        # Re-checked by the task (scheduler.explanations.explanation_of): skipped, not run.
        assert explain(job_id, bad.id).startswith(f"skipped: item {bad.id} of job {job_id} "
                                                  "is an error row")
        with factory.begin() as session:
            other = int(repository.create_job(session, kind=JobKind.CLASSIFY, params={}).id)
            train = int(repository.create_job(session, kind=JobKind.TRAIN, params={}).id)
        assert explain(other + 99, good.id) == f"skipped: job {other + 99} not found"
        assert explain(other, good.id) == f"skipped: job {other} item {good.id} not found"
        assert explain(train, good.id).startswith(f"skipped: job {train} is a train job")
        assert _explanation_artifacts(factory, job_id) == {expected}
    finally:
        factory.kw["bind"].dispose()
