"""SIGTERM to a busy worker: Celery's warm shutdown lets the running chunk finish (acks_late:
its message is acked only then), the queued chunks stay in the broker for the next worker,
and no item is lost or recorded twice."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from scheduler.dispatch import Dispatcher
from scheduler.schema import ChunkStatus, JobStatus
from tests.faults.conftest import (
    RedisServer,
    TinyModel,
    Workers,
    assert_each_item_once,
    chunk_table,
    count_rows,
    create_classify_job,
    fault_settings,
    register_model,
    wait_job_done,
    wait_until,
    write_small_images,
)
from tests.worker.conftest import migrated_factory

pytestmark = [pytest.mark.faults, pytest.mark.services]

#: How long a warm shutdown may take: the running chunk finishes first (seconds here).
SHUTDOWN_TIMEOUT_S = 120.0


def test_sigterm_mid_chunk_finishes_it_and_loses_nothing(
    tmp_path: Path,
    postgres_url: str,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
) -> None:
    """SIGTERM while chunk 0 is half recorded: the worker finishes that chunk, exits 0
    without starting another one, and a new worker does the rest. Every item gets one row,
    every chunk ran exactly once (the finished chunk is not redone, none was lost)."""
    n, chunk = 120, 30
    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    paths = write_small_images(tmp_path / "images", n)
    job_id, n_chunks = create_classify_job(
        factory, register_model(factory, tiny_model), paths, chunk_size=chunk, batch_size=2
    )
    dispatcher = Dispatcher(settings)
    first = workers.start(settings)
    dispatcher.classify_chunks(job_id, range(n_chunks))
    try:

        def mid_chunk() -> bool:
            rows = count_rows(factory, job_id)
            return rows % chunk != 0 and any(
                s == ChunkStatus.RUNNING for _, s, _, _ in chunk_table(factory, job_id)
            )

        wait_until(mid_chunk, timeout=120, interval=0.02, what=f"a half-done chunk:\n{first.log()}")
        running = [i for i, s, _, _ in chunk_table(factory, job_id) if s == ChunkStatus.RUNNING]
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        assert first.proc.returncode == 0, first.log()
        table = {i: (s, a) for i, s, a, _ in chunk_table(factory, job_id)}
        # The chunk in flight was finished, not abandoned; the worker took no new one.
        assert len(running) == 1 and table[running[0]] == (ChunkStatus.SUCCEEDED, 1), table
        assert count_rows(factory, job_id) % chunk == 0 < count_rows(factory, job_id) < n
        assert job_status_open(factory, job_id)

        second = workers.start(settings)
        status = wait_job_done(factory, job_id, lambda: first.log() + second.log())
        assert status == JobStatus.SUCCEEDED, chunk_table(factory, job_id)
        assert_each_item_once(factory, job_id, n)
        # Each chunk was claimed once: nothing was re-run after the shutdown.
        assert [(s, a) for _, s, a, _ in chunk_table(factory, job_id)] == [
            (ChunkStatus.SUCCEEDED, 1)
        ] * n_chunks
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()


def job_status_open(factory, job_id: int) -> bool:  # type: ignore[no-untyped-def]
    from tests.faults.conftest import job_status

    return not job_status(factory, job_id).is_terminal
