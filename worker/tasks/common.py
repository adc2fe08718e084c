"""What every task kind shares: its settings, error text, cancellation checks, the per-job
lock and heartbeat, and the crash logging wrapper."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Retry

from scheduler import repository
from scheduler.pathtext import storable_text
from scheduler.schema import JobStatus
from worker import recovery, sessions
from worker.appsettings import settings_of

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from scheduler.schema import Job, ModelVersion
    from scheduler.settings import Settings

log = logging.getLogger(__name__)

#: Cancellation is a SQL read; checking it at most this often keeps it off the hot path.
CANCEL_CHECK_INTERVAL_S = 2.0
#: Longest error text stored in the jobs/chunks tables.
MAX_ERROR_CHARS = 2000


def task_settings(task: Task) -> Settings:
    return settings_of(task.app)


def job_model_version(session: Session, job: Job) -> ModelVersion:
    """The model version ``job`` runs; ValueError when it has none."""
    if job.model_version_id is None:
        raise ValueError(f"{job.kind} job {job.id} has no model version")
    return repository.get_model_version(session, job.model_version_id)


def record_outputs(
    session: Session,
    *,
    job_id: int,
    model_version_id: int,
    dataset: str,
    report: dict[str, Any] | None,
    artifacts: Iterable[tuple[str, Path]],
) -> None:
    """Record a job's evaluation report (when there is one) and its artifact files."""
    if report is not None:
        repository.record_evaluation(
            session,
            job_id=job_id,
            model_version_id=model_version_id,
            dataset=dataset,
            report=report,
        )
    for kind, path in artifacts:
        repository.record_artifact(
            session,
            job_id=job_id,
            kind=kind,
            path=str(path.resolve()),
            model_version_id=model_version_id,
        )


def error_text(exc: BaseException) -> str:
    # storable_text: a message naming a non-UTF-8 file would make the database write fail
    # (PostgreSQL and SQLite reject surrogates) and leave the job running forever.
    text = storable_text(f"{type(exc).__name__}: {exc}")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class CancelCheck:
    """``should_stop`` callback: reads ``is_cancel_requested`` at most every ``interval`` s."""

    def __init__(self, settings: Settings, job_id: int, interval: float = CANCEL_CHECK_INTERVAL_S):
        self._settings = settings
        self._job_id = job_id
        self._interval = interval
        self._last = 0.0
        self.cancelled = False

    def __call__(self) -> bool:
        if self.cancelled:
            return True
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self.cancelled = sessions.with_session(
                self._settings, lambda s: repository.is_cancel_requested(s, self._job_id)
            )
        return self.cancelled

    def force(self) -> bool:
        """Check now, ignoring the interval (e.g. before the last write of a chunk)."""
        self._last = 0.0
        return self()


def finish(settings: Settings, job_id: int, status: JobStatus, error: str | None = None) -> None:
    def fn(session: Session) -> None:
        repository.finish_job(session, job_id, status, error=error)

    sessions.with_session(settings, fn)


def finite(value: float | None) -> float | None:
    # JSON/SQL cannot hold NaN portably; a diverged loss is recorded as missing.
    if value is None:
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


@contextlib.contextmanager
def job_lock(folder: Path) -> Iterator[bool]:
    """Exclusive per-job lock file: yields False when another process holds it.

    A Redis redelivery after ``visibility_timeout`` can hand a still-running training to a
    second worker; two runs writing one out_dir would corrupt last.pt.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".worker.lock", "a+")  # noqa: SIM115 (closed in finally)
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                yield False
                return
            raise
        yield True
    finally:
        fh.close()


@contextlib.contextmanager
def job_heartbeat(task: Task, settings: Settings, job_id: int) -> Iterator[None]:
    """Keep ``<job dir>/.heartbeat`` fresh while a train/evaluate job runs here; a stale one
    tells the recovery sweep this job's worker is gone (worker/recovery.py)."""
    with contextlib.suppress(OSError):
        recovery.touch_job_heartbeat(settings, job_id)
    beat = lambda: recovery.touch_job_heartbeat(settings, job_id)  # noqa: E731
    with recovery.heartbeat(beat, recovery.recovery_of(task.app).heartbeat_s, f"job-{job_id}"):
        yield


def logged(fn: Callable[..., str]) -> Callable[..., str]:
    """``fn`` as a bound task body that logs its traceback when it crashes."""

    def run(self: Task, *args: Any) -> str:
        try:
            return fn(self, *args)
        except Retry:
            raise
        except Exception:
            # Logged with the traceback here because the result backend is disabled.
            log.error("task %s%r crashed:\n%s", self.name, args, traceback.format_exc())
            raise

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run
