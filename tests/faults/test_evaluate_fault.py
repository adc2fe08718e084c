"""An evaluate job whose worker is SIGKILLed mid-way: the re-run completes with one report."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import EvaluationReport, JobKind, JobStatus
from tests.faults.conftest import (
    RedisServer,
    TinyModel,
    Workers,
    fault_settings,
    job_status,
    register_model,
    wait_until,
)
from tests.worker.conftest import migrated_factory

pytestmark = [pytest.mark.faults, pytest.mark.services]

FOLDERS = ("Astrocitoma T1", "Carcinoma T1", "Ependimoma T1")
PER_FOLDER = 120


def _progress(factory, job_id: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with factory() as session:
        job = repository.get_job(session, job_id)
        return int(job.progress_done), int(job.progress_total)


def _reports(factory, job_id: int) -> int:  # type: ignore[no-untyped-def]
    with factory() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(EvaluationReport)
                .where(EvaluationReport.job_id == job_id)
            )
            or 0
        )


def test_killed_evaluation_reruns_to_one_report(
    tmp_path: Path,
    postgres_url: str,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
) -> None:
    """SIGKILL while the evaluation is part-way through its images (progress recorded,
    no report yet). Redis holds the message unacked for the visibility timeout, so the
    next worker's recovery sweep re-sends the job once its heartbeat file is stale; the
    re-run evaluates every image and records one report and one artifact per file."""
    from core.synth import synthesize

    data = tmp_path / "heldout"
    synthesize(
        data, per_folder=PER_FOLDER, seed=2, image_size_range=(40, 48), folders=list(FOLDERS)
    )
    total = PER_FOLDER * len(FOLDERS)
    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    version_id = register_model(factory, tiny_model)
    with factory.begin() as session:
        job_id = int(
            repository.create_job(
                session,
                kind=JobKind.EVALUATE,
                params={"data": str(data), "batch_size": 2},
                model_version_id=version_id,
            ).id
        )
    dispatcher = Dispatcher(settings)
    first = workers.start(settings)
    dispatcher.evaluate(job_id)
    try:
        wait_until(
            lambda: 0 < _progress(factory, job_id)[0] < total,
            timeout=120,
            interval=0.05,
            what=f"the evaluation to be part-way:\n{first.log()}",
        )
        first.kill9()
        done_at_kill = _progress(factory, job_id)[0]
        assert 0 < done_at_kill < total
        assert job_status(factory, job_id) == JobStatus.RUNNING
        assert _reports(factory, job_id) == 0

        second = workers.start(settings)
        wait_until(
            lambda: job_status(factory, job_id).is_terminal,
            timeout=180,
            interval=0.3,
            what=f"the re-run to finish:\n{second.log()}",
        )
        assert job_status(factory, job_id) == JobStatus.SUCCEEDED, second.log()
        # The re-run's message is the sweep's re-send, or a duplicate the first worker's own
        # start-up sweep sent (its queue looked empty once it had taken the message): either
        # way the second worker runs the job exactly once.
        assert second.log().count("Task mriq.evaluate[") == 2, second.log()  # received, done
        assert second.log().count("] succeeded in ") == 1, second.log()
        assert _reports(factory, job_id) == 1
        with factory() as session:
            report = repository.get_evaluation(session, job_id)
            assert report.report["n"] == total and report.model_version_id == version_id
            artifacts = [(a.kind, a.path) for a in repository.list_artifacts(session, job_id)]
        # One artifact per file (the report, the confusion matrix and the calibration plots).
        assert sorted(kind for kind, _ in artifacts) == sorted([
            "confusion_matrix", "report", "reliability_diagram", "per_class_metrics",
            "roc_curves", "confident_mistakes",
        ])
        assert all(Path(path).is_file() for _, path in artifacts)
        assert _progress(factory, job_id) == (total, total)
        # No leftover temporary files from the killed run's half-written outputs.
        out = Path(artifacts[0][1]).parent
        assert not list(out.glob("*.tmp")), sorted(p.name for p in out.iterdir())
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
