"""Fault-injection fixtures: private Redis/PostgreSQL servers, killable worker processes.

Rule: a test that stops, kills or restarts a service runs its *own* instance on a free port
(``own_redis``, ``own_postgres``) and never touches the shared ones. Every fault test here
uses a private ``redis-server`` (cheap: milliseconds to start), so none can see another
suite's queues; databases are fresh PostgreSQL databases on the shared server
(``postgres_url`` from tests/conftest.py) unless the test restarts PostgreSQL.

Workers are real ``python -m worker`` processes with fast recovery knobs (heartbeat 0.5 s,
dead after 3 s, stale after 3 s, sweep every 1 s; see worker/recovery.py). Tests about the
production knobs pass ``--stale-after=300`` (later flags win).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import ChunkStatus, JobKind, JobStatus
from scheduler.settings import Settings
from tests.worker.conftest import (  # noqa: F401  (fixture re-exported for this package)
    TinyModel,
    tiny_model,
    wait_until,
    worker_env,
)
from tests.worker.conftest import wait_for_ping as _wait_for_ping

RECOVERY_ARGS: tuple[str, ...] = (
    "--heartbeat-interval=0.5",
    "--dead-after=3",
    "--stale-after=3",
    "--recovery-interval=1",
)
WORKER_START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 150.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        # No persistence: a restart loses every queued message, the harshest case.
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            time.sleep(0.05)
        raise AssertionError(f"redis-server on {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"PostgreSQL binary {name} not found")
    return path


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; the server files then belong to the postgres user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class PostgresServer:
    port: int
    datadir: Path
    sockdir: Path
    logfile: Path
    running: bool = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mriq"

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.datadir), *args]),
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        self.pg_ctl(
            "-o",
            f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1",
            "-l",
            str(self.logfile),
            "-w",
            "start",
        )
        self.running = True

    def stop(self) -> None:
        # fast: terminate sessions (what a crash/restart looks like to the clients).
        self.pg_ctl("-m", "fast", "-w", "stop")
        self.running = False

    def is_up(self) -> bool:
        """Whether the server process runs (it shuts itself down on some faults)."""
        status = subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.datadir), "status"]),
            timeout=30,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return status.returncode == 0


@contextlib.contextmanager
def private_postgres(root: Path) -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster under ``root`` (e.g. a small tmpfs), with database mriq."""
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = PostgresServer(
        port=free_port(),
        datadir=root / "data",
        sockdir=root,
        logfile=root / "postgres.log",
    )
    subprocess.run(
        _as_postgres(
            [
                _pg_bin("initdb"),
                "-D",
                str(server.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ]
        ),
        check=True,
        timeout=120,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server.start()
    try:
        subprocess.run(
            [
                _pg_bin("createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(server.port),
                "-U",
                "postgres",
                "mriq",
            ],
            check=True,
            timeout=60,
        )
        yield server
    finally:
        if server.running:
            with contextlib.suppress(Exception):
                server.pg_ctl("-m", "immediate", "-w", "stop")


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="mriq-pg-", dir="/tmp"))
    try:
        with private_postgres(root) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- workers


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log_path: Path
    hostname: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL the worker and its pool children (nothing gets to clean up)."""
        for pid in [*children(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill9()


def children(pid: int) -> list[int]:
    """Direct child pids (Linux /proc)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out.extend(int(x) for x in text.split())
    return out


@dataclass
class Workers:
    tmp_path: Path
    started: list[Worker] = field(default_factory=list)

    def start(
        self,
        settings: Settings,
        *extra: str,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
        wait: bool = True,
        hostname: str | None = None,
    ) -> Worker:
        # A given hostname stands for a restarted worker (same node name, new process).
        hostname = hostname or f"fault-{uuid.uuid4().hex[:8]}@localhost"
        log_path = self.tmp_path / f"worker-{len(self.started)}.log"
        full_env = worker_env(settings)
        full_env.update(env or {})
        cmd = [
            *wrapper,
            sys.executable,
            "-m",
            "worker",
            "--hostname",
            hostname,
            *RECOVERY_ARGS,
            *extra,
        ]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=str(self.tmp_path), env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        worker = Worker(proc=proc, log_path=log_path, hostname=hostname)
        self.started.append(worker)
        if wait:
            wait_for_ping(settings, worker)
        return worker


def wait_for_ping(settings: Settings, worker: Worker) -> None:
    # Fault workers start under heavier load (own servers, cgroups): a longer start budget.
    _wait_for_ping(settings, worker, timeout=WORKER_START_TIMEOUT_S)  # type: ignore[arg-type]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        for worker in pool.started:
            worker.stop()


# --------------------------------------------------------------------------- jobs


def fault_settings(
    tmp_path: Path, *, database_url: str, broker_url: str, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "broker_url": broker_url,
        "data_roots": (tmp_path,),
        "chunk_size": 16,
        "task_max_retries": 2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def fault_env(settings: Settings) -> dict[str, str]:
    """Settings the worker needs beyond tests.worker.conftest.worker_env."""
    return {
        "MRIQ_CHUNK_TIME_LIMIT": str(settings.chunk_time_limit),
        "MRIQ_CHUNK_STALL_TIMEOUT": str(settings.chunk_stall_timeout),
    }


def write_small_images(folder: Path, n: int, *, size: int = 32, seed: int = 0) -> list[Path]:
    """``n`` tiny grayscale PNGs (cheap to write and to classify)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:05d}.png"
        Image.fromarray((rng.random((size, size)) * 255).astype("uint8"), mode="L").save(path)
        paths.append(path)
    return paths


def register_model(
    factory: sessionmaker[Session], model: TinyModel, path: Path | None = None
) -> int:
    with factory.begin() as session:
        version = repository.register_model_version(
            session,
            training_job_id=None,
            arch="resnet18",
            label_mode="15",
            classes=list(model.classes),
            checkpoint_path=str(path or model.path),
            checkpoint_sha256=model.sha256,
            metrics={},
        )
        return int(version.id)


def create_classify_job(
    factory: sessionmaker[Session],
    model_version_id: int,
    paths: Sequence[Path],
    *,
    chunk_size: int,
    batch_size: int = 8,
) -> tuple[int, int]:
    with factory.begin() as session:
        job = repository.create_job(
            session,
            kind=JobKind.CLASSIFY,
            params={"top_k": 3, "count": len(paths), "batch_size": batch_size},
            model_version_id=model_version_id,
        )
        job_id = int(job.id)
        repository.add_job_items(session, job_id, [str(p) for p in paths], chunk_size=chunk_size)
        n_chunks = len(repository.list_chunks(session, job_id))
    return job_id, n_chunks


def job_status(factory: sessionmaker[Session], job_id: int) -> JobStatus:
    with factory() as session:
        return JobStatus(repository.get_job(session, job_id).status)


def count_rows(factory: sessionmaker[Session], job_id: int) -> int:
    with factory() as session:
        return repository.count_predictions(session, job_id)


def chunk_workers(factory: sessionmaker[Session], job_id: int) -> dict[int, tuple[str | None, int]]:
    """chunk index -> (worker that last claimed it, abandons)."""
    with factory() as session:
        return {
            c.chunk_index: (c.worker, int(c.abandons))
            for c in repository.list_chunks(session, job_id)
        }


def chunk_table(
    factory: sessionmaker[Session], job_id: int
) -> list[tuple[int, ChunkStatus, int, str | None]]:
    with factory() as session:
        return [
            (c.chunk_index, ChunkStatus(c.status), int(c.attempts), c.error)
            for c in repository.list_chunks(session, job_id)
        ]


def item_indices(factory: sessionmaker[Session], job_id: int) -> list[int]:
    with factory() as session:
        return [r.item_index for r in repository.iter_predictions(session, job_id)]


def wait_job_done(
    factory: sessionmaker[Session],
    job_id: int,
    logs: Callable[[], str],
    timeout: float = JOB_TIMEOUT_S,
) -> JobStatus:
    wait_until(
        lambda: job_status(factory, job_id).is_terminal,
        timeout=timeout,
        interval=0.3,
        what=f"job {job_id} to finish; chunks {chunk_table(factory, job_id)}; logs:\n{logs()}",
    )
    return job_status(factory, job_id)


def assert_each_item_once(factory: sessionmaker[Session], job_id: int, n_items: int) -> None:
    """Exactly one prediction row per item: none missing (count), none twice (unique key and
    the listing), in item order."""
    assert item_indices(factory, job_id) == list(range(n_items))
    assert count_rows(factory, job_id) == n_items


# --------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    """A private tmpfs of ``size`` (mount's syntax, e.g. "100m"): a disk that fills up.

    Needs root (CI runs as root); elsewhere the test is skipped, not faked.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = Path(tempfile.mkdtemp(prefix="mriq-full-", dir="/tmp"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        root.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        # Lazy: a worker that has not quite exited must not keep the mount alive.
        subprocess.run(["umount", "-l", str(root)], check=False, timeout=30)
        with contextlib.suppress(OSError):
            root.rmdir()


def fill_disk(disk: Path, leave: int) -> None:
    """Fill ``disk`` to the last byte, then free ``leave`` bytes of it."""
    filler = disk / "filler"
    block = b"\0" * (1 << 16)
    with filler.open("wb") as fh, pytest.raises(OSError, match="No space left"):
        while True:
            fh.write(block)
            fh.flush()
    size = filler.stat().st_size
    with filler.open("r+b") as fh:
        fh.truncate(max(0, size - leave))
