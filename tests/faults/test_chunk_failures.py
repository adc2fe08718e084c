"""Chunks that fail: a lasting error (retried with backoff, then failed), a chunk over its
hard time limit (the pool replaces the process, the chunk is recorded as failed, the job
goes on to ``partial``) and a chunk whose worker process is OOM-killed by one image
(prefork: the pool replaces the child; threads: the restarted worker re-sends what its
predecessor held; either way that image is set aside with an error row and the rest of the
chunk is classified, worker/isolation.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import ChunkStatus, JobStatus
from tests.faults.conftest import (
    RedisServer,
    TinyModel,
    Workers,
    assert_each_item_once,
    children,
    chunk_table,
    create_classify_job,
    fault_env,
    fault_settings,
    job_status,
    register_model,
    wait_job_done,
    wait_until,
    write_small_images,
)
from tests.faults.memlimit import MemoryGroup, join_and_exec, memory_group
from tests.worker.conftest import migrated_factory

pytestmark = [pytest.mark.faults, pytest.mark.services]


def _rows(factory, job_id: int) -> dict[int, tuple[str | None, str | None]]:  # type: ignore[no-untyped-def]
    with factory() as session:
        return {
            r.item_index: (r.label, r.error) for r in repository.iter_predictions(session, job_id)
        }


def test_chunk_that_keeps_failing_is_retried_then_failed(
    tmp_path: Path,
    postgres_url: str,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
) -> None:
    """Fault 6: the model file disappears after chunk 0 succeeded. A fresh worker process
    (empty model cache) fails to load it on chunks 1 and 2; a missing checkpoint may come
    back (shared storage), so each is retried with backoff (2 s, 4 s) up to
    task_max_retries=2, then failed with the reason on every item. The job ends partial."""
    n, chunk = 36, 12
    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    model = tmp_path / "model.pt"
    shutil.copy(tiny_model.path, model)
    paths = write_small_images(tmp_path / "images", n)
    job_id, n_chunks = create_classify_job(
        factory, register_model(factory, tiny_model, model), paths, chunk_size=chunk
    )
    assert n_chunks == 3
    dispatcher = Dispatcher(settings)
    try:
        dispatcher.classify_chunks(job_id, [0])
        # No recovery sweep in this first worker: chunks 1 and 2 are deliberately left
        # unsent (pending, queue empty) and would otherwise be re-sent to it.
        first = workers.start(settings, "--recovery-interval=0")
        wait_until(
            lambda: chunk_table(factory, job_id)[0][1] == ChunkStatus.SUCCEEDED,
            timeout=120,
            what=f"chunk 0:\n{first.log()}",
        )
        first.stop()
        model.unlink()
        dispatcher.classify_chunks(job_id, [1, 2])
        second = workers.start(settings)
        status = wait_job_done(factory, job_id, second.log, timeout=120)
        assert status == JobStatus.PARTIAL, chunk_table(factory, job_id)
        table = chunk_table(factory, job_id)
        assert table[0][1:3] == (ChunkStatus.SUCCEEDED, 1)
        for _, chunk_status, attempts, error in table[1:]:
            assert chunk_status == ChunkStatus.FAILED
            assert attempts == settings.task_max_retries + 1  # first try + 2 retries
            assert error is not None and "checkpoint file not found" in error
        log = second.log()
        assert log.count("retry 1/2 in 2s") == 2 and log.count("retry 2/2 in 4s") == 2, log
        assert_each_item_once(factory, job_id, n)
        rows = _rows(factory, job_id)
        assert all(rows[i][0] is not None and rows[i][1] is None for i in range(chunk))
        assert all(
            rows[i][0] is None and "checkpoint file not found" in str(rows[i][1])
            for i in range(chunk, n)
        )
        with factory() as session:
            error = repository.get_job(session, job_id).error
        assert error is not None and error.startswith("2 of 3 chunks failed")
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()


def _big_image(path: Path, side: int = 7900) -> Path:
    """A 62-megapixel PNG (under read_image's 64 MP guard) that compresses to ~300 KB but
    decodes to ~1.5 GB of working memory and takes seconds to preprocess."""
    import numpy as np
    from PIL import Image

    arr = np.zeros((side, side), dtype=np.uint8)
    arr[::7] = 200
    Image.fromarray(arr, mode="L").save(path, compress_level=1)
    return path


def _heavy_job(  # type: ignore[no-untyped-def]
    tmp_path: Path, factory, tiny_model: TinyModel, *, chunk: int, n_big: int
) -> tuple[int, int]:
    """Three chunks of ``chunk`` items: chunk 1 holds the ``n_big`` big images (then tiny
    ones), chunks 0 and 2 only tiny ones."""
    small = write_small_images(tmp_path / "images", 3 * chunk - n_big)
    big = [_big_image(tmp_path / f"big_{i}.png") for i in range(n_big)]
    paths = [*small[:chunk], *big, *small[chunk:]]
    return create_classify_job(
        factory, register_model(factory, tiny_model), paths, chunk_size=chunk, batch_size=2
    )


def test_chunk_over_time_limit_is_failed_and_process_replaced(
    tmp_path: Path,
    postgres_url: str,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
) -> None:
    """Fault 8 (time limit): prefork pool, chunk_time_limit=3 s; the chunk of big images
    runs over it (16 images of 0.5-1.5 s each; a tiny-image chunk takes under a second
    once the child has imported the inference stack at start-up). The pool kills and
    replaces the child; the parent records the chunk's failure at once (Task.on_failure
    with TimeLimitExceeded); the other chunks succeed."""
    settings = fault_settings(
        tmp_path, database_url=postgres_url, broker_url=own_redis.url, chunk_time_limit=3
    )
    factory = migrated_factory(postgres_url)
    job_id, n_chunks = _heavy_job(tmp_path, factory, tiny_model, chunk=16, n_big=16)
    dispatcher = Dispatcher(settings)
    dispatcher.classify_chunks(job_id, range(n_chunks))
    worker = workers.start(settings, "--pool=prefork", env=fault_env(settings))
    try:
        pool_before = set(children(worker.proc.pid))
        status = wait_job_done(factory, job_id, worker.log, timeout=150)
        assert status == JobStatus.PARTIAL, chunk_table(factory, job_id)
        table = chunk_table(factory, job_id)
        assert [s for _, s, _, _ in table] == [
            ChunkStatus.SUCCEEDED,
            ChunkStatus.FAILED,
            ChunkStatus.SUCCEEDED,
        ]
        assert table[1][2] == 1 and "TimeLimitExceeded" in str(table[1][3])
        assert_each_item_once(factory, job_id, 3 * 16)
        rows = _rows(factory, job_id)
        heavy = range(16, 2 * 16)
        # Batches recorded before the kill are kept; every other item of the chunk got the
        # chunk's failure as its error.
        errors = [rows[i][1] for i in heavy if rows[i][1] is not None]
        assert errors and all("TimeLimitExceeded" in str(e) for e in errors)
        assert all(rows[i][0] is not None for i in heavy if rows[i][1] is None)
        assert "Hard time limit (3s) exceeded" in worker.log()
        assert worker.proc.poll() is None
        wait_until(lambda: len(children(worker.proc.pid)) == 1, timeout=30, what="a new child")
        assert set(children(worker.proc.pid)).isdisjoint(pool_before), "child not replaced"
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()


OOM_LIMIT = 1000 * 1024 * 1024


#: The threads-pool worker decodes in its one process: its peak over the baseline is smaller
#: than a fresh prefork child's, and at 1000 MiB it sometimes got through the 62 MP image
#: (1 of 3 runs here); 800 MiB still leaves ~400 MiB over the worker's idle size.
OOM_LIMIT_THREADS = 800 * 1024 * 1024


def _oom_group(name: str, limit: int) -> Iterator[MemoryGroup]:
    """A memory cgroup (v2 or v1) limited to ``limit``: exceeding it makes the *kernel* OOM
    killer SIGKILL the biggest process in it, exactly what a container limit does."""
    with memory_group(name, limit) as group:
        if group is None:
            pytest.skip("needs a writable memory cgroup (v2 memory.max or v1 memory controller)")
        yield group


@pytest.fixture
def oom_group(tmp_path: Path) -> Iterator[MemoryGroup]:
    yield from _oom_group(f"mriq-fault-{tmp_path.name}", OOM_LIMIT)


@pytest.fixture
def oom_group_threads(tmp_path: Path) -> Iterator[MemoryGroup]:
    yield from _oom_group(f"mriq-fault-{tmp_path.name}", OOM_LIMIT_THREADS)


def test_image_that_gets_its_worker_oom_killed_is_set_aside(
    tmp_path: Path,
    postgres_url: str,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
    oom_group: MemoryGroup,
) -> None:
    """Fault 8 (out of memory): the prefork worker runs in a memory cgroup limited to
    1 GB (1000 MiB); decoding the chunk's 62 MP image needs more, so the kernel OOM-kills the pool
    child. Celery requeues the message (WorkerLostError, reject_on_worker_lost) and the pool
    forks a new child. The first death (batched, read-ahead) blames nobody; the second
    attempt runs the chunk one item at a time and dies on the big image; the third sets
    that image aside with an error row (worker/isolation.py) and classifies the other
    seven. The worker's main process survives throughout; the job succeeds (one
    unreadable input is an error row, not a failed chunk)."""
    settings = fault_settings(
        tmp_path, database_url=postgres_url, broker_url=own_redis.url, task_max_retries=1
    )
    factory = migrated_factory(postgres_url)
    job_id, n_chunks = _heavy_job(tmp_path, factory, tiny_model, chunk=8, n_big=1)
    dispatcher = Dispatcher(settings)
    dispatcher.classify_chunks(job_id, range(n_chunks))
    # The shell puts itself into the group and execs the worker, so parent and children
    # are in it; the parent stays small, the child that decodes the image is the victim.
    worker = workers.start(settings, "--pool=prefork", wrapper=join_and_exec(oom_group))
    try:
        status = wait_job_done(factory, job_id, worker.log, timeout=200)
        assert status == JobStatus.SUCCEEDED, chunk_table(factory, job_id)
        table = chunk_table(factory, job_id)
        assert [s for _, s, _, _ in table] == [ChunkStatus.SUCCEEDED] * 3
        assert table[1][2] == 3  # 2 kills, then the attempt that set the image aside
        assert_each_item_once(factory, job_id, 3 * 8)
        rows = _rows(factory, job_id)
        errors = {i: e for i, (_, e) in rows.items() if e is not None}
        assert list(errors) == [8], errors  # the big image, first of chunk 1
        assert "died while reading or classifying this file" in str(errors[8])
        assert "killed by SIGKILL" in str(errors[8]), errors[8]
        log = worker.log()
        assert log.count("exited with 'signal 9 (SIGKILL)'") == 2, log
        assert worker.proc.poll() is None, "the worker's main process must survive"
        assert oom_group.oom_kills() > 0
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
        for worker in workers.started:
            worker.stop()


def test_threads_worker_oom_killed_is_restarted_and_image_set_aside(
    tmp_path: Path,
    postgres_url: str,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
    oom_group_threads: MemoryGroup,
) -> None:
    """Fault 8 (out of memory, threads pool, production's): the whole worker process is
    the OOM killer's victim (there is no pool child). It is restarted under the same node
    name, as a container restart policy does; each incarnation re-sends at start-up the
    chunk its predecessor died holding (the message itself stays unacked in Redis for the
    12 h visibility timeout), with the production 300 s staleness window never waited for.
    The first death makes the big image a suspect, the second (read alone) convicts it, and
    the third incarnation sets it aside with an error row (worker/isolation.py) and
    classifies the rest: the job succeeds, every item exactly one row."""
    settings = fault_settings(
        tmp_path, database_url=postgres_url, broker_url=own_redis.url, task_max_retries=1
    )
    factory = migrated_factory(postgres_url)
    job_id, n_chunks = _heavy_job(tmp_path, factory, tiny_model, chunk=8, n_big=1)
    dispatcher = Dispatcher(settings)
    dispatcher.classify_chunks(job_id, range(n_chunks))
    hostname = f"oom-{tmp_path.name[-8:]}@localhost"
    incarnations = []
    try:
        for _ in range(settings.task_max_retries + 3):
            worker = workers.start(
                settings,
                "--stale-after=300",
                wrapper=join_and_exec(oom_group_threads),
                hostname=hostname,
                wait=False,
            )
            incarnations.append(worker)
            wait_until(
                lambda w=worker: (
                    w.proc.poll() is not None  # type: ignore[misc]
                    or job_status(factory, job_id).is_terminal
                ),
                timeout=200,
                what=f"an OOM kill or the job's end; chunks {chunk_table(factory, job_id)}",
            )
            if job_status(factory, job_id).is_terminal:
                break
            assert worker.proc.returncode == -9, worker.log()  # SIGKILL, by the kernel
        logs = "\n".join(w.log() for w in incarnations)
        status = wait_job_done(factory, job_id, lambda: logs, timeout=10)
        assert status == JobStatus.SUCCEEDED, chunk_table(factory, job_id)
        table = chunk_table(factory, job_id)
        assert [s for _, s, _, _ in table] == [ChunkStatus.SUCCEEDED] * 3, table
        assert table[1][2] == 3  # 2 kills, then the attempt that set the image aside
        # Two killed incarnations, a third that set the image aside and lives on.
        assert len(incarnations) == 3
        assert incarnations[-1].proc.poll() is None
        rows = _rows(factory, job_id)
        errors = {i: e for i, (_, e) in rows.items() if e is not None}
        assert list(errors) == [8], errors  # the big image, first of chunk 1
        assert "died while reading or classifying this file" in str(errors[8])
        for later in incarnations[1:]:
            assert (
                f"recovery: re-sent chunk ({job_id}, 1): held by this worker's previous "
                "incarnation" in later.log()
            ), later.log()
        assert_each_item_once(factory, job_id, 3 * 8)
        assert oom_group_threads.oom_kills() > 0
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
        for worker in workers.started:
            worker.stop()
