"""Recovery of work whose worker died: heartbeats while tasks run, and a periodic sweep.

Why this exists: tasks are acked late, so a worker lost mid-task (SIGKILL, OOM kill, host
gone) leaves its message unacknowledged. Redis hands such a message out again only after
``settings.visibility_timeout`` (12 h by default: it must exceed the longest training), and
the embedded filesystem broker has already deleted it. A broker restarted without
persistence loses every queued message. Without help, such a job would sit in ``running``
for hours or forever.

Mechanism (all tasks are idempotent, so sending one twice is always safe, never lossy):

* **Heartbeats.** While a task runs, a daemon thread in the process that runs it refreshes
  a liveness stamp every ``RecoveryConfig.heartbeat_s``: a classify chunk's
  ``job_chunks.updated_at`` (:func:`scheduler.repository.touch_chunk`), a train/evaluate
  job's ``<data_dir>/jobs/<id>/.heartbeat`` file mtime (the jobs table has no timestamp of
  its own; the job folder is on the storage every worker shares anyway, it holds the
  checkpoints). A process that dies stops heartbeating with it.
* **Sweep.** Every worker runs :func:`sweep` at start-up and then every ``interval_s``
  (a thread in the worker's main process, see ``worker/runtime.py``). A chunk or job is
  *stale* when its stamp is older than ``stale_after_s``:

  - a ``running`` chunk / train / evaluate job with a stale stamp has no live claimant:
    it is sent again (the chunk goes back to ``pending``, so the rule below applies to it
    from then on: no second copy while its message waits behind a backlog);
  - a ``pending`` chunk (or ``queued`` train/evaluate job) with a stale stamp is sent again
    only when its broker queue is **empty**: then no message for it can be waiting (lost
    with a restarted broker, or held unacked by a dead worker). While a backlog is queued
    nothing is re-sent, so the queue never fills with copies.

  Chunks are taken with a compare-and-set on ``updated_at``
  (:func:`scheduler.repository.take_stale_chunks`) inside the transaction that sends them,
  so several workers sweeping at once send each chunk once per stale period. A re-sent
  chunk is claimed again (``attempts += 1``; only items without a prediction are redone);
  a chunk that keeps killing its worker is failed by the attempts cap in
  ``worker.tasks.classify.classify_chunk``. A training re-sent while the first run is in fact alive
  is skipped by the per-job lock in ``worker.tasks.train.train_job``; a re-run of a killed one
  resumes from ``last.pt``.

* **Identity** (what makes recovery take seconds, not the staleness window). A claimed
  chunk records its worker's Celery node name (``job_chunks.worker``). Each sweep:

  - a worker re-sends at once the running chunks held under **its own name** whose last
    stamp predates its own start: its previous incarnation (same ``--hostname``, e.g. the
    container a restart policy brought back) died holding them;
  - it asks ``inspect ping`` which workers answer. A running chunk whose holder does not
    answer and whose heartbeat is older than ``dead_after_s`` (a few heartbeats) is dead
    and re-sent. The ping answers are trusted only when they include this worker's own
    reply (else the broker is away, or this worker is deaf in a solo-pool task) and then
    only the staleness rule above applies;
  - a running chunk held by a worker that **answers** is never re-sent, however old its
    stamp: a slow chunk or a database outage (heartbeats failing) keeps its single run. A
    chunk stuck in a live worker is that worker's to abandon (worker/liveness.py). While
    the answers cannot be trusted, no chunk that names its holder is re-sent for
    staleness either (the staleness rule then only covers chunks claimed by a worker that
    recorded no name).

Knobs (``python -m worker --heartbeat-interval/--dead-after/--stale-after/
--recovery-interval``): ``dead_after_s`` and ``stale_after_s`` must be several heartbeats;
``stale_after_s`` (used only where the holder's liveness is unknown) must also be longer
than a database outage you want to ride out without a (harmless) duplicate run. Node names
must be unique among running workers (Celery warns about duplicates).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler import repository
from scheduler.database import is_retryable
from scheduler.dispatch import GPU_QUEUE, Dispatcher
from scheduler.schema import ChunkStatus, JobKind, JobStatus, utcnow
from worker import sessions
from worker.appsettings import job_dir

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session

    from scheduler.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_FILE = ".heartbeat"


@dataclass(frozen=True)
class RecoveryConfig:
    """Heartbeat period, staleness threshold and sweep period, in seconds."""

    heartbeat_s: float = 10.0
    stale_after_s: float = 300.0
    #: 0 disables the sweep (heartbeats still run, so other workers can recover our work).
    interval_s: float = 15.0
    #: A running chunk whose holder does not answer ping is dead after this long unstamped.
    dead_after_s: float = 30.0
    #: How long a sweep waits for ``inspect ping`` replies.
    ping_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"stale_after_s ({self.stale_after_s}) must be at least two heartbeats "
                f"({2 * self.heartbeat_s}), or live tasks would look dead"
            )
        if self.dead_after_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"dead_after_s ({self.dead_after_s}) must be at least two heartbeats "
                f"({2 * self.heartbeat_s}), or a live worker that misses one heartbeat looks dead"
            )
        if self.interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {self.interval_s}")


DEFAULT_RECOVERY = RecoveryConfig()


def recovery_of(app: Celery) -> RecoveryConfig:
    config = getattr(app.conf, "mriq_recovery", None)
    return config if isinstance(config, RecoveryConfig) else DEFAULT_RECOVERY


# --------------------------------------------------------------------------------------
# Heartbeats
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def heartbeat(beat: Callable[[], object], interval_s: float, name: str) -> Iterator[None]:
    """Call ``beat()`` every ``interval_s`` in a daemon thread while the block runs.

    Failures (database or storage briefly away) are logged and retried at the next beat;
    they must never fail the task itself.
    """
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            try:
                beat()
            except Exception as exc:
                log.warning("heartbeat %s failed: %s: %s", name, type(exc).__name__, exc)

    thread = threading.Thread(target=run, name=f"mriq-heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def job_heartbeat_path(settings: Settings, job_id: int) -> Path:
    return job_dir(settings, job_id) / HEARTBEAT_FILE


def touch_job_heartbeat(settings: Settings, job_id: int) -> None:
    path = job_heartbeat_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    # touch() on an existing file does not always refresh mtime on every filesystem.
    os.utime(path)


def chunk_heartbeat(settings: Settings, job_id: int, chunk_index: int) -> Callable[[], object]:

    def beat() -> bool:
        # One attempt: a failed beat is simply retried at the next interval.
        return sessions.with_session(
            settings, lambda s: repository.touch_chunk(s, job_id, chunk_index), attempts=1
        )

    return beat


# --------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    chunks: tuple[tuple[int, int], ...] = ()
    jobs: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.chunks or self.jobs)


def _open_jobs(settings: Settings) -> list[tuple[int, JobKind, JobStatus, float]]:

    def fn(session: Session) -> list[tuple[int, JobKind, JobStatus, float]]:
        return [
            (
                int(job.id),
                JobKind(job.kind),
                JobStatus(job.status),
                (job.started_at or job.created_at).timestamp(),
            )
            # Jobs being cancelled too: a re-sent chunk of one is marked cancelled by
            # claim_chunk, which lets the job reach ``cancelled`` after all.
            for job in repository.list_open_jobs(session)
        ]

    return sessions.with_session(settings, fn, attempts=1)


@dataclass(frozen=True)
class Identity:
    """Who is sweeping: the worker's node name and when this incarnation started."""

    hostname: str
    started: datetime


