"""A file that crashes the decoder *process* (abort/segfault in native code) costs one error
row, not its chunk (worker/isolation.py).

How the crash is made real without mocks: the test's worker processes (and only those) get a
``sitecustomize.py`` on their ``PYTHONPATH`` that registers a Pillow open-plugin in front of
PNG: for files starting with ``MRIQ-CRASH:ABRT`` it calls ``os.abort()`` and for
``MRIQ-CRASH:SEGV`` it reads address 0 through ``ctypes``, exactly where a broken native
decoder would crash (inside ``Image.open`` in the decode thread); other PNGs open as usual.
A real input that makes libpng/libjpeg abort is version-specific and fixed upstream
quickly; the plugin gives a real SIGABRT/SIGSEGV of the real worker process on every
Pillow. The isolation code knows nothing of the magic: it only sees a process die.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import ChunkStatus, JobStatus
from tests.faults.conftest import (
    JOB_TIMEOUT_S,
    RedisServer,
    TinyModel,
    Worker,
    Workers,
    assert_each_item_once,
    chunk_table,
    create_classify_job,
    fault_settings,
    job_status,
    register_model,
    write_small_images,
)
from tests.worker.conftest import REPO, migrated_factory

pytestmark = [pytest.mark.faults, pytest.mark.services]

POISON_MAGIC = b"MRIQ-CRASH:"

PLUGIN = '''\
"""Test-only: a Pillow open-plugin in front of PNG that crashes the process natively on
files starting with MRIQ-CRASH:ABRT (abort) or MRIQ-CRASH:SEGV (segfault)."""
import ctypes
import os

from PIL import Image, PngImagePlugin  # noqa: F401 (registers PNG first)

_MAGIC = b"MRIQ-CRASH:"
_png_open, _png_accept = Image.OPEN["PNG"]


def _accept(prefix):
    return prefix.startswith(_MAGIC) or _png_accept(prefix)


def _open(fp, filename):
    head = fp.read(len(_MAGIC) + 4)
    fp.seek(0)
    if head == _MAGIC + b"SEGV":
        ctypes.string_at(0)
    if head.startswith(_MAGIC):
        os.abort()
    return _png_open(fp, filename)


Image.register_open("PNG", _open, _accept)
'''


def _plugin_env(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "crash-plugin"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PLUGIN)
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def _rows(factory, job_id: int) -> dict[int, tuple[str | None, str | None]]:  # type: ignore[no-untyped-def]
    with factory() as session:
        return {
            r.item_index: (r.label, r.error) for r in repository.iter_predictions(session, job_id)
        }


@pytest.mark.parametrize(("kind", "pool"), [("ABRT", "threads"), ("SEGV", "prefork")])
def test_file_that_kills_the_worker_costs_one_error_row(
    tmp_path: Path,
    postgres_url: str,
    own_redis: RedisServer,
    workers: Workers,
    tiny_model: TinyModel,
    kind: str,
    pool: str,
) -> None:
    """Three chunks of 16; item 21 (chunk 1) kills the process that decodes it with a real
    SIGABRT or SIGSEGV. Threads pool: that is the worker itself, and a supervisor loop
    restarts it whenever it dies (what systemd/docker do); prefork: the pool child, which
    the worker replaces and whose message Celery requeues. The first death happens in a
    normal batched run and blames nobody; the re-sent chunk then runs one item at a time
    and dies on item 21 again; the next attempt records its error row naming the signal
    and classifies the other 15. Budget: one error row, n-1 predictions, the job
    succeeded (a set-aside file is an unreadable input, not a failed chunk), two deaths."""
    n, chunk, poison = 48, 16, 21
    settings = fault_settings(tmp_path, database_url=postgres_url, broker_url=own_redis.url)
    factory = migrated_factory(postgres_url)
    paths = write_small_images(tmp_path / "images", n)
    paths[poison].write_bytes(POISON_MAGIC + kind.encode() + b"\0" * 64)
    job_id, n_chunks = create_classify_job(
        factory, register_model(factory, tiny_model), paths, chunk_size=chunk, batch_size=4
    )
    env = _plugin_env(tmp_path)
    dispatcher = Dispatcher(settings)
    dead: list[Worker] = []
    worker = workers.start(settings, f"--pool={pool}", env=env)
    dispatcher.classify_chunks(job_id, range(n_chunks))

    def logs() -> str:
        return "".join(w.log() for w in [*dead, worker])

    try:
        deadline = time.monotonic() + 2 * JOB_TIMEOUT_S
        while not job_status(factory, job_id).is_terminal:
            assert time.monotonic() < deadline, f"{chunk_table(factory, job_id)}\n{logs()}"
            assert len(dead) <= 3, f"the file keeps killing workers:\n{logs()}"
            if worker.proc.poll() is not None:
                dead.append(worker)
                worker = workers.start(settings, f"--pool={pool}", env=env)
            time.sleep(0.3)
        signum = signal.SIGABRT if kind == "ABRT" else signal.SIGSEGV
        if pool == "threads":
            assert [w.proc.returncode for w in dead] == [-signum, -signum], logs()
        else:
            assert dead == [] and worker.proc.poll() is None, logs()
            lost = f"exited with 'signal {int(signum)} ({signum.name})'"
            assert worker.log().count(lost) == 2, logs()
        assert job_status(factory, job_id) == JobStatus.SUCCEEDED, chunk_table(factory, job_id)
        assert_each_item_once(factory, job_id, n)
        rows = _rows(factory, job_id)
        errors = {i: e for i, (_, e) in rows.items() if e is not None}
        assert list(errors) == [poison], errors
        assert "worker process died while reading or classifying this file" in errors[poison]
        assert f"signal {signum.name}" in errors[poison], errors[poison]
        assert all(label is not None for i, (label, _) in rows.items() if i != poison)
        table = chunk_table(factory, job_id)
        assert [s for _, s, _, _ in table] == [ChunkStatus.SUCCEEDED] * n_chunks
        # Chunk 1: the batched run, the one-at-a-time run that died, the one that finished.
        assert [a for _, _, a, _ in table] == [1, 3, 1], table
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
