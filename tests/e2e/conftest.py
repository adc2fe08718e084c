"""Helpers for the end-to-end tests: the real ``mriq`` CLI, real services, real processes.

Every command is a subprocess of the installed CLI (``python -m scheduler``, the same code as
``.venv/bin/mriq``) with ``MRIQ_*`` settings in its environment, exactly as an operator runs
it. Long-running processes (worker, Flower, API) are started in a session of their own and
stopped in fixture finalizers (SIGTERM to their process group, SIGKILL after a grace period),
whatever the test did. The services flow owns Redis database 12 (flushed before and after)
and a fresh PostgreSQL database (dropped with FORCE afterwards).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

REPO = Path(__file__).resolve().parents[2]
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DB = "test"
REDIS_HOST = "127.0.0.1"
#: Parallel developers give each run a private redis-server through this variable.
REDIS_PORT = int(os.environ.get("MRIQ_TEST_REDIS_PORT", "6379"))
#: The e2e suite's own Redis database (worker tests use 13, benchmarks 11).
REDIS_DB = 12
#: Upper bound for one CLI command that waits for a job (a 1-epoch resnet18 at 32 px
#: trains in ~10 s on 2 idle cores; other suites may be loading the machine).
COMMAND_TIMEOUT_S = 240.0


def mriq_argv(*args: str) -> list[str]:
    """argv running the ``mriq`` console script of this interpreter's environment."""
    return [sys.executable, "-m", "scheduler", *args]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without stray MRIQ_*/FLOWER_* settings, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MRIQ_", "FLOWER_"))
    }
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) if not path else f"{REPO}{os.pathsep}{path}"
    # Rich tables are wide and unwrapped when piped; tests read them.
    env["COLUMNS"] = "240"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.25, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------
# long-running processes


@dataclass
class Service:
    """A started subprocess with its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM (a warm shutdown for a worker) to its process group, then SIGKILL."""
        if self.proc.poll() is not None:
            return
        with _suppress_lookup():
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with _suppress_lookup():
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ProcessLookupError)


@dataclass
class Services:
    """Starts processes and stops every one of them at the end (LIFO)."""

    log_dir: Path
    started: list[Service] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> Service:
        log_path = self.log_dir / f"{name}-{len(self.started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                list(argv),
                cwd=str(cwd),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own process group: stop() signals the process and anything it forked.
                start_new_session=True,
            )
        service = Service(name, proc, log_path)
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    group = Services(tmp_path_factory.mktemp("logs"))
    try:
        yield group
    finally:
        group.stop_all()


# --------------------------------------------------------------------------------------
# CLI


@dataclass(frozen=True)
class CliResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.stdout)

    def describe(self) -> str:
        return (
            f"$ mriq {' '.join(self.argv[3:])}\nexit {self.returncode} after "
            f"{self.seconds:.1f} s\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n"
            f"{self.stderr[-3000:]}"
        )


@dataclass
class Cli:
    """Runs ``mriq`` subprocesses with one fixed MRIQ_* environment."""

    env: dict[str, str]
    cwd: Path

    def run(
        self,
        *args: str,
        expect: int | None = 0,
        timeout: float = COMMAND_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> CliResult:
        argv = mriq_argv(*args)
        started = time.monotonic()
        proc = subprocess.run(
            argv,
            cwd=str(self.cwd),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        result = CliResult(argv, proc.returncode, proc.stdout, proc.stderr,
                           time.monotonic() - started)
        if expect is not None:
            assert result.returncode == expect, result.describe()
        return result


# --------------------------------------------------------------------------------------
# PostgreSQL and Redis owned by the e2e suite


def _pg_admin() -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_ADMIN_DB, autocommit=True
    )


@pytest.fixture(scope="module")
def e2e_postgres_url() -> Iterator[str]:
    """A fresh, empty (unmigrated) PostgreSQL database for one test module."""
    name = f"mriq_e2e_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def e2e_redis_url() -> Iterator[str]:
    """Redis database 12, emptied before and after (it belongs to this suite alone)."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    finally:
        client.flushdb()
        client.close()


# --------------------------------------------------------------------------------------
# data


def synthesise(out: Path, *, per_folder: int, seed: int, size: tuple[int, int] = (40, 64)) -> Path:
    """A small labelled data set in the 44-folder layout, via ``python -m core.synth``."""
    subprocess.run(
        [sys.executable, "-m", "core.synth", "--out", str(out), "--per-folder", str(per_folder),
         "--seed", str(seed), "--size-min", str(size[0]), "--size-max", str(size[1])],
        check=True,
        capture_output=True,
        env=clean_env({}),
        timeout=300,
    )
    return out


def write_inbox(folder: Path, n_good: int, *, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """``n_good`` small grayscale PNG/JPEG files and a handful of broken image files.

    The broken ones carry image suffixes, so folder expansion picks them up: an empty file,
    text renamed to .png, a truncated PNG, JPEG magic followed by garbage, and a 2x2 image
    (below the reader's minimum side).
    """
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    good: list[Path] = []
    for i in range(n_good):
        sub = folder / f"batch{i % 4}"
        sub.mkdir(exist_ok=True)
        arr = (rng.random((int(rng.integers(36, 64)), int(rng.integers(36, 64)))) * 255)
        suffix = ".png" if i % 2 == 0 else ".jpg"
        path = sub / f"img_{i:04d}{suffix}"
        Image.fromarray(arr.astype("uint8"), mode="L").save(path)
        good.append(path)
    png = (good[0]).read_bytes()
    broken_bytes = {
        "broken_empty.png": b"",
        "broken_text.png": b"this is not an image\n" * 8,
        "broken_truncated.png": png[: len(png) // 3],
        "broken_garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 400, dtype="uint8")),
    }
    broken: list[Path] = []
    for i, (name, data) in enumerate(broken_bytes.items()):
        path = folder / f"batch{i % 4}" / name
        path.write_bytes(data)
        broken.append(path)
    tiny = folder / "batch0" / "broken_tiny.png"
    Image.fromarray(np.zeros((2, 2), dtype="uint8"), mode="L").save(tiny)
    broken.append(tiny)
    return good, broken