def live_workers(
    dispatcher: Dispatcher, identity: Identity | None, timeout: float
) -> set[str] | None:
    """Node names that answer ``inspect ping``; None when the answers cannot be trusted
    (our own reply is missing: broker away, or this worker deaf in a solo-pool task)."""
    if identity is None:
        return None
    live = set(dispatcher.ping(timeout=timeout))
    return live if identity.hostname in live else None


def _take_dead_chunks(
    settings: Settings,
    config: RecoveryConfig,
    dispatcher: Dispatcher,
    identity: Identity | None,
    live: set[str] | None,
) -> list[tuple[int, int, str]]:
    """Re-send running chunks whose holder is known to be dead (module docstring)."""

    if identity is None:
        return []
    dead_before = utcnow() - timedelta(seconds=config.dead_after_s)
    taken: list[tuple[int, int, str]] = []
    running = sessions.with_session(settings, repository.running_chunks, attempts=1)
    for job_id, index, holder, stamp in running:
        if holder is None:
            continue
        if holder == identity.hostname:
            if stamp >= identity.started:
                continue  # claimed by this incarnation: alive
            before, why = identity.started, "held by this worker's previous incarnation"
        elif live is not None and holder not in live:
            if stamp >= dead_before:
                continue
            before, why = dead_before, f"held by {holder}, which does not answer ping"
        else:
            continue

        def take(
            session: Session,
            job_id: int = job_id,
            index: int = index,
            holder: str = holder,
            before: datetime = before,
        ) -> bool:
            won = repository.take_dead_chunk(session, job_id, index, worker=holder, before=before)
            # Sent inside the transaction (as in _resend_stale_chunks): a failed send
            # rolls the take back.
            if won:
                dispatcher.classify_chunks(job_id, [index])
            return won

        if sessions.with_session(settings, take, attempts=1):
            taken.append((job_id, index, why))
    return taken


