"""Redis, PostgreSQL and worker processes for the end-to-end and SQL benchmarks.

Every benchmark that touches PostgreSQL gets a database of its own (created, migrated,
dropped with ``FORCE`` afterwards) so it never sees, or leaves, anyone else's rows, and uses
a Redis database number of its own (emptied before and after). When a piece is missing the
helpers return the reason instead of raising, and the scripts print ``skipped: <reason>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import child_env

#: Redis database the benchmarks own (the test suites use 13 and 15).
DEFAULT_REDIS_DB = 11
WORKER_START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class ServiceArgs:
    pg_host: str
    pg_port: int
    pg_user: str
    pg_admin_db: str
    redis_host: str
    redis_port: int
    redis_db: int

    # One keyword per field (duplicates pairs it by shape with core/train.py's
    # config_from_args): two different mappings, no logic shared.
    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServiceArgs:
        return cls(
            pg_host=args.pg_host,
            pg_port=args.pg_port,
            pg_user=args.pg_user,
            pg_admin_db=args.pg_admin_db,
            redis_host=args.redis_host,
            redis_port=args.redis_port,
            redis_db=args.redis_db,
        )

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://{self.pg_user}@{self.pg_host}:{self.pg_port}/{name}"


def add_service_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("services (PostgreSQL, Redis)")
    group.add_argument("--pg-host", default="127.0.0.1")
    group.add_argument("--pg-port", type=int, default=5432)
    group.add_argument("--pg-user", default="postgres")
    group.add_argument(
        "--pg-admin-db",
        default="postgres",
        help="database to connect to for CREATE/DROP DATABASE (%(default)s)",
    )
    group.add_argument("--redis-host", default="127.0.0.1")
    group.add_argument("--redis-port", type=int, default=6379)
    group.add_argument(
        "--redis-db",
        type=int,
        default=DEFAULT_REDIS_DB,
        help="Redis database number the benchmark owns and empties (%(default)s)",
    )


def missing_modules(*names: str) -> str | None:
    """The reason the named modules cannot be imported, or None when they all can."""
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                return f"module {name} not found"
        except (ImportError, ValueError) as exc:
            return f"module {name} not importable: {exc}"
    return None


def _pg_admin(svc: ServiceArgs) -> Any:
    import psycopg

    return psycopg.connect(
        host=svc.pg_host,
        port=svc.pg_port,
        user=svc.pg_user,
        dbname=svc.pg_admin_db,
        autocommit=True,
        connect_timeout=5,
    )


def postgres_problem(svc: ServiceArgs) -> str | None:
    """Why PostgreSQL cannot be used, or None."""
    try:
        with _pg_admin(svc) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return (
            f"PostgreSQL at {svc.pg_host}:{svc.pg_port} unavailable ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        )
    return None


def redis_problem(svc: ServiceArgs) -> str | None:
    """Why Redis cannot be used, or None."""
    try:
        import redis

        client = redis.Redis(
            host=svc.redis_host, port=svc.redis_port, db=svc.redis_db, socket_connect_timeout=3
        )
        client.ping()
        client.close()
    except Exception as exc:
        return f"Redis at {svc.redis_host}:{svc.redis_port} unavailable ({type(exc).__name__})"
    return None


@contextmanager
def fresh_database(svc: ServiceArgs, *, migrate: bool = True) -> Iterator[str]:
    """A new, migrated PostgreSQL database for this run; its SQLAlchemy URL. Dropped after."""
    name = f"mriq_bench_{uuid.uuid4().hex[:10]}"
    with _pg_admin(svc) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = svc.database_url(name)
    try:
        if migrate:
            from scheduler.database import upgrade

            upgrade(url)
        yield url
    finally:
        with _pg_admin(svc) as conn:
            # FORCE: a worker or engine that still holds a connection must not leak the db.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def owned_redis_db(svc: ServiceArgs) -> Iterator[str]:
    """The benchmark's Redis database, emptied before and after; yields its URL."""
    import redis

    client = redis.Redis(host=svc.redis_host, port=svc.redis_port, db=svc.redis_db)
    client.flushdb()
    try:
        yield svc.redis_url
    finally:
        client.flushdb()
        client.close()


def mriq_env(
    *,
    data_dir: Path,
    database_url: str,
    broker_url: str | None,
    roots: Path,
    chunk_size: int,
    device: str,
    inference_streams: int | None = None,
    runtime: str | None = None,
) -> dict[str, str]:
    """The MRIQ_* environment the worker and the ``mriq`` CLI of a run share."""
    extra = {
        "MRIQ_DATA_DIR": str(data_dir),
        "MRIQ_DATABASE_URL": database_url,
        "MRIQ_DATA_ROOTS": str(roots),
        "MRIQ_CHUNK_SIZE": str(chunk_size),
        # settings.default_device accepts auto/cpu/cuda; an index goes via CUDA_VISIBLE_DEVICES.
        "MRIQ_DEFAULT_DEVICE": "cuda" if device.startswith("cuda") else "cpu",
        "MRIQ_LOG_LEVEL": "WARNING",
    }
    if broker_url is not None:
        extra["MRIQ_BROKER_URL"] = broker_url
    if inference_streams is not None:
        extra["MRIQ_INFERENCE_STREAMS"] = str(inference_streams)
    if runtime is not None:
        extra["MRIQ_RUNTIME"] = runtime  # bench.runtime: the worker's CPU runtime
    return child_env(extra)


def mriq_command() -> list[str]:
    """``mriq`` from the same environment as this interpreter (falls back to -m)."""
    script = Path(sys.executable).with_name("mriq")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from scheduler.cli import main; main()"]


# tests/e2e/conftest.py's Service has the same log-tail shape (with a name and alive()):
# a benchmark never imports the tests, and the e2e fixtures stay independent of this
# benchmark module; three alike lines are cheaper than that coupling.
@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextmanager
def running_worker(env: dict[str, str], log_path: Path, settings: Any) -> Iterator[WorkerProcess]:
    """``python -m worker --pool solo`` until the block ends; waits until it answers ping.

    The worker re-execs itself with the tuned allocator (same pid), exactly as in production.
    """
    from scheduler.dispatch import Dispatcher

    hostname = f"bench-{uuid.uuid4().hex[:8]}@localhost"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "--pool",
                "solo",
                "--hostname",
                hostname,
                "--loglevel",
                "WARNING",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    worker = WorkerProcess(proc, log_path)
    try:
        dispatcher = Dispatcher(settings)
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not dispatcher.workers_alive(timeout=1.0):
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not answer ping in {WORKER_START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        close = getattr(dispatcher, "close", None)
        if callable(close):
            close()
        yield worker
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
