"""Faults of the services: Redis and PostgreSQL restarted mid-job, and either of them down
when the API or the CLI is asked to do something.

Each test restarts its *own* server (tests/faults/conftest.py), never the shared one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.api import create_app
from scheduler.dispatch import Dispatcher
from scheduler.schema import ChunkStatus, JobStatus
from scheduler.settings import Settings
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


# --------------------------------------------------------------------------- at submission


def _fake_model(factory: sessionmaker[Session]) -> int:
    """A model version row (submission reads only the row; no worker runs here)."""
    with factory.begin() as session:
        version = repository.register_model_version(
            session, training_job_id=None, arch="resnet18", label_mode="15",
            classes=["Glioblastoma", "Normal"], checkpoint_path="/nonexistent/best.pt",
            checkpoint_sha256="0" * 64, metrics={},
        )
        return int(version.id)


def _jobs(factory: sessionmaker[Session]) -> dict[int, tuple[JobStatus, str | None]]:
    with factory() as session:
        return {int(j.id): (JobStatus(j.status), j.error)
                for j in repository.list_jobs(session, limit=100)}


def _mriq_cli(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = worker_env(settings)
    return subprocess.run([sys.executable, "-m", "scheduler", *args], env=env, cwd=str(cwd),
                          capture_output=True, text=True, timeout=120)


def _assert_one_line_error(run: subprocess.CompletedProcess[str], *words: str) -> None:
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_broker_down_at_submission(
    tmp_path: Path, postgres_url: str, own_redis: RedisServer
) -> None:
    """Redis stopped: the API answers 503 + Retry-After without the broker's address, the
    CLI exits 1 with one line, and every job they stored is failed with the reason (none is
    left queued with no task behind it). Once Redis is back the same API submits again."""
    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(b"\x89PNG")  # items; nothing decodes them here
    model_id = _fake_model(factory)
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as api:
            first = api.post("/jobs/classify", json={"inputs": [str(images)],
                                                     "model_version_id": model_id})
            assert first.status_code == 201, first.text
            own_redis.stop()
            refused = [
                api.post("/jobs/classify", json={"inputs": [str(images)],
                                                 "model_version_id": model_id}),
                api.post("/jobs/train", json={"data": str(images)}),
                api.post("/jobs/evaluate", json={"model_version_id": model_id,
                                                 "data": str(images)}),
            ]
            for response in refused:
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"].isdigit()
                detail = response.json()["detail"]
                assert "broker is unavailable" in detail and "marked failed" in detail, detail
                assert str(own_redis.port) not in detail  # the broker's address stays inside
            cli = _mriq_cli(settings, tmp_path, "classify", str(images), "--model", str(model_id))
            _assert_one_line_error(cli, "not queued", "broker is unreachable",
                                   str(own_redis.port))
            jobs = _jobs(factory)
            assert len(jobs) == 5, jobs
            first_id = first.json()["id"]
            assert jobs.pop(first_id)[0] == JobStatus.QUEUED  # sent before the outage
            for job_id, (status, error) in jobs.items():
                assert status == JobStatus.FAILED, (job_id, status)
                assert error is not None and "not dispatched" in error, error
            with factory() as session:
                for job_id in jobs:
                    assert all(c.status != ChunkStatus.PENDING
                               for c in repository.list_chunks(session, job_id))

            own_redis.start()
            again = api.post("/jobs/classify", json={"inputs": [str(images)],
                                                     "model_version_id": model_id})
            assert again.status_code == 201, again.text
            assert _jobs(factory)[again.json()["id"]][0] == JobStatus.QUEUED
    finally:
        factory.kw["bind"].dispose()


def test_database_down_for_the_api_and_cli(
    tmp_path: Path, own_postgres: PostgresServer, own_redis: RedisServer
) -> None:
    """PostgreSQL stopped under a running API: every route answers 503 (+ Retry-After),
    never 500, /health says which dependency is down, the CLI exits 1 with one line, and
    the API serves again once PostgreSQL is back (no restart)."""
    settings = fault_settings(tmp_path, database_url=own_postgres.url, broker_url=own_redis.url)
    factory = migrated_factory(own_postgres.url)
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(b"\x89PNG")
    model_id = _fake_model(factory)
    factory.kw["bind"].dispose()
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("get", "/jobs", None),
        ("get", "/jobs/1", None),
        ("get", "/jobs/1/predictions", None),
        ("get", "/jobs/1/predictions?format=csv", None),
        ("get", "/jobs/1/metrics", None),
        ("get", "/jobs/1/artifacts", None),
        ("post", "/jobs/1/cancel", None),
        ("get", "/artifacts/1", None),
        ("get", "/models", None),
        ("get", f"/models/{model_id}", None),
        ("post", f"/models/{model_id}/promote", None),
        ("post", "/models/rollback", None),
        ("post", "/jobs/classify", {"inputs": [str(images)], "model_version_id": model_id}),
        ("post", "/jobs/classify", {"inputs": [str(images)]}),
        ("post", "/jobs/train", {"data": str(images)}),
        ("post", "/jobs/evaluate", {"model_version_id": model_id, "data": str(images)}),
    ]
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        assert api.get("/jobs").status_code == 200  # pooled connections exist, then die
        own_postgres.stop()
        for method, url, body in requests:
            response = api.request(method, url, json=body)
            assert response.status_code == 503, (method, url, response.status_code,
                                                 response.text[:300])
            assert response.headers["retry-after"].isdigit(), url
            assert "database unavailable" in response.json()["detail"], response.text
        health = api.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "degraded", "database": False, "broker": True}
        for args in (("jobs", "list"), ("classify", str(images), "--model", str(model_id))):
            _assert_one_line_error(_mriq_cli(settings, tmp_path, *args),
                                   "database unavailable", str(own_postgres.port))
        own_postgres.start()
        assert api.get("/jobs").status_code == 200
        assert api.get("/health").status_code == 200


def test_broker_hung_at_submission(
    tmp_path: Path, postgres_url: str, own_redis: RedisServer
) -> None:
    """Redis stopped with SIGSTOP: connections are accepted (by the kernel) and never
    answered. Submissions used to block forever (an API thread and the CLI hung in
    send_task); now the producer's socket timeout fails them: 503 / exit 1, job failed."""
    import signal
    import threading

    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(b"\x89PNG")
    model_id = _fake_model(factory)
    assert own_redis.proc is not None
    results: dict[str, Any] = {}
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as api:
            body = {"inputs": [str(images)], "model_version_id": model_id}
            assert api.post("/jobs/classify", json=body).status_code == 201
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            submit = threading.Thread(
                target=lambda: results.update(r=api.post("/jobs/classify", json=body)),
                daemon=True,
            )
            try:
                submit.start()
                submit.join(timeout=120)  # liveness bound: the old code never answered
                hung = submit.is_alive()
                try:
                    cli = _mriq_cli(settings, tmp_path, "classify", str(images),
                                    "--model", str(model_id))
                except subprocess.TimeoutExpired:
                    pytest.fail("mriq classify hung on the stopped broker")
            finally:
                # Before the client closes: it waits for a request still stuck in send_task.
                os.kill(own_redis.proc.pid, signal.SIGCONT)
            assert not hung, "the API request hung on the stopped broker"
            response = results["r"]
            assert response.status_code == 503, response.text
            assert "broker is unavailable" in response.json()["detail"]
            _assert_one_line_error(cli, "not queued", "broker is unreachable")
        statuses = sorted(status for status, _ in _jobs(factory).values())
        assert statuses == [JobStatus.FAILED, JobStatus.FAILED, JobStatus.QUEUED], statuses
    finally:
        factory.kw["bind"].dispose()


def test_interrupted_submission_fails_its_job(
    tmp_path: Path, postgres_url: str, own_redis: RedisServer
) -> None:
    """Ctrl-C while ``mriq classify`` waits on a hung broker: the stored job is failed, not
    left queued with no task behind it (the old code let KeyboardInterrupt past)."""
    import signal

    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(b"\x89PNG")
    model_id = _fake_model(factory)
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    cli = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "classify", str(images), "--model", str(model_id)],
        env=worker_env(settings), cwd=str(tmp_path), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        # The job row is committed before the tasks are sent: interrupt during the send.
        wait_until(lambda: len(_jobs(factory)) == 1, timeout=60, interval=0.1,
                   what="the CLI to store its job")
        time.sleep(0.5)
        cli.send_signal(signal.SIGINT)
        _, stderr = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=10)
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    try:
        assert cli.returncode == 130, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr, stderr
        [(status, error)] = _jobs(factory).values()
        assert status == JobStatus.FAILED, (status, error)
        assert error is not None and "not dispatched" in error, error
    finally:
        factory.kw["bind"].dispose()
