"""Transient outages must not become permanent failures (issue 13, part 4).

A private PostgreSQL (tests/faults/conftest.py) is stopped for OUTAGE_S, longer than the
minute the workers used to retry a transaction, and started again while a train job and a
classify job run. Both must succeed with every row exactly once: the worker rides out the
outage (``settings.db_outage_limit``) instead of failing the job or writing error rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import ChunkStatus, JobKind, JobStatus
from tests.faults.conftest import (
    PostgresServer,
    RedisServer,
    TinyModel,
    Workers,
    assert_each_item_once,
    chunk_table,
    count_rows,
    create_classify_job,
    fault_settings,
    job_status,
    register_model,
    wait_job_done,
    wait_until,
    write_small_images,
)
from tests.worker.conftest import migrated_factory

pytestmark = [pytest.mark.faults, pytest.mark.services]

#: Longer than the old in-place retries (8 attempts, ~45-60 s), well inside the limit.
OUTAGE_S = 75.0
FOLDERS = ("Astrocitoma T1", "Carcinoma T1", "Ependimoma T1")
EPOCHS = 4


def _outage(server: PostgresServer) -> None:
    server.stop()
    # Nothing may touch the database meanwhile, the test's own polling included.
    time.sleep(OUTAGE_S)
    server.start()


def test_train_job_survives_a_long_database_outage(
    tmp_path: Path, own_postgres: PostgresServer, own_redis: RedisServer, workers: Workers
) -> None:
    from core.synth import synthesize

    data = tmp_path / "synth"
    synthesize(data, per_folder=10, seed=1, image_size_range=(40, 56), folders=list(FOLDERS))
    url = own_postgres.url
    settings = fault_settings(tmp_path, database_url=url, broker_url=own_redis.url)
    factory = migrated_factory(url)
    params = {
        "data": str(data),
        "arch": "resnet18",
        "epochs": EPOCHS,
        "image_size": 32,
        "batch_size": 8,
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
    worker = workers.start(settings)
    dispatcher.train(job_id)

    def epochs() -> list[int]:
        with factory() as session:
            return [m.epoch for m in repository.list_epoch_metrics(session, job_id)]

    try:
        wait_until(
            lambda: len(epochs()) >= 1, timeout=240, interval=0.1, what=f"epoch 1:\n{worker.log()}"
        )
        assert len(epochs()) < EPOCHS, "training finished before the outage"
        factory.kw["bind"].dispose()
        _outage(own_postgres)
        factory.kw["bind"].dispose()  # our pooled connections died with the server
        status = wait_job_done(factory, job_id, worker.log, timeout=400)
        assert status == JobStatus.SUCCEEDED, worker.log()
        assert epochs() == list(range(1, EPOCHS + 1))
        with factory() as session:
            versions = [
                v for v in repository.list_model_versions(session) if v.training_job_id == job_id
            ]
            job = repository.get_job(session, job_id)
            assert job.error is None
        assert len(versions) == 1, "the model version must be registered once"
        assert versions[0].metrics["epochs"] == EPOCHS
        assert "database error (attempt" in worker.log(), "the outage was not noticed"
        assert worker.proc.poll() is None
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()


def test_classify_job_survives_a_long_database_outage(
    tmp_path: Path,
    own_postgres: PostgresServer,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
) -> None:
    """With no retries to spare (task_max_retries=0) the outage must cost none: waiting for
    the database is not a failure of the chunk, nor is a chunk whose heartbeat could not be
    written during the outage a lost worker (no second claim)."""
    n, chunk = 160, 40
    url = own_postgres.url
    settings = fault_settings(
        tmp_path, database_url=url, broker_url=own_redis.url, task_max_retries=0
    )
    factory = migrated_factory(url)
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
        factory.kw["bind"].dispose()
        _outage(own_postgres)
        factory.kw["bind"].dispose()
        status = wait_job_done(factory, job_id, worker.log, timeout=300)
        assert status == JobStatus.SUCCEEDED, f"{chunk_table(factory, job_id)}\n{worker.log()}"
        assert_each_item_once(factory, job_id, n)
        with factory() as session:
            errors = [r for r in repository.iter_predictions(session, job_id) if r.error]
        assert errors == [], "an outage must never become error rows"
        chunks = chunk_table(factory, job_id)
        assert [(s, attempts) for _, s, attempts, _ in chunks] == [
            (ChunkStatus.SUCCEEDED, 1)
        ] * n_chunks, chunks
        assert job_status(factory, job_id) == JobStatus.SUCCEEDED
        assert "database error (attempt" in worker.log(), "the outage was not noticed"
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()


def test_train_job_outlasting_the_limit_resumes_from_last_epoch(
    tmp_path: Path, own_postgres: PostgresServer, own_redis: RedisServer, workers: Workers
) -> None:
    """An outage longer than db_outage_limit (here 15 s of a 45 s outage): the task gives
    up without marking the job failed, and once the database is back the recovery sweep
    re-sends it; the re-run resumes after the last completed epoch."""
    from core.synth import synthesize

    data = tmp_path / "synth"
    synthesize(data, per_folder=10, seed=1, image_size_range=(40, 56), folders=list(FOLDERS))
    url = own_postgres.url
    settings = fault_settings(tmp_path, database_url=url, broker_url=own_redis.url)
    factory = migrated_factory(url)
    params = {
        "data": str(data),
        "arch": "resnet18",
        "epochs": EPOCHS,
        "image_size": 32,
        "batch_size": 8,
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
    worker = workers.start(settings, env={"MRIQ_DB_OUTAGE_LIMIT": "15"})
    dispatcher.train(job_id)

    def epochs() -> list[int]:
        with factory() as session:
            return [m.epoch for m in repository.list_epoch_metrics(session, job_id)]

    try:
        wait_until(
            lambda: len(epochs()) >= 1, timeout=240, interval=0.1, what=f"epoch 1:\n{worker.log()}"
        )
        done_before = len(epochs())
        assert done_before < EPOCHS, "training finished before the outage"
        factory.kw["bind"].dispose()
        own_postgres.stop()
        wait_until(
            lambda: "left to the recovery sweep" in worker.log(),
            timeout=120,
            interval=0.5,
            what=f"the task to give up:\n{worker.log()}",
        )
        time.sleep(5)  # down a while longer after the task gave up
        own_postgres.start()
        status = wait_job_done(factory, job_id, worker.log, timeout=400)
        assert status == JobStatus.SUCCEEDED, worker.log()
        assert epochs() == list(range(1, EPOCHS + 1))
        with factory() as session:
            versions = [
                v for v in repository.list_model_versions(session) if v.training_job_id == job_id
            ]
        assert len(versions) == 1
        # Resumed from last.pt, after at least the epochs recorded before the outage.
        assert versions[0].metrics["resumed_from_epoch"] >= done_before, versions[0].metrics
        assert f"jobs [{job_id}]" in worker.log(), "the recovery sweep did not re-send it"
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()


def test_sweep_spares_running_chunks_whose_heartbeats_the_outage_stopped(
    tmp_path: Path, own_postgres: PostgresServer, own_redis: RedisServer
) -> None:
    """A running chunk's heartbeat is a database write, so an outage longer than
    stale_after makes a live chunk look dead. The sweep must give its heartbeat time to
    come back after the outage (here: 1.5 s, as a backed-off heartbeat would) instead of
    re-sending it at once (a second claim, counted against the chunk as a lost worker),
    and must still re-send it when no heartbeat comes back."""
    from worker.recovery import RecoveryConfig, Sweeper

    url = own_postgres.url
    settings = fault_settings(tmp_path, database_url=url, broker_url=own_redis.url)
    factory = migrated_factory(url)
    paths = write_small_images(tmp_path / "images", 4)
    with factory.begin() as session:
        job = repository.create_job(session, kind=JobKind.CLASSIFY, params={"top_k": 3})
        job_id = int(job.id)
        repository.add_job_items(session, job_id, [str(p) for p in paths], chunk_size=4)
        assert repository.claim_chunk(session, job_id, 0) is not None  # a live task has it

    def status() -> ChunkStatus:
        return chunk_table(factory, job_id)[0][1]

    def beat() -> None:
        with factory.begin() as session:
            repository.touch_chunk(session, job_id, 0)

    stale_after = 4.0
    sweeper = Sweeper(settings, RecoveryConfig(0.5, stale_after, 0.2))
    sweeper.start()
    try:
        time.sleep(1.0)
        assert status() == ChunkStatus.RUNNING  # fresh stamp: nothing to recover
        factory.kw["bind"].dispose()
        own_postgres.stop()
        time.sleep(stale_after + 1.0)  # the stamp goes stale while nobody can write it
        own_postgres.start()
        factory.kw["bind"].dispose()
        time.sleep(1.5)
        for _ in range(int(3 * stale_after / 0.5)):  # the live task's heartbeat is back
            assert status() == ChunkStatus.RUNNING, "a live chunk was re-sent after the outage"
            beat()
            time.sleep(0.5)
        # Its heartbeat stops for good (the worker died): it is recovered all the same.
        wait_until(
            lambda: status() == ChunkStatus.PENDING,
            timeout=60,
            interval=0.2,
            what="the chunk of a dead worker to be re-sent",
        )
    finally:
        sweeper.stop()
        factory.kw["bind"].dispose()