# Its signature alike by shape to web.queries.filtered_predictions: no logic in common.
def sweep(
    settings: Settings,
    config: RecoveryConfig,
    dispatcher: Dispatcher,
    identity: Identity | None = None,
    *,
    running: bool = True,
) -> SweepResult:
    """Re-send dead or stale work once (see the module docstring); returns what was re-sent.

    ``running=False`` leaves running chunks alone for staleness (see :class:`Sweeper`: right
    after a database outage their stamps are stale because nobody could write them); chunks
    whose holder is known dead by ping or incarnation are still re-sent.
    """

    now = time.time()
    before = utcnow() - timedelta(seconds=config.stale_after_s)
    live = live_workers(dispatcher, identity, config.ping_timeout_s)
    dead = _take_dead_chunks(settings, config, dispatcher, identity, live)
    for job_id, index, why in dead:
        log.warning("recovery: re-sent chunk (%s, %s): %s", job_id, index, why)
    # None (broker unreachable) counts as "not empty": never re-send pending work blind.
    queue_empty = dispatcher.queue_size(GPU_QUEUE) == 0
    chunks: list[tuple[int, int]] = [(j, i) for j, i, _ in dead]
    stale: list[tuple[int, int]] = []
    jobs: list[int] = []
    for job_id, kind, status, started in _open_jobs(settings):
        if kind == JobKind.CLASSIFY:
            if running or queue_empty:
                taken = _resend_stale_chunks(
                    settings, dispatcher, job_id, before, live, running, queue_empty
                )
                stale.extend((job_id, i) for i in taken)
        elif _resend_stale_job(
            settings, config, dispatcher, (job_id, kind, status, started), now, queue_empty
        ):
            jobs.append(job_id)
    if stale or jobs:
        log.warning(
            "recovery: re-sent stale chunks %s and jobs %s (no heartbeat for %.0fs)",
            stale,
            jobs,
            config.stale_after_s,
        )
    return SweepResult(tuple(chunks + stale), tuple(jobs))


def _resend_stale_chunks(
    settings: Settings,
    dispatcher: Dispatcher,
    job_id: int,
    before: datetime,
    live: set[str] | None,
    running: bool,
    queue_empty: bool,
) -> list[int]:
    """Take and re-send the classify job's stale chunks; the indices taken."""

    def take(session: Session) -> list[int]:
        # Running chunks of workers that answer ping are theirs, however stale.
        # Without trusted answers (e.g. the first sweep, before our own pidbox
        # answers) a holder's liveness is unknown: only chunks that name no holder
        # fall back to staleness; the others wait for a sweep that can tell.
        indices: list[int] = []
        if running:
            indices += repository.take_stale_chunks(
                session,
                job_id,
                statuses=[ChunkStatus.RUNNING],
                before=before,
                exclude_workers=live or (),
                unowned_only=live is None,
            )
        if queue_empty:
            indices += repository.take_stale_chunks(
                session, job_id, statuses=[ChunkStatus.PENDING], before=before
            )
        # Sent inside the transaction: if the broker is down the stamps roll back
        # and the next sweep tries again. A commit lost after the send only means
        # a duplicate message, which the tasks absorb.
        if indices:
            dispatcher.classify_chunks(job_id, sorted(indices))
        return sorted(indices)

    return sessions.with_session(settings, take, attempts=1)


def _resend_stale_job(
    settings: Settings,
    config: RecoveryConfig,
    dispatcher: Dispatcher,
    job: tuple[int, JobKind, JobStatus, float],
    now: float,
    queue_empty: bool,
) -> bool:
    """Re-send a train / evaluate job whose heartbeat is stale; True when it was."""
    job_id, kind, status, started = job
    # The heartbeat file is the stamp (started_at before the first beat).
    path = job_heartbeat_path(settings, job_id)
    try:
        stamp = path.stat().st_mtime
    except FileNotFoundError:
        stamp = started
    if stamp >= now - config.stale_after_s:
        return False
    if status == JobStatus.QUEUED and not queue_empty:
        return False
    # Touch first so that this sweep's peers (and our next sweep) wait another period.
    touch_job_heartbeat(settings, job_id)
    if kind == JobKind.TRAIN:
        dispatcher.train(job_id)
    elif kind == JobKind.EXPORT:
        dispatcher.export(job_id)
    else:
        dispatcher.evaluate(job_id)
    return True


class Sweeper:
    """The worker's recovery thread: :func:`sweep` at start-up, then every ``interval_s``.

    A chunk's stamp lives in the database, so a database outage longer than
    ``stale_after_s`` makes every running chunk look dead though its task is alive and
    waiting for the database (``worker.sessions.with_session``). After a sweep failed on a
    database error, running chunks are therefore left alone until a sweep has succeeded
    again and ``stale_after_s`` more have passed: their tasks' heartbeats come back by
    then, and a chunk whose worker really died is re-sent one period later. Re-sending the
    live ones would claim them twice and count outage time as lost workers.
    """

    def __init__(
        self, settings: Settings, config: RecoveryConfig, identity: Identity | None = None
    ) -> None:
        self.settings = settings
        self.config = config
        self.identity = identity
        self._outage = False
        self._quiet_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.config.interval_s <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="mriq-recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        dispatcher = Dispatcher(self.settings)
        try:
            while True:
                running = not self._outage and time.monotonic() >= self._quiet_until
                try:
                    sweep(self.settings, self.config, dispatcher, self.identity, running=running)
                    if self._outage:
                        self._outage = False
                        self._quiet_until = time.monotonic() + self.config.stale_after_s
                except Exception as exc:  # database or broker away: try again next time
                    self._outage = self._outage or is_retryable(exc)
                    log.warning("recovery sweep failed: %s: %s", type(exc).__name__, exc)
                if self._stop.wait(self.config.interval_s):
                    return
        finally:
            with contextlib.suppress(Exception):
                dispatcher.close()
