"""Fault 2: a worker SIGKILLed during training; the re-run resumes from last.pt."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import JobKind, JobStatus
from tests.faults.conftest import RedisServer, Workers, fault_settings, job_status, wait_until
from tests.worker.conftest import migrated_factory

pytestmark = [pytest.mark.faults, pytest.mark.services]

FOLDERS = ("Astrocitoma T1", "Carcinoma T1", "Ependimoma T1")
EPOCHS = 2


def test_killed_training_resumes_from_last_epoch(
    tmp_path: Path, postgres_url: str, own_redis: RedisServer, workers: Workers
) -> None:
    from core.synth import synthesize

    data = tmp_path / "synth"
    synthesize(data, per_folder=10, seed=1, image_size_range=(40, 56), folders=list(FOLDERS))
    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    params = {
        "data": str(data),
        "arch": "resnet18",
        "epochs": EPOCHS,
        "image_size": 32,
        "batch_size": 8,
        "lr": 1e-3,
        "labels": "15",
        "weights": "none",
        "seed": 0,
        "device": "cpu",
        "warm_start": False,
        "early_stopping_patience": 100,
    }
    with factory.begin() as session:
        job_id = int(repository.create_job(session, kind=JobKind.TRAIN, params=params).id)
    dispatcher = Dispatcher(settings)
    dispatcher.train(job_id)
    first = workers.start(settings)

    def epochs() -> dict[int, float | None]:
        with factory() as session:
            return {m.epoch: m.seconds for m in repository.list_epoch_metrics(session, job_id)}

    try:
        wait_until(
            lambda: len(epochs()) >= 1,
            timeout=180,
            interval=0.05,
            what=f"the first epoch:\n{first.log()}",
        )
        first.kill9()
        done_at_kill = epochs()
        assert 1 <= len(done_at_kill) < EPOCHS, "training finished before the kill"
        assert job_status(factory, job_id) == JobStatus.RUNNING

        # No message left for it (Redis holds it unacked for 12 h): the new worker's
        # recovery sweep sees the job's heartbeat file go stale and sends it again.
        second = workers.start(settings)
        wait_until(
            lambda: job_status(factory, job_id).is_terminal,
            timeout=240,
            interval=0.5,
            what=f"training to finish:\n{second.log()}",
        )
        assert job_status(factory, job_id) == JobStatus.SUCCEEDED, second.log()
        assert f"jobs [{job_id}]" in second.log()
        with factory() as session:
            versions = [
                v for v in repository.list_model_versions(session) if v.training_job_id == job_id
            ]
            assert len(versions) == 1, "the model version must be registered once"
            metrics = dict(versions[0].metrics)
        # Resumed after the last completed epoch, not from zero.
        assert metrics["resumed_from_epoch"] == max(done_at_kill), metrics
        assert metrics["epochs"] == EPOCHS
        final = epochs()
        assert sorted(final) == list(range(1, EPOCHS + 1))
        # Epochs finished before the kill were restored from last.pt, not trained again.
        for epoch, seconds in done_at_kill.items():
            assert final[epoch] == pytest.approx(seconds)
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
