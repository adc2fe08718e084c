"""Producer side of the scheduler <-> worker boundary.

The scheduler sends tasks **by name** through a Celery app that has no task code registered,
so this module imports neither torch nor ``worker``/``core``. The worker builds its consuming
app from the same :func:`make_celery`, which keeps routing, acknowledgement and broker
options identical on both sides.

Embedded broker (``broker_url`` unset or ``filesystem://``): kombu's filesystem transport
stores each message as one file under ``<data_dir>/broker/queue`` (producers and consumers
use the same folder for ``data_folder_in`` and ``data_folder_out``) and exchange tables under
``<data_dir>/broker/control``. What kombu does with consumed files, and what we add:

* A consumer claims a message by *moving* its file. With ``store_processed=False`` kombu moves
  it into ``tempfile.gettempdir()`` and deletes it after reading. When ``/tmp`` is another
  filesystem that move is copy + unlink, so two workers polling the same folder can both copy
  the file into the same temp path and one can read the other's half-written copy. We
  therefore set ``store_processed=True`` with ``processed_folder`` on the same filesystem
  (``<data_dir>/broker/processed``): the claim is an atomic ``rename`` that exactly one
  consumer wins, and :func:`clean_filesystem_broker` (run periodically by every worker)
  deletes the claimed files once they are old enough to have been read.
* Broadcasts (``celery inspect ping``, ``revoke``) fan out to every queue ever bound to the
  ``celery.pidbox`` exchange, including those of workers that died, and replies can arrive
  after the requester gave up. Those files would pile up forever; the same clean-up deletes
  control/reply/event message files after a grace period. Task queue files (``gpu``, ``cpu``)
  are never deleted: they are the durable job backlog.
* The filesystem transport deletes a message when it is *received*, not when it is acked, so
  ``task_acks_late`` only protects against a warm shutdown (unacked messages are restored
  then). A worker killed with SIGKILL loses its in-flight task; the tasks are idempotent, so
  re-dispatching the job's pending work (``Dispatcher.train``/``classify_chunks`` again) is
  always safe. With Redis, unacked tasks come back after ``visibility_timeout``.
* Message files are named ``<monotonic ms>_<uuid>.<queue>.msg`` and consumed in name order,
  so the queue is FIFO only to the millisecond (chunks sent together run in any order).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery

if TYPE_CHECKING:
    from scheduler.settings import Settings

log = logging.getLogger(__name__)

TRAIN_TASK = "mriq.train"
EVALUATE_TASK = "mriq.evaluate"
CLASSIFY_CHUNK_TASK = "mriq.classify_chunk"
RETRAIN_TASK = "mriq.retrain"
#: Grad-CAM explanation of one prediction (args: job id, item id = the prediction's id).
EXPLAIN_TASK = "mriq.explain"
#: ONNX/TorchScript export of a model version (args: the export job's id).
EXPORT_TASK = "mriq.export"
#: Re-derives a classify job's final status from its chunks (repair after lost messages).
FINALIZE_TASK = "mriq.finalize"
#: Periodic clean-up of the embedded broker's folders (consumed on every worker's own queues).
BROKER_JANITOR_TASK = "mriq.broker_janitor"

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
TASK_QUEUES: tuple[str, ...] = (GPU_QUEUE, CPU_QUEUE)
#: Every task mriq sends, and the queue it goes to (the model's device or the CPU side).
TASK_QUEUE_OF: dict[str, str] = {
    TRAIN_TASK: GPU_QUEUE,
    EVALUATE_TASK: GPU_QUEUE,
    CLASSIFY_CHUNK_TASK: GPU_QUEUE,
    EXPLAIN_TASK: GPU_QUEUE,
    # With the model tasks: the workers that hold the checkpoints run it.
    EXPORT_TASK: GPU_QUEUE,
    RETRAIN_TASK: CPU_QUEUE,
    FINALIZE_TASK: CPU_QUEUE,
    BROKER_JANITOR_TASK: CPU_QUEUE,
}

#: Stamp carried by every task message so ``revoke(job_id)`` can target all of a job's tasks
#: (chunks included) without knowing their ids.
JOB_STAMP = "mriq_job"

FILESYSTEM_SCHEME = "filesystem://"
#: The worker polls the filesystem broker this often; lower means snappier ``inspect ping`` and
#: task pick-up at the price of a ``listdir`` per queue per poll (cheap for our queue sizes).
FILESYSTEM_POLLING_INTERVAL_S = 0.2


def uses_filesystem_broker(settings: Settings) -> bool:
    """Whether tasks go through the embedded filesystem broker (``Settings`` decides)."""
    return settings.is_embedded_broker


def filesystem_broker_folders(settings: Settings) -> dict[str, Path]:
    """The embedded broker's folders (queue, processed, control), created if missing."""
    root = settings.broker_dir
    folders = {
        "queue": root / "queue",
        "processed": root / "processed",
        "control": root / "control",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def _transport_options(settings: Settings) -> dict[str, Any]:
    if uses_filesystem_broker(settings):
        folders = filesystem_broker_folders(settings)
        queue = str(folders["queue"])
        return {
            "data_folder_in": queue,
            "data_folder_out": queue,
            "store_processed": True,  # see the module docstring: atomic same-FS claim
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "polling_interval": FILESYSTEM_POLLING_INTERVAL_S,
        }
    # Redis (and SQS-like) brokers redeliver an unacked message after this many seconds; it
    # must exceed the longest task (training) or the job runs twice concurrently.
    return {"visibility_timeout": settings.visibility_timeout}


def make_celery(settings: Settings, *, main: str = "mriq") -> Celery:
    """A Celery app configured for mriq's queues, with no task code registered."""
    broker = settings.broker_url if not uses_filesystem_broker(settings) else FILESYSTEM_SCHEME
    app = Celery(main, broker=broker, backend=None, set_as_current=False)
    app.conf.update(
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUE_OF.items()},
        task_default_queue=CPU_QUEUE,
        task_create_missing_queues=True,
        # A task is acked only after it returns, so a worker lost mid-task leaves it queued;
        # our tasks are idempotent, so running one twice is safe, losing one is not.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message per worker process: tasks are long (minutes to hours) and a prefetched
        # message would wait behind the running one instead of going to an idle worker.
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results live in SQL (scheduler.repository); Celery's result store would only leak.
        result_backend=None,
        task_ignore_result=True,
        task_track_started=False,
        enable_utc=True,
        timezone="UTC",
        worker_hijack_root_logger=False,
        # Long tasks: do not let a heartbeat-less broker connection cancel them.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def _task_id(kind: str, job_id: int, chunk_index: int | None = None) -> str:
    # Readable ids ("mriq-classify-12-3-<ns>") make a job's tasks easy to find in Flower. The
    # time suffix keeps a deliberate re-dispatch from colliding with an earlier revoked id;
    # idempotency comes from the tasks, not from the ids.
    suffix = "" if chunk_index is None else f"-{chunk_index}"
    return f"mriq-{kind}-{job_id}{suffix}-{time.time_ns():x}"


#: Seconds a producer waits on one broker socket operation (connect, publish). Without it a
#: broker that stops answering but keeps the TCP connection (a hung or SIGSTOPped Redis, a
#: dead NAT entry) blocks ``send_task`` forever: API request threads pile up, the CLI hangs.
#: A healthy Redis answers in milliseconds, so this only bounds the hung case.
PRODUCER_SOCKET_TIMEOUT_S = 5.0
#: Publish retries of a producer (Celery's default is 3): with the timeout above a hung
#: broker fails a submission after about 20 s (each retry reconnects, and the new
#: connection's handshake times out too).
PRODUCER_PUBLISH_RETRIES = 2


def _bound_producer(app: Celery, settings: Settings) -> None:
    """Timeouts for a producer-only app (the worker's consuming app keeps its own)."""
    if uses_filesystem_broker(settings):
        return  # local files: no socket to hang on
    options = dict(app.conf.broker_transport_options or {})
    options.setdefault("socket_timeout", PRODUCER_SOCKET_TIMEOUT_S)
    options.setdefault("socket_connect_timeout", PRODUCER_SOCKET_TIMEOUT_S)
    app.conf.broker_transport_options = options
    policy = dict(app.conf.task_publish_retry_policy or {})
    policy["max_retries"] = PRODUCER_PUBLISH_RETRIES
    app.conf.task_publish_retry_policy = policy


class Dispatcher:
    """Sends mriq tasks by name; one per process is enough (it pools broker connections).

    Built from settings (the API, the CLI, the worker's recovery sweep), its broker socket
    operations are bounded (:data:`PRODUCER_SOCKET_TIMEOUT_S`), so a hung broker fails a
    submission instead of blocking it; an ``app`` passed in is used as it is.
    """

    def __init__(self, settings: Settings, *, app: Celery | None = None) -> None:
        self.settings = settings
        if app is None:
            app = make_celery(settings)
            _bound_producer(app, settings)
        self.app = app

    def _send(self, name: str, args: list[Any], job_id: int, task_id: str) -> str:
        self.app.send_task(
            name,
            args=args,
            task_id=task_id,
            stamped_headers=[JOB_STAMP],
            **{JOB_STAMP: str(job_id)},
        )
        return task_id

    def train(self, job_id: int) -> str:
        return self._send(TRAIN_TASK, [job_id], job_id, _task_id("train", job_id))

    def evaluate(self, job_id: int) -> str:
        return self._send(EVALUATE_TASK, [job_id], job_id, _task_id("evaluate", job_id))

    def classify_chunks(self, job_id: int, chunk_indices: Iterable[int]) -> list[str]:
        """One task per chunk; all sent over one pooled connection."""
        ids: list[str] = []
        with self.app.producer_or_acquire() as producer:
            for index in chunk_indices:
                task_id = _task_id("classify", job_id, int(index))
                self.app.send_task(
                    CLASSIFY_CHUNK_TASK,
                    args=[job_id, int(index)],
                    task_id=task_id,
                    producer=producer,
                    stamped_headers=[JOB_STAMP],
                    **{JOB_STAMP: str(job_id)},
                )
                ids.append(task_id)
        return ids

    def explain(self, job_id: int, item_id: int) -> str:
        """Ask a worker to explain one prediction (see :mod:`scheduler.explanations`)."""
        return self._send(EXPLAIN_TASK, [job_id, item_id], job_id,
                          _task_id("explain", job_id, item_id))

    def export(self, job_id: int) -> str:
        return self._send(EXPORT_TASK, [job_id], job_id, _task_id("export", job_id))

    def finalize(self, job_id: int) -> str:
        return self._send(FINALIZE_TASK, [job_id], job_id, _task_id("finalize", job_id))

    def retrain(self) -> str:
        """Trigger the periodic retraining task now (what beat sends on its schedule)."""
        task_id = f"mriq-retrain-{time.time_ns():x}"
        self.app.send_task(RETRAIN_TASK, args=[], task_id=task_id)
        return task_id

    def revoke(self, job_id: int) -> bool:
        """Best effort: tell live workers to drop the job's queued tasks.

        Cancellation proper goes through the database (``request_cancel``); tasks check it
        between batches/epochs. This only saves workers from picking up doomed messages.
        Returns False when the broadcast could not be sent.
        """
        try:
            self.app.control.revoke_by_stamped_headers({JOB_STAMP: [str(job_id)]})
        except Exception as exc:  # broker down: cancellation still works through SQL
            log.warning("revoke of job %s not broadcast: %s", job_id, exc)
            return False
        return True

    def workers_alive(self, timeout: float = 1.0) -> bool:
        """True when at least one worker answers ``celery inspect ping`` within ``timeout``.

        Returns as soon as the first reply arrives. On the filesystem broker a worker polls
        every 0.2 s, so a 1 s timeout is enough for an idle worker; a worker busy in a task
        under the solo pool answers only between tasks (use a longer timeout, or check the
        jobs' progress, before concluding that no worker runs).
        """
        return bool(self.ping(timeout=timeout, limit=1))

    def ping(self, timeout: float = 1.0, *, limit: int | None = None) -> dict[str, Any]:
        """Replies of ``inspect ping`` keyed by worker hostname (empty when none answered);
        ``limit`` stops waiting after that many replies."""
        try:
            replies = self.app.control.inspect(timeout=timeout, limit=limit).ping()
        except Exception as exc:  # an unreachable broker means no reachable worker
            log.debug("ping failed: %s", exc)
            return {}
        return dict(replies or {})

    def queue_size(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` (not counting ones a worker holds unacked); 0 for a
        queue that does not exist yet; None when the broker cannot be asked. The worker's
        recovery sweep re-sends pending work only into an empty queue (worker/recovery.py)."""
        from kombu.exceptions import ChannelError

        try:
            with self.app.connection_for_write() as conn:
                channel = conn.channel()
                try:
                    _, count, _ = channel.queue_declare(queue=queue, passive=True)
                except ChannelError:  # never declared (or Redis dropped the empty list)
                    return 0
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
                return int(count)
        except Exception as exc:
            log.debug("queue size of %s unknown: %s", queue, exc)
            return None

    def close(self) -> None:
        self.app.close()


def clean_filesystem_broker(
    settings: Settings,
    *,
    processed_age_s: float = 60.0,
    stale_age_s: float = 600.0,
    now: float | None = None,
) -> int:
    """Delete the embedded broker's consumed and stale message files; returns the count.

    * ``processed/``: claimed messages. The age is the file's ctime, which the claiming
      ``rename`` refreshes, so a consumer has had ``processed_age_s`` to read it.
    * ``queue/``: messages for non-task queues (pidbox broadcasts to dead workers, late
      replies, events for a Flower that went away) older than ``stale_age_s``.
    Messages on the task queues are never deleted. No-op for other brokers.
    """
    if not uses_filesystem_broker(settings):
        return 0
    folders = filesystem_broker_folders(settings)
    now = time.time() if now is None else now
    removed = 0
    task_suffixes = tuple(f".{q}.msg" for q in TASK_QUEUES)
    for folder, max_age, keep in (
        (folders["processed"], processed_age_s, ()),
        (folders["queue"], stale_age_s, task_suffixes),
    ):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.name
            if not name.endswith(".msg"):
                continue
            # Filenames are "<ms>_<uuid>.<queue>.msg"; the queue is after the first dot.
            if keep and ("." + name.partition(".")[2]) in keep:
                continue
            try:
                if now - entry.stat().st_ctime < max_age:
                    continue
                os.remove(entry.path)
                removed += 1
            except FileNotFoundError:
                continue  # another worker's janitor got there first
    return removed
