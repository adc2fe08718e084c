"""``mriq.classify_chunk``: classify one chunk of a classify job, and the hard-time-limit hook.

The chunk's database side (claim, per-batch records, completion, failure) is a
:class:`worker.ledger.ChunkLedger`; this module decides what to do and when.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Task
from celery.exceptions import Retry

from scheduler import repository
from scheduler.database import is_retryable
from scheduler.pathtext import filesystem_path, storable_text
from scheduler.schema import ChunkStatus, utcnow
from scheduler.settings import Settings
from worker import explaining, isolation, liveness, recovery, runtime
from worker.appsettings import job_dir
from worker.ledger import ChunkLedger, ChunkWork, PermanentChunkError
from worker.tasks.common import CancelCheck, error_text, task_settings

if TYPE_CHECKING:
    from core.inference import Predictor

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Retry backoff: countdown = BASE * 2**retries, capped.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 120.0
#: A chunk that missed its deadline is re-sent this many times, then failed with the reason.
MAX_ABANDONS = 1


def retry_countdown(retries: int) -> float:
    return float(min(RETRY_MAX_S, RETRY_BASE_S * (2**retries)))


def batches(it: Iterator[T], n: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def classify_chunk(task: Task, job_id: int, chunk_index: int) -> str:
    """Classify one chunk of a classify job. Returns what happened (for logs/Flower)."""
    settings = task_settings(task)
    ledger = ChunkLedger(settings, job_id, chunk_index)
    try:
        # The node name lets the recovery sweep tell a dead holder from a slow one.
        work = ledger.claim(task.request.hostname)
        if work is None:
            return "skipped: chunk or job already finished"
        return _attempt(task, ledger, work)
    except Retry:
        raise
    except PermanentChunkError as exc:
        return _fail(ledger, str(exc))
    except Exception as exc:
        return _retry_or_fail(task, ledger, exc)


def _attempt(task: Task, ledger: ChunkLedger, work: ChunkWork) -> str:
    """One attempt at a claimed chunk, under its guard, heartbeat and deadline."""
    try:
        # Detects a predecessor that died and sets aside the file it died on.
        with isolation.ChunkGuard(ledger.settings, ledger.job_id, ledger.chunk_index) as guard:
            if guard.busy:
                return "skipped: a live attempt in another worker thread or process runs it"
            work = replace(work, items=guard.set_aside(work.items))
            return _guarded(task, ledger, work, guard)
    except liveness.ChunkAbandoned as exc:
        # Raised by the deadline around _run_chunk, once the guard is released.
        return _abandoned(task, ledger, work, exc)


def _guarded(task: Task, ledger: ChunkLedger, work: ChunkWork, guard: isolation.ChunkGuard) -> str:
    settings = ledger.settings
    job_id, chunk_index = ledger.job_id, ledger.chunk_index
    # attempts counts claims, including ones whose worker died (SIGKILL/OOM) without
    # reaching our retry logic; a chunk that keeps killing workers must end, not loop.
    # A death that identified its file made progress and does not count.
    if work.attempts - guard.set_aside_count > int(settings.task_max_retries) + 1:
        reason = f"gave up after {work.attempts - 1} attempts (worker lost while running)"
        return _fail(ledger, reason)
    if not work.items and work.explain == "none":
        status = ledger.complete(ChunkStatus.SUCCEEDED)
        return f"nothing left to do ({status or 'job running'})"
    # The chunk's updated_at is its heartbeat: if this process dies, it goes stale and
    # a worker's recovery sweep re-sends the chunk (worker/recovery.py).
    beat = recovery.chunk_heartbeat(settings, job_id, chunk_index)
    heartbeat_s = recovery.recovery_of(task.app).heartbeat_s
    with recovery.heartbeat(beat, heartbeat_s, f"{job_id}-{chunk_index}"):
        return liveness.run_with_deadline(
            lambda progress: _run_chunk(ledger, work, progress, guard),
            stall_s=float(settings.chunk_stall_timeout),
            # Prefork children are killed by Celery's own hard limit.
            limit_s=None if runtime.pool_enforces_time_limits() else settings.chunk_time_limit,
            name=f"{job_id}-{chunk_index}",
        )


def _retry_or_fail(task: Task, ledger: ChunkLedger, exc: Exception) -> str:
    settings = ledger.settings
    job_id, chunk_index = ledger.job_id, ledger.chunk_index
    max_retries = int(settings.task_max_retries)
    if is_retryable(exc):
        # The database stayed away longer than db_outage_limit. Nothing about the images
        # is known, so no error rows (nor could they be written): the chunk stays running
        # and the recovery sweep re-sends it once the database is back.
        log.error(
            "chunk %s/%s: database unreachable for over %.0fs; left to the recovery sweep",
            job_id,
            chunk_index,
            settings.db_outage_limit,
        )
        raise exc
    retries = int(task.request.retries or 0)
    if is_permanent(exc) or retries >= max_retries:
        log.exception("chunk %s/%s failed for good", job_id, chunk_index)
        return _fail(ledger, error_text(exc))
    countdown = retry_countdown(retries)
    # Back to pending until the retry is due, so no recovery sweep re-sends it meanwhile.
    with contextlib.suppress(Exception):  # best effort; the retry message is what counts
        ledger.release(utcnow() + timedelta(seconds=countdown))
    log.warning(
        "chunk %s/%s failed (retry %d/%d in %.0fs): %s",
        job_id,
        chunk_index,
        retries + 1,
        max_retries,
        countdown,
        error_text(exc),
    )
    raise task.retry(exc=exc, countdown=countdown, max_retries=max_retries) from exc


def is_permanent(exc: Exception) -> bool:
    """Errors a retry cannot fix: the model version row is gone, or the checkpoint file is
    there but wrong (checksum mismatch, not a checkpoint). A *missing* or unreadable
    checkpoint is retried with backoff: shared storage that is briefly away comes back."""
    from core.checkpoint import CheckpointError

    if isinstance(exc, repository.NotFoundError):
        return True
    if isinstance(exc, CheckpointError):
        return Path(exc.path).is_file()
    return False


def _fail(ledger: ChunkLedger, reason: str) -> str:
    status = ledger.fail(reason)
    return f"failed: {reason} (job {status or 'still running'})"


def _abandoned(
    task: Task, ledger: ChunkLedger, work: ChunkWork, exc: liveness.ChunkAbandoned
) -> str:
    """The chunk missed its deadline (worker/liveness.py): re-send it once, then fail it."""
    abandons = ledger.abandon()
    if abandons == 0:
        return f"abandoned ({exc.reason}); the chunk was no longer running"
    # Batches are recorded in order, so the first unrecorded item is where it got stuck.
    stuck_at = (
        work.items[min(exc.progress_items, len(work.items) - 1)][1]
        if work.items
        else "the explanations"
    )
    reason = (
        f"chunk abandoned after missing its deadline: {exc.reason}; stuck at or after {stuck_at}"
    )
    job_id, chunk_index = ledger.job_id, ledger.chunk_index
    if abandons > MAX_ABANDONS:
        log.error("chunk %s/%s failed: %s", job_id, chunk_index, reason)
        return _fail(ledger, f"{reason} (abandoned {abandons} times)")
    log.warning("chunk %s/%s re-sent once: %s", job_id, chunk_index, reason)
    # Celery's own retry sends the chunk again; the abandoned run stays out of the way (it
    # checks Progress.abandoned before every write).
    raise task.retry(countdown=0, max_retries=None)


def _model(settings: Settings, work: ChunkWork, progress: liveness.Progress) -> runtime.CachedModel:
    runtime.configure_threads()
    model = runtime.load_model(
        work.checkpoint_path, work.checkpoint_sha256, device=settings.default_device
    )
    # Loading a model (the first chunk of a process) is progress too, not a stall.
    progress.advance()
    return model


def _predictor(settings: Settings, work: ChunkWork, model: runtime.CachedModel) -> Predictor:
    from core.inference import Predictor

    return Predictor(
        model.checkpoint,
        device=model.device,
        batch_size=max(1, work.batch_size),
        top_k=max(1, work.top_k),
        # Hashed in the decode thread, where the file is read anyway: not on the threads
        # that run the forward passes.
        hash_inputs=True,
        forward_streams=runtime.inference_streams(model.device, settings.inference_streams),
        # Confined again when each file is read: it may have been swapped for a link or a
        # FIFO since the submission checked it.
        roots=settings.data_roots,
        forward_model=_forward_model(settings, work, model),
    )


def _forward_model(settings: Settings, work: ChunkWork, model: runtime.CachedModel) -> Any:
    """ONNX Runtime's session of the model when MRIQ_RUNTIME says so (CPU only), else None
    (the predictor's own torch module)."""
    if settings.runtime != "onnxruntime" or model.device != "cpu":
        return None
    import torch

    return runtime.load_ort_model(model, work.checkpoint_path, threads=torch.get_num_threads())


def _run_chunk(
    ledger: ChunkLedger,
    work: ChunkWork,
    progress: liveness.Progress | None = None,
    guard: isolation.ChunkGuard | None = None,
) -> str:
    settings = ledger.settings
    progress = progress or liveness.Progress()
    model = _model(settings, work, progress)
    predictor = _predictor(settings, work, model)
    cancel = CancelCheck(settings, ledger.job_id)
    # Items hold storable_path() text (non-UTF-8 bytes as \\xNN); open the real file names.
    paths = [filesystem_path(path) for _, path in work.items]
    predictions = isolation.predictions(
        guard, predictor, work.items, paths, lambda: progress.abandoned.is_set() or cancel()
    )
    done = 0
    # predict() yields exactly one Prediction per input, in input order, so zip pairs each
    # with its item; per-file read errors come back as error predictions, not exceptions.
    pairs = zip(work.items, predictions, strict=False)
    for batch in batches(pairs, predictor.batch_size):
        records = [
            repository.PredictionRecord(
                item_index=index,
                path=stored,
                file_sha256=pred.sha256,
                label=pred.label,
                confidence=pred.confidence,
                top_k=pred.top_k,
                error=None if pred.error is None else storable_text(pred.error),
                entropy=pred.entropy,
            )
            for (index, stored), pred in batch
        ]
        if progress.abandoned.is_set():
            # Past the deadline: the task has re-sent or failed the chunk; write nothing.
            return f"abandoned after {done} of {len(work.items)} items"
        # One write transaction per model batch: rows become visible (progress, results)
        # after every batch, and the cancellation and crash-recovery guarantees ("running
        # chunks stop at the next batch", "a killed chunk loses at most one batch") rely on
        # it; grouping rows across batches saved little CPU and broke them.
        if ledger.record(records):
            cancel.cancelled = True
        done += len(records)
        progress.advance(len(records))
        if cancel():
            break
    if done == len(work.items) and work.explain != "none":
        _explain_chunk(ledger, work, model, progress, cancel)
    return _chunk_outcome(ledger, work, progress, cancel, done)


def _explain_chunk(
    ledger: ChunkLedger,
    work: ChunkWork,
    model: runtime.CachedModel,
    progress: liveness.Progress,
    cancel: CancelCheck,
) -> None:
    """Grad-CAM of the chunk's selected predictions (worker/explaining.py), once they are
    all recorded; what a previous attempt explained already is not redone."""
    targets = ledger.explanation_targets(work)
    if not targets or progress.abandoned.is_set() or cancel():
        return
    cached = runtime.load_explainer(model, roots=ledger.settings.data_roots)
    out_dir = job_dir(ledger.settings, ledger.job_id)

    def record(overlays: dict[int, str]) -> None:
        if not progress.abandoned.is_set():
            ledger.record_explanations(out_dir, overlays)

    with cached.lock:
        explained = explaining.explain_targets(
            cached.explainer,
            targets,
            out_dir,
            record=record,
            should_stop=lambda: progress.abandoned.is_set() or cancel(),
            on_batch=progress.advance,
        )
    log.info(
        "chunk %s/%s: explained %d of %d items (%s)",
        ledger.job_id,
        ledger.chunk_index,
        explained,
        len(targets),
        work.explain,
    )


def _chunk_outcome(
    ledger: ChunkLedger,
    work: ChunkWork,
    progress: liveness.Progress,
    cancel: CancelCheck,
    done: int,
) -> str:
    if progress.abandoned.is_set():
        return f"abandoned after {done} of {len(work.items)} items"
    if done < len(work.items) and cancel.force():
        status = ledger.complete(ChunkStatus.CANCELLED)
        return f"cancelled after {done} of {len(work.items)} items ({status or 'job running'})"
    if done < len(work.items):
        # The stream ended early without a cancel: something is wrong; let the retry redo
        # the missing items (claim_chunk only hands out items without a row).
        raise RuntimeError(f"predictor returned {done} of {len(work.items)} results")
    status = ledger.complete(ChunkStatus.SUCCEEDED)
    return f"classified {done} items (job {status or 'still running'})"


def on_chunk_failure(
    self: Task,
    exc: BaseException,
    task_id: str,
    args: tuple[int, ...],
    kwargs: dict[str, object],
    einfo: object,
) -> None:
    """Hard time limit of a chunk: record it as that chunk's failure at once.

    Runs in the prefork *parent* (Celery calls ``on_failure`` there after killing the child
    that overran ``chunk_time_limit``; the pool forks a replacement). Without this the chunk
    would stay ``running`` until the recovery sweep noticed its heartbeat stopped. The
    message is acked by Celery (``acks_on_failure_or_timeout``), so nothing re-runs it: a
    chunk that overran its limit once would overrun it again. A worker killed by the kernel
    (OOM) instead is a ``WorkerLostError``: Celery requeues the message and the attempts cap
    in :func:`classify_chunk` fails the chunk if it keeps killing workers.
    """
    from celery.exceptions import TimeLimitExceeded

    if not isinstance(exc, TimeLimitExceeded):
        return
    try:
        job_id, chunk_index = int(args[0]), int(args[1])
    except (IndexError, TypeError, ValueError):
        return
    limit = getattr(exc, "args", [None])[0] if getattr(exc, "args", None) else None
    reason = (
        f"TimeLimitExceeded: chunk ran longer than its time limit ({limit}s); "
        "the worker process was killed and replaced"
    )
    try:
        # Few attempts: this runs on the worker's event loop. If the database is away, the
        # chunk's heartbeat has stopped and the recovery sweep takes it from here.
        ChunkLedger(task_settings(self), job_id, chunk_index).fail(reason, attempts=2)
    except Exception:
        log.exception("could not record the time limit of chunk %s/%s", job_id, chunk_index)
