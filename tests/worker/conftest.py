"""Fixtures for worker tests: tiny checkpoints, image folders and real worker processes.

Worker processes are real ``python -m worker`` subprocesses on the real brokers (the
filesystem transport, or Redis on 127.0.0.1:6379 in a database number of its own) and real
databases (SQLite files, or a fresh PostgreSQL database from ``tests/conftest.py``). Every
started process is terminated in the fixture's finalizer, whatever the test did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.dispatch import Dispatcher
from scheduler.schema import ModelVersion
from scheduler.settings import Settings

REPO = Path(__file__).resolve().parents[2]
REDIS_HOST = "127.0.0.1"
#: Parallel developers give each run a private redis-server through this variable.
REDIS_PORT = int(os.environ.get("MRIQ_TEST_REDIS_PORT", "6379"))
#: Worker tests use their own Redis database so they never see other suites' queues.
REDIS_DB = 13
#: A worker must answer ping within this many seconds of being spawned.
WORKER_START_TIMEOUT_S = 60.0
IMAGE_SIZE = 32


@dataclass(frozen=True)
class TinyModel:
    path: Path
    sha256: str
    classes: tuple[str, ...]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """An untrained resnet18 over the 15 classes at 32 px (fast on 2 cores)."""
    import torch

    from core.checkpoint import CheckpointMeta, save_checkpoint
    from core.labels import classes_for
    from core.models import build_model
    from core.transforms import PresetParams

    torch.manual_seed(0)
    classes = tuple(classes_for("15"))
    model = build_model("resnet18", len(classes), weights="none")
    meta = CheckpointMeta(
        arch="resnet18",
        classes=classes,
        label_mode="15",
        preset=PresetParams(image_size=IMAGE_SIZE, crop="none"),
    )
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    sha = save_checkpoint(path, model=model, meta=meta)
    return TinyModel(path=path, sha256=sha, classes=classes)


def register_tiny_model(
    session: Session,
    model: TinyModel,
    *,
    training_job_id: int | None = None,
    checkpoint_sha256: str | None = None,
) -> ModelVersion:
    """``model`` as a model version (in the caller's transaction); ``checkpoint_sha256``
    overrides the file's own, for tests of a tampered checkpoint."""
    return repository.register_model_version(
        session,
        training_job_id=training_job_id,
        arch="resnet18",
        label_mode="15",
        classes=list(model.classes),
        checkpoint_path=str(model.path),
        checkpoint_sha256=checkpoint_sha256 or model.sha256,
        metrics={},
    )


def write_images(folder: Path, n_good: int, *, broken: int = 0, seed: int = 0) -> list[Path]:
    """``n_good`` small grayscale PNG/JPEGs plus ``broken`` unreadable files, interleaved."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for i in range(n_good):
        arr = (rng.random((48, 40)) * 255).astype("uint8")
        suffix = ".png" if i % 2 == 0 else ".jpg"
        path = folder / f"img_{i:03d}{suffix}"
        Image.fromarray(arr, mode="L").save(path)
        paths.append(path)
    for j in range(broken):
        path = folder / f"broken_{j}.png"
        # One empty file, then files with a PNG name but garbage bytes.
        path.write_bytes(b"" if j == 0 else b"this is not an image" * 10)
        # Spread the broken files over the chunks rather than leaving them at the end.
        paths.insert((j + 1) * len(paths) // (broken + 1), path)
    return paths


def redis_url() -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


@pytest.fixture
def redis_broker() -> Iterator[str]:
    """The worker tests' Redis database, emptied before and after (it is theirs alone)."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    try:
        yield redis_url()
    finally:
        client.flushdb()
        client.close()


def make_settings(tmp_path: Path, *, database_url: str, broker_url: str | None) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url=broker_url,
        data_roots=(tmp_path,),
        chunk_size=16,
        task_max_retries=2,
    )


def migrated_factory(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_session_factory(make_engine(url))


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    hostname: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _stop(worker: WorkerProcess) -> None:
    if worker.proc.poll() is not None:
        return
    worker.proc.send_signal(signal.SIGTERM)  # warm shutdown: unacked messages restored
    try:
        worker.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.proc.kill()
        worker.proc.wait(timeout=10)


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}
    env.update(
        MRIQ_DATA_DIR=str(settings.data_dir),
        MRIQ_DATABASE_URL=str(settings.database_url),
        MRIQ_CHUNK_SIZE=str(settings.chunk_size),
        MRIQ_TASK_MAX_RETRIES=str(settings.task_max_retries),
        MRIQ_DATA_ROOTS=os.pathsep.join(str(r) for r in settings.data_roots),
        MRIQ_DEFAULT_DEVICE="cpu",
        PYTHONPATH=str(REPO),
    )
    if settings.broker_url is not None:
        env["MRIQ_BROKER_URL"] = settings.broker_url
    if settings.runtime != "torch":
        env["MRIQ_RUNTIME"] = settings.runtime
    return env


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """``start_worker(settings, *extra_args)``: spawn ``python -m worker`` and wait for ping."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, *extra: str, wait: bool = True) -> WorkerProcess:
        # Workers refuse an unmigrated database; migrating is idempotent.
        upgrade(str(settings.resolved_database_url))
        hostname = f"test-{uuid.uuid4().hex[:8]}@localhost"
        log_path = tmp_path / f"worker-{len(started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "--hostname", hostname, *extra],
                cwd=str(tmp_path),
                env=worker_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProcess(proc=proc, log_path=log_path, hostname=hostname)
        started.append(worker)
        if wait:
            wait_for_ping(settings, worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            _stop(worker)


def wait_for_ping(
    settings: Settings, worker: WorkerProcess, *, timeout: float = WORKER_START_TIMEOUT_S
) -> None:
    """Wait until ``worker`` (anything with ``proc``, ``hostname`` and ``log()``) answers ping."""
    dispatcher = Dispatcher(settings)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {worker.proc.returncode}:\n{worker.log()}"
                )
            if worker.hostname in dispatcher.ping(timeout=1.0):
                return
        raise AssertionError(f"worker did not answer ping:\n{worker.log()}")
    finally:
        dispatcher.close()


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.25, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
