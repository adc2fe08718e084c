"""Faults of the services under a running job: Redis and PostgreSQL restarted mid-job.

Each test restarts its *own* server (tests/faults/conftest.py), never the shared one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import JobStatus
from tests.faults.conftest import (
    PostgresServer,
    RedisServer,
    TinyModel,
    Workers,
    assert_each_item_once,
    count_rows,
    create_classify_job,
    fault_settings,
    register_model,
    wait_job_done,
    wait_until,
    write_small_images,
)
from tests.worker.conftest import REPO, migrated_factory, worker_env

pytestmark = [pytest.mark.faults, pytest.mark.services]


def test_redis_restart_mid_job(
    tmp_path: Path,
    postgres_url: str,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
) -> None:
    """Fault 3: Redis (no persistence) restarted while a job runs: the queued chunk messages
    are gone. The worker reconnects, its recovery sweep re-sends the pending chunks into the
    empty queue, and the job completes. A long-lived producer (as in the API) and the CLI
    both submit again after the restart."""
    n, chunk = 240, 20
    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    paths = write_small_images(tmp_path / "images", n)
    version_id = register_model(factory, tiny_model)
    job_id, n_chunks = create_classify_job(factory, version_id, paths, chunk_size=chunk)
    producer = Dispatcher(settings)  # long-lived, like the API's
    worker = workers.start(settings)
    # Sent once the worker answers pings: queued before, a fast machine can finish half the
    # job while the worker is still starting, and "under way" is never seen.
    producer.classify_chunks(job_id, range(n_chunks))
    try:
        wait_until(
            lambda: 0 < count_rows(factory, job_id) < n // 2,
            timeout=120,
            interval=0.02,
            what=f"the job to be under way:\n{worker.log()}",
        )
        own_redis.stop()
        time.sleep(2)
        own_redis.start()

        # The producer created before the restart sends over a new connection.
        paths2 = write_small_images(tmp_path / "images2", 20, seed=1)
        job2, chunks2 = create_classify_job(factory, version_id, paths2, chunk_size=chunk)
        producer.classify_chunks(job2, range(chunks2))

        # The CLI (a fresh process) submits a third job through the restarted broker.
        env = worker_env(settings)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "scheduler",
                "classify",
                str(tmp_path / "images2"),
                "--model",
                str(version_id),
            ],
            env=env,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        with factory() as session:
            job3 = max(j.id for j in repository.list_jobs(session, limit=10))
        assert job3 not in (job_id, job2)

        for jid, count in ((job_id, n), (job2, 20), (job3, 20)):
            status = wait_job_done(factory, jid, worker.log)
            assert status == JobStatus.SUCCEEDED, worker.log()
            assert_each_item_once(factory, jid, count)
        assert worker.proc.poll() is None, "the worker must survive the broker restart"
    finally:
        producer.close()
        factory.kw["bind"].dispose()


def test_postgres_restart_mid_job(
    tmp_path: Path,
    own_postgres: PostgresServer,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
) -> None:
    """Fault 4: PostgreSQL stopped (fast shutdown: sessions killed) for 2 s and started
    again while chunks are being recorded. Writes are retried as whole transactions; the
    idempotent writes leave exactly one row per item."""
    n, chunk = 120, 30
    url = own_postgres.url
    settings = fault_settings(tmp_path, database_url=url, broker_url=own_redis.url)
    factory = migrated_factory(url)
    paths = write_small_images(tmp_path / "images", n)
    job_id, n_chunks = create_classify_job(
        factory, register_model(factory, tiny_model), paths, chunk_size=chunk, batch_size=4
    )
    dispatcher = Dispatcher(settings)
    worker = workers.start(settings)
    # Sent once the worker answers pings, so the job cannot run past the window below
    # while the worker is still starting.
    dispatcher.classify_chunks(job_id, range(n_chunks))
    try:
        wait_until(
            lambda: 0 < count_rows(factory, job_id) < n // 2,
            timeout=120,
            interval=0.02,
            what=f"the job to be under way:\n{worker.log()}",
        )
        own_postgres.stop()
        time.sleep(2)
        own_postgres.start()
        factory.kw["bind"].dispose()  # our own pooled connections died with the server
        status = wait_job_done(factory, job_id, worker.log)
        assert status == JobStatus.SUCCEEDED, worker.log()
        assert_each_item_once(factory, job_id, n)
        with factory() as session:
            job = repository.get_job(session, job_id)
            assert (job.progress_done, job.progress_total) == (n, n)
        assert "database error (attempt" in worker.log(), "the outage was not noticed"
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
