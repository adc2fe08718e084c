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
    Workers,
    fault_settings,
    small_tmpfs,
    wait_job_done,
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
