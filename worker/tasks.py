"""mriq's Celery tasks: thin, idempotent wrappers that call ``core`` and record via ``scheduler``.

Every task takes ids only and re-reads its state from SQL, so a redelivered or duplicated
message is harmless: ``claim_chunk`` returns only items without a prediction, predictions are
inserted with ON CONFLICT DO NOTHING, terminal jobs are left alone, training resumes from
``last.pt``. ``core`` (and so torch) is imported inside the task bodies only, which keeps a
prefork parent free of torch thread pools (see ``worker/runtime.py``).

Tasks are registered per app by :func:`register` (not ``shared_task``), so the settings each
task uses are the ones its app was built with (``app.conf.mriq_settings``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.exceptions import Retry

from scheduler import repository
from scheduler.database import is_retryable
from scheduler.dispatch import (
    BROKER_JANITOR_TASK,
    CLASSIFY_CHUNK_TASK,
    EVALUATE_TASK,
    FINALIZE_TASK,
    RETRAIN_TASK,
    TRAIN_TASK,
    clean_filesystem_broker,
)
from scheduler.pathtext import filesystem_path, storable_text
from scheduler.schema import ChunkStatus, JobKind, JobStatus, utcnow
from worker import isolation, liveness, recovery, runtime

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from scheduler.settings import Settings

log = logging.getLogger(__name__)

#: Cancellation is a SQL read; checking it at most this often keeps it off the hot path.
CANCEL_CHECK_INTERVAL_S = 2.0
#: Predictions are recorded per batch of this many images (one INSERT per batch).
DEFAULT_BATCH_SIZE = 32
#: Retry backoff: countdown = BASE * 2**retries, capped.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 120.0
#: Longest error text stored in the jobs/chunks tables.
MAX_ERROR_CHARS = 2000
#: A chunk that missed its deadline is re-sent this many times, then failed with the reason.
MAX_ABANDONS = 1


def _settings(task: Task) -> Settings:
    from worker.app import settings_of

    return settings_of(task.app)


def _error_text(exc: BaseException) -> str:
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
            self.cancelled = runtime.with_session(
                self._settings, lambda s: repository.is_cancel_requested(s, self._job_id)
            )
        return self.cancelled

    def force(self) -> bool:
        """Check now, ignoring the interval (e.g. before the last write of a chunk)."""
        self._last = 0.0
        return self()


def _retry_countdown(retries: int) -> float:
    return float(min(RETRY_MAX_S, RETRY_BASE_S * (2**retries)))


# --------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkWork:
    items: list[tuple[int, str]]
    attempts: int
    checkpoint_path: str
    checkpoint_sha256: str
    top_k: int
    batch_size: int


class _PermanentError(Exception):
    """An error that a retry cannot fix (missing model, checksum mismatch): fail at once."""


def _claim(
    settings: Settings, job_id: int, chunk_index: int, worker: str | None = None
) -> _ChunkWork | None:
    def fn(session: Session) -> _ChunkWork | None:
        items = repository.claim_chunk(session, job_id, chunk_index, worker=worker)
        if items is None:
            return None
        job = repository.get_job(session, job_id)
        chunk = repository.get_chunk(session, job_id, chunk_index)
        if job.model_version_id is None:
            raise _PermanentError(f"classify job {job_id} has no model version")
        version = repository.get_model_version(session, job.model_version_id)
        params = dict(job.params or {})
        return _ChunkWork(
            items=items,
            attempts=int(chunk.attempts),
            checkpoint_path=str(version.checkpoint_path),
            checkpoint_sha256=str(version.checkpoint_sha256),
            top_k=int(params.get("top_k", 3)),
            batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)),
        )

    return runtime.with_session(settings, fn)


def _batches(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def classify_chunk(task: Task, job_id: int, chunk_index: int) -> str:
    """Classify one chunk of a classify job. Returns what happened (for logs/Flower)."""
    settings = _settings(task)
    max_retries = int(settings.task_max_retries)
    try:
        # The node name lets the recovery sweep tell a dead holder from a slow one.
        work = _claim(settings, job_id, chunk_index, task.request.hostname)
        if work is None:
            return "skipped: chunk or job already finished"
        # Detects a predecessor that died and sets aside the file it died on (worker/isolation.py).
        with isolation.ChunkGuard(settings, job_id, chunk_index) as guard:
            if guard.busy:
                return "skipped: a live attempt in another worker thread or process runs it"
            work = replace(work, items=guard.set_aside(work.items))
            # attempts counts claims, including ones whose worker died (SIGKILL/OOM) without
            # reaching our retry logic; a chunk that keeps killing workers must end, not loop.
            # A death that identified its file made progress and does not count.
            if work.attempts - guard.set_aside_count > max_retries + 1:
                reason = f"gave up after {work.attempts - 1} attempts (worker lost while running)"
                return _fail_chunk(settings, job_id, chunk_index, reason)
            if not work.items:
                status = _complete(settings, job_id, chunk_index, ChunkStatus.SUCCEEDED)
                return f"nothing left to do ({status or 'job running'})"
            # The chunk's updated_at is its heartbeat: if this process dies, it goes stale and
            # a worker's recovery sweep re-sends the chunk (worker/recovery.py).
            beat = recovery.chunk_heartbeat(settings, job_id, chunk_index)
            with recovery.heartbeat(beat, _recovery(task).heartbeat_s, f"{job_id}-{chunk_index}"):
                return liveness.run_with_deadline(
                    lambda progress: _run_chunk(
                        settings, job_id, chunk_index, work, progress, guard
                    ),
                    stall_s=float(settings.chunk_stall_timeout),
                    # Prefork children are killed by Celery's own hard limit.
                    limit_s=(
                        None if runtime.pool_enforces_time_limits() else settings.chunk_time_limit
                    ),
                    name=f"{job_id}-{chunk_index}",
                )
    except Retry:
        raise
    except liveness.ChunkAbandoned as exc:
        assert work is not None  # only raised by the deadline around _run_chunk
        return _abandoned(task, settings, job_id, chunk_index, work, exc)
    except _PermanentError as exc:
        return _fail_chunk(settings, job_id, chunk_index, str(exc))
    except Exception as exc:
        if is_retryable(exc):
            # The database stayed away longer than db_outage_limit. Nothing about the images
            # is known, so no error rows (nor could they be written): the chunk stays running
            # and the recovery sweep re-sends it once the database is back.
            log.error(
                "chunk %s/%s: database unreachable for over %.0fs; left to the recovery sweep",
                job_id,
                chunk_index,
                runtime.outage_limit(settings),
            )
            raise
        retries = int(task.request.retries or 0)
        if _is_permanent(exc) or retries >= max_retries:
            log.exception("chunk %s/%s failed for good", job_id, chunk_index)
            return _fail_chunk(settings, job_id, chunk_index, _error_text(exc))
        countdown = _retry_countdown(retries)
        # Back to pending until the retry is due, so no recovery sweep re-sends it meanwhile.
        not_before = utcnow() + timedelta(seconds=countdown)
        with contextlib.suppress(Exception):  # best effort; the retry message is what counts
            runtime.with_session(
                settings,
                lambda s: repository.release_chunk(s, job_id, chunk_index, not_before=not_before),
                attempts=2,
            )
        log.warning(
            "chunk %s/%s failed (retry %d/%d in %.0fs): %s",
            job_id,
            chunk_index,
            retries + 1,
            max_retries,
            countdown,
            _error_text(exc),
        )
        raise task.retry(exc=exc, countdown=countdown, max_retries=max_retries) from exc


def _is_permanent(exc: Exception) -> bool:
    """Errors a retry cannot fix: the model version row is gone, or the checkpoint file is
    there but wrong (checksum mismatch, not a checkpoint). A *missing* or unreadable
    checkpoint is retried with backoff: shared storage that is briefly away comes back."""
    from core.checkpoint import CheckpointError

    if isinstance(exc, repository.NotFoundError):
        return True
    if isinstance(exc, CheckpointError):
        return Path(exc.path).is_file()
    return False


def _recovery(task: Task) -> recovery.RecoveryConfig:
    return recovery.recovery_of(task.app)


def _fail_chunk(settings: Settings, job_id: int, chunk_index: int, reason: str) -> str:
    status = runtime.with_session(
        settings, lambda s: repository.fail_chunk(s, job_id, chunk_index, reason)
    )
    return f"failed: {reason} (job {status or 'still running'})"


def _complete(
    settings: Settings, job_id: int, chunk_index: int, status: ChunkStatus
) -> JobStatus | None:
    return runtime.with_session(
        settings, lambda s: repository.complete_chunk(s, job_id, chunk_index, status=status)
    )


def _abandoned(
    task: Task,
    settings: Settings,
    job_id: int,
    chunk_index: int,
    work: _ChunkWork,
    exc: liveness.ChunkAbandoned,
) -> str:
    """The chunk missed its deadline (worker/liveness.py): re-send it once, then fail it."""
    abandons = runtime.with_session(
        settings, lambda s: repository.abandon_chunk(s, job_id, chunk_index)
    )
    if abandons == 0:
        return f"abandoned ({exc.reason}); the chunk was no longer running"
    # Batches are recorded in order, so the first unrecorded item is where it got stuck.
    stuck_at = work.items[min(exc.progress_items, len(work.items) - 1)][1]
    reason = (
        f"chunk abandoned after missing its deadline: {exc.reason}; stuck at or after {stuck_at}"
    )
    if abandons > MAX_ABANDONS:
        log.error("chunk %s/%s failed: %s", job_id, chunk_index, reason)
        return _fail_chunk(settings, job_id, chunk_index, f"{reason} (abandoned {abandons} times)")
    log.warning("chunk %s/%s re-sent once: %s", job_id, chunk_index, reason)
    # Celery's own retry sends the chunk again; the abandoned run stays out of the way (it
    # checks Progress.abandoned before every write).
    raise task.retry(countdown=0, max_retries=None)


def _run_chunk(
    settings: Settings,
    job_id: int,
    chunk_index: int,
    work: _ChunkWork,
    progress: liveness.Progress | None = None,
    guard: isolation.ChunkGuard | None = None,
) -> str:
    from core.inference import Predictor

    progress = progress or liveness.Progress()
    runtime.configure_threads()
    model = runtime.load_model(
        work.checkpoint_path, work.checkpoint_sha256, device=_inference_device(settings)
    )
    # Loading a model (the first chunk of a process) is progress too, not a stall.
    progress.advance()
    predictor = Predictor(
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
    )
    cancel = CancelCheck(settings, job_id)
    # Items hold storable_path() text (non-UTF-8 bytes as \\xNN); open the real file names.
    paths = [filesystem_path(path) for _, path in work.items]
    predictions = isolation.predictions(
        guard, predictor, work.items, paths, lambda: progress.abandoned.is_set() or cancel()
    )
    done = 0
    # predict() yields exactly one Prediction per input, in input order, so zip pairs each
    # with its item; per-file read errors come back as error predictions, not exceptions.
    pairs = zip(work.items, predictions, strict=False)
    for batch in _batches(pairs, predictor.batch_size):
        records = [
            repository.PredictionRecord(
                item_index=index,
                path=stored,
                file_sha256=pred.sha256,
                label=pred.label,
                confidence=pred.confidence,
                top_k=pred.top_k,
                error=None if pred.error is None else storable_text(pred.error),
            )
            for (index, stored), pred in batch
        ]
        if progress.abandoned.is_set():
            # Past the deadline: the task has re-sent or failed the chunk; write nothing.
            return f"abandoned after {done} of {len(work.items)} items"
        # One write transaction per model batch: rows become visible (progress, results)
        # after every batch, and the cancellation and crash-recovery guarantees ("running
        # chunks stop at the next batch", "a killed chunk loses at most one batch") rely on
        # it; grouping rows across batches saved little CPU and broke them. The transaction
        # also reads the cancel flag (one PK lookup in a transaction we run anyway), so a
        # cancelled chunk stops at the next batch rather than up to CANCEL_CHECK_INTERVAL_S
        # later.
        if runtime.with_session(settings, _recorder(job_id, records)):
            cancel.cancelled = True
        done += len(records)
        progress.advance(len(records))
        if cancel():
            break
    if progress.abandoned.is_set():
        return f"abandoned after {done} of {len(work.items)} items"
    if done < len(work.items) and cancel.force():
        status = _complete(settings, job_id, chunk_index, ChunkStatus.CANCELLED)
        return f"cancelled after {done} of {len(work.items)} items ({status or 'job running'})"
    if done < len(work.items):
        # The stream ended early without a cancel: something is wrong; let the retry redo
        # the missing items (claim_chunk only hands out items without a row).
        raise RuntimeError(f"predictor returned {done} of {len(work.items)} results")
    status = _complete(settings, job_id, chunk_index, ChunkStatus.SUCCEEDED)
    return f"classified {done} items (job {status or 'still running'})"


def _recorder(job_id: int, records: list[repository.PredictionRecord]) -> Callable[[Session], bool]:
    """Record a batch; returns whether cancellation of the job has been requested."""

    def fn(session: Session) -> bool:
        repository.record_predictions(session, job_id, records)
        return repository.is_cancel_requested(session, job_id)

    return fn


def _inference_device(settings: Settings) -> str:
    spec = str(getattr(settings, "default_device", "auto") or "auto")
    return spec if spec in ("auto", "cpu") or spec.startswith("cuda") else "auto"


def finalize_job(task: Task, job_id: int) -> str:
    """Re-derive a classify job's final status from its chunks (idempotent repair).

    ``complete_chunk`` on an already terminal chunk changes nothing but re-runs the "all
    chunks terminal -> finish the job" check, which a lost message may have skipped.
    """
    settings = _settings(task)

    def fn(session: Session) -> str:
        job = repository.get_job(session, job_id)
        if job.is_terminal:
            return f"already {job.status}"
        chunks = repository.list_chunks(session, job_id)
        if not chunks or any(not ChunkStatus(c.status).is_terminal for c in chunks):
            return "chunks still open"
        status = repository.complete_chunk(
            session, job_id, chunks[-1].chunk_index, status=ChunkStatus(chunks[-1].status)
        )
        return f"finished as {status}"

    return runtime.with_session(settings, fn)


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------

#: Job params that are not TrainConfig fields (or that the worker sets itself).
_NOT_CONFIG = frozenset(
    {"data", "warm_start", "out_dir", "resume", "init_checkpoint", "data_dir", "data_roots"}
)


def job_dir(settings: Settings, job_id: int) -> Path:
    return Path(settings.data_dir).expanduser().resolve() / "jobs" / str(job_id)


def _train_device(spec: str) -> str:
    # TrainConfig takes auto/cpu/cuda; a specific GPU index goes through CUDA_VISIBLE_DEVICES
    # on the worker, and backends TrainConfig does not know fall back to auto.
    if spec.startswith("cuda"):
        return "cuda"
    return spec if spec in ("auto", "cpu") else "auto"


def build_train_config(
    settings: Settings, job_id: int, params: dict[str, Any], init_checkpoint: Path | None
) -> Any:
    """The job's TrainConfig: every param that is a TrainConfig field, plus what we own."""
    from dataclasses import fields

    from core.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    kwargs = {k: v for k, v in params.items() if k in names and k not in _NOT_CONFIG}
    if "device" in kwargs:
        kwargs["device"] = _train_device(str(kwargs["device"]))
    return TrainConfig(
        data_dir=Path(params["data"]),
        out_dir=job_dir(settings, job_id),
        # A redelivered train task (worker killed mid-run) continues from last.pt.
        resume="auto",
        init_checkpoint=init_checkpoint,
        data_roots=tuple(settings.data_roots),
        **kwargs,
    )


@contextlib.contextmanager
def _job_lock(folder: Path) -> Iterator[bool]:
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


@dataclass(frozen=True)
class _TrainJob:
    status: JobStatus
    params: dict[str, Any]
    init_path: str | None
    init_sha256: str | None


def _start_train(settings: Settings, job_id: int) -> _TrainJob:
    def fn(session: Session) -> _TrainJob:
        job = repository.mark_job_running(session, job_id)
        params = dict(job.params or {})
        init_path = init_sha = None
        # Warm start: submission stored the production model of that moment on the job.
        if params.get("warm_start") and job.model_version_id is not None:
            version = repository.get_model_version(session, job.model_version_id)
            init_path, init_sha = str(version.checkpoint_path), str(version.checkpoint_sha256)
        return _TrainJob(JobStatus(job.status), params, init_path, init_sha)

    return runtime.with_session(settings, fn)


def train_job(task: Task, job_id: int) -> str:
    settings = _settings(task)
    job = _start_train(settings, job_id)
    if job.status != JobStatus.RUNNING:
        return f"skipped: job is {job.status}"
    out_dir = job_dir(settings, job_id)
    with _job_lock(out_dir) as locked:
        if not locked:
            return "skipped: another worker is training this job"
        try:
            with _job_heartbeat(task, settings, job_id):
                return _run_training(settings, job_id, job)
        except Exception as exc:
            if is_retryable(exc):
                # An outage longer than db_outage_limit is no verdict on the training: the
                # job stays running, its heartbeat file stops, and the recovery sweep
                # re-sends it once the database is back; the re-run resumes from last.pt.
                log.error(
                    "train job %s: database unreachable for over %.0fs; left to the recovery "
                    "sweep (it resumes from last.pt)",
                    job_id,
                    runtime.outage_limit(settings),
                )
                raise
            log.exception("train job %s failed", job_id)
            _finish(settings, job_id, JobStatus.FAILED, _error_text(exc))
            return f"failed: {_error_text(exc)}"


@contextlib.contextmanager
def _job_heartbeat(task: Task, settings: Settings, job_id: int) -> Iterator[None]:
    """Keep ``<job dir>/.heartbeat`` fresh while a train/evaluate job runs here; a stale one
    tells the recovery sweep this job's worker is gone (worker/recovery.py)."""
    with contextlib.suppress(OSError):
        recovery.touch_job_heartbeat(settings, job_id)
    beat = lambda: recovery.touch_job_heartbeat(settings, job_id)  # noqa: E731
    with recovery.heartbeat(beat, _recovery(task).heartbeat_s, f"job-{job_id}"):
        yield


def _finish(settings: Settings, job_id: int, status: JobStatus, error: str | None = None) -> None:
    def fn(session: Session) -> None:
        repository.finish_job(session, job_id, status, error=error)

    runtime.with_session(settings, fn)


def _run_training(settings: Settings, job_id: int, job: _TrainJob) -> str:
    from core.checkpoint import file_sha256 as checkpoint_sha256
    from core.training import train

    runtime.configure_threads()
    init: Path | None = None
    if job.init_path is not None:
        init = Path(job.init_path)
        actual = checkpoint_sha256(init)
        if job.init_sha256 and actual != job.init_sha256:
            raise RuntimeError(
                f"{init}: warm-start checkpoint sha256 {actual} != registered {job.init_sha256}"
            )
    config = build_train_config(settings, job_id, job.params, init)
    total_epochs = int(config.epochs)
    runtime.with_session(settings, lambda s: repository.set_progress(s, job_id, 0, total_epochs))
    cancel = CancelCheck(settings, job_id, interval=5.0)

    def on_epoch(m: Any) -> None:
        def fn(session: Session) -> None:
            repository.record_epoch_metric(
                session,
                job_id,
                epoch=int(m.epoch),
                train_loss=_finite(m.train_loss),
                val_loss=_finite(m.val_loss),
                val_accuracy=_finite(m.val_accuracy),
                val_macro_f1=_finite(m.val_macro_f1),
                lr=_finite(m.lr),
                seconds=_finite(m.seconds),
            )
            repository.set_progress(session, job_id, min(int(m.epoch), total_epochs))

        runtime.with_session(settings, fn)

    def on_log(message: str) -> None:
        # Resume notices (e.g. a corrupt last.pt and what was used instead) belong in the
        # worker's log, where whoever investigates the job looks.
        log.info("train job %s: %s", job_id, message)

    result = train(config, on_epoch=on_epoch, should_stop=cancel, on_log=on_log)
    if result.cancelled:
        _finish(settings, job_id, JobStatus.CANCELLED)
        return "cancelled"
    _record_training(settings, job_id, config, result)
    return f"trained {len(result.epochs)} epochs"


def _finite(value: Any) -> float | None:
    # JSON/SQL cannot hold NaN portably; a diverged loss is recorded as missing.
    if value is None:
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


_TRAIN_ARTIFACTS: tuple[tuple[str, str], ...] = (
    ("best.pt", "checkpoint"),
    ("metrics.json", "metrics"),
    ("training_curves.png", "training_curves"),
    ("confusion_matrix.png", "confusion_matrix"),
    ("test_report.json", "report"),
    # core.plots.PLOT_FILES, spelled out: this module must not import torch at import time.
    ("reliability_diagram.png", "reliability_diagram"),
    ("per_class_metrics.png", "per_class_metrics"),
    ("roc_curves.png", "roc_curves"),
    ("confident_mistakes.png", "confident_mistakes"),
)


def _calibration_record(meta: Any, report: dict[str, Any] | None) -> dict[str, Any]:
    """What the model version records of its calibration: the checkpoint's temperature and
    the test report's ECE/NLL after and before it."""
    record: dict[str, Any] = {
        "temperature": float(meta.calibration.temperature),
        "calibrated": bool(meta.calibration.calibrated),
    }
    for key in ("ece", "ece_uncalibrated", "nll", "nll_uncalibrated"):
        record[key] = _finite(report.get(key)) if report is not None else None
    return record


def _record_training(settings: Settings, job_id: int, config: Any, result: Any) -> None:
    from core.checkpoint import load_checkpoint

    # Reading the meta back also proves the registered file is the one training wrote.
    ckpt = load_checkpoint(result.best_checkpoint, expected_sha256=result.best_sha256)
    meta = ckpt.meta
    report = result.test_report.to_dict() if result.test_report is not None else None
    best = max(result.epochs, key=lambda e: _finite(e.val_macro_f1) or -1.0, default=None)
    metrics: dict[str, Any] = {
        "epochs": len(result.epochs),
        "stopped_early": bool(result.stopped_early),
        "resumed_from_epoch": int(result.resumed_from_epoch),
    }
    if best is not None:
        metrics.update(
            best_epoch=int(best.epoch),
            val_accuracy=_finite(best.val_accuracy),
            val_macro_f1=_finite(best.val_macro_f1),
        )
    if report is not None:
        metrics.update(
            test_accuracy=report.get("accuracy"),
            test_macro_f1=report.get("macro_f1"),
            test_n=report.get("n"),
        )
    out_dir = Path(config.out_dir)

    def fn(session: Session) -> None:
        version = repository.register_model_version(
            session,
            training_job_id=job_id,
            arch=meta.arch,
            label_mode=meta.label_mode,
            classes=list(meta.classes),
            checkpoint_path=str(Path(result.best_checkpoint).resolve()),
            checkpoint_sha256=result.best_sha256,
            metrics=metrics,
            calibration=_calibration_record(meta, report),
        )
        if report is not None:
            repository.record_evaluation(
                session,
                job_id=job_id,
                model_version_id=version.id,
                dataset=f"test split of {config.data_dir}",
                report=report,
            )
        for name, kind in _TRAIN_ARTIFACTS:
            path = out_dir / name
            if path.is_file():
                repository.record_artifact(
                    session,
                    job_id=job_id,
                    kind=kind,
                    path=str(path.resolve()),
                    model_version_id=version.id,
                )
        repository.set_progress(session, job_id, int(config.epochs))
        repository.finish_job(session, job_id, JobStatus.SUCCEEDED)

    runtime.with_session(settings, fn)
    del ckpt


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EvalJob:
    status: JobStatus
    data: str
    model_version_id: int
    checkpoint_path: str
    checkpoint_sha256: str
    batch_size: int


def _start_eval(settings: Settings, job_id: int) -> _EvalJob:
    def fn(session: Session) -> _EvalJob:
        job = repository.mark_job_running(session, job_id)
        params = dict(job.params or {})
        if job.model_version_id is None:
            raise ValueError(f"evaluate job {job_id} has no model version")
        version = repository.get_model_version(session, job.model_version_id)
        return _EvalJob(
            status=JobStatus(job.status),
            data=str(params["data"]),
            model_version_id=int(version.id),
            checkpoint_path=str(version.checkpoint_path),
            checkpoint_sha256=str(version.checkpoint_sha256),
            batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)),
        )

    return runtime.with_session(settings, fn)


def evaluate_job(task: Task, job_id: int) -> str:
    settings = _settings(task)
    try:
        job = _start_eval(settings, job_id)
    except Exception as exc:
        _finish(settings, job_id, JobStatus.FAILED, _error_text(exc))
        return f"failed: {_error_text(exc)}"
    if job.status != JobStatus.RUNNING:
        return f"skipped: job is {job.status}"
    try:
        # A re-sent copy must not run beside a live run: both write the same report files.
        with _job_lock(job_dir(settings, job_id)) as locked:
            if not locked:
                return "skipped: another worker is evaluating this job"
            with _job_heartbeat(task, settings, job_id):
                return _run_evaluation(settings, job_id, job)
    except Exception as exc:
        if is_retryable(exc):  # as in train_job: the recovery sweep re-sends it later
            log.error("evaluate job %s: database unreachable; left to the recovery sweep", job_id)
            raise
        log.exception("evaluate job %s failed", job_id)
        _finish(settings, job_id, JobStatus.FAILED, _error_text(exc))
        return f"failed: {_error_text(exc)}"


@contextlib.contextmanager
def _written_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix, for writers that pick the format
    from it) to write; it replaces ``path`` when the block succeeds and is removed when it
    fails. A full disk thus leaves no half-written artifact, and the error names the file."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot write {path.name} ({reason})", str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _relabel(samples: list[Any], mode: str, classes: tuple[str, ...]) -> list[Any]:
    """Map scan_folder's label indices (over ``classes_for(mode)``) onto the checkpoint's."""
    from dataclasses import replace

    from core.labels import classes_for

    canonical = tuple(classes_for(mode))
    if canonical == classes:
        return samples
    index = {name: i for i, name in enumerate(classes)}
    out = []
    for s in samples:
        name = canonical[s.label]
        if name not in index:
            raise ValueError(f"{s.path}: class {name!r} is not one of the model's classes")
        out.append(replace(s, label=index[name]))
    return out


def _run_evaluation(settings: Settings, job_id: int, job: _EvalJob) -> str:
    from core.dataset import scan_folder
    from core.evaluation import (
        EvaluationCancelled,
        evaluate_checkpoint_outputs,
    )
    from core.plots import plot_confusion_matrix, write_evaluation_plots

    runtime.configure_threads()
    model = runtime.load_model(
        job.checkpoint_path, job.checkpoint_sha256, device=_inference_device(settings)
    )
    meta = model.checkpoint.meta
    samples = scan_folder(
        Path(job.data), mode=meta.label_mode, roots=settings.data_roots, on_warning=log.warning
    )
    samples = _relabel(list(samples), meta.label_mode, tuple(meta.classes))
    if not samples:
        raise ValueError(f"{job.data}: no labelled images found")
    total = len(samples)
    runtime.with_session(settings, lambda s: repository.set_progress(s, job_id, 0, total))
    cancel = CancelCheck(settings, job_id)
    last_progress = [0.0]

    def on_batch(done: int, _total: int) -> None:
        now = time.monotonic()
        if now - last_progress[0] >= CANCEL_CHECK_INTERVAL_S or done >= total:
            last_progress[0] = now
            runtime.with_session(settings, lambda s: repository.set_progress(s, job_id, done))

    try:
        outputs = evaluate_checkpoint_outputs(
            model.checkpoint,
            samples,
            batch_size=job.batch_size,
            device=model.device,
            should_stop=cancel,
            on_batch=on_batch,
            roots=settings.data_roots,
        )
    except EvaluationCancelled:
        _finish(settings, job_id, JobStatus.CANCELLED)
        return "cancelled"
    report = outputs.report
    out_dir = job_dir(settings, job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_dict = report.to_dict()
    report_path = out_dir / "evaluation_report.json"
    with _written_atomically(report_path) as tmp:
        tmp.write_text(json.dumps(report_dict, indent=2), encoding="utf-8")
    plots: dict[str, Path] = {
        "confusion_matrix": plot_confusion_matrix(report, out_dir / "confusion_matrix.png"),
        **write_evaluation_plots(outputs, out_dir),
    }

    def fn(session: Session) -> None:
        repository.record_evaluation(
            session,
            job_id=job_id,
            model_version_id=job.model_version_id,
            dataset=job.data,
            report=report_dict,
        )
        for kind, path in (("report", report_path), *plots.items()):
            repository.record_artifact(
                session,
                job_id=job_id,
                kind=kind,
                path=str(path.resolve()),
                model_version_id=job.model_version_id,
            )
        repository.set_progress(session, job_id, total, total)
        repository.finish_job(session, job_id, JobStatus.SUCCEEDED)

    runtime.with_session(settings, fn)
    return f"evaluated {report.n} images"


# --------------------------------------------------------------------------------------
# periodic
# --------------------------------------------------------------------------------------


def retrain(task: Task) -> str:
    """Submit a training job on ``settings.retrain_data_dir`` (what beat runs on its cron).

    Skipped while an earlier retraining job is still queued or running, so a slow run never
    piles up behind itself; warm-starts from the production model when there is one.
    """
    settings = _settings(task)
    data_dir = getattr(settings, "retrain_data_dir", None)
    if not data_dir:
        return "skipped: settings.retrain_data_dir is not set"
    from scheduler.dispatch import Dispatcher
    from scheduler.submission import submit_train

    def busy(session: Session) -> bool:
        for status in (JobStatus.QUEUED, JobStatus.RUNNING):
            jobs = repository.list_jobs(session, status=status, kind=JobKind.TRAIN, limit=1000)
            if any(j.submitter == RETRAIN_SUBMITTER for j in jobs):
                return True
        return False

    if runtime.with_session(settings, busy):
        return "skipped: a retraining job is already queued or running"
    has_production = runtime.with_session(
        settings, lambda s: repository.get_production_model(s) is not None
    )
    factory = runtime.session_factory(settings)
    dispatcher = Dispatcher(settings, app=task.app)
    job_id = submit_train(
        factory,
        dispatcher,
        settings,
        str(data_dir),
        {"warm_start": has_production},
        submitter=RETRAIN_SUBMITTER,
    )
    return f"submitted train job {job_id}"


RETRAIN_SUBMITTER = "mriq-retrain"


def broker_janitor(task: Task) -> str:
    return f"removed {clean_filesystem_broker(_settings(task))} message files"


# --------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------


def _wrap(fn: Callable[..., str]) -> Callable[..., str]:
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


def _on_chunk_failure(
    self: Task, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
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
        runtime.with_session(
            _settings(self),
            lambda s: repository.fail_chunk(s, job_id, chunk_index, reason),
            attempts=2,
        )
    except Exception:
        log.exception("could not record the time limit of chunk %s/%s", job_id, chunk_index)


def register(app: Celery) -> None:
    """Register mriq's tasks on ``app`` under the names the scheduler sends."""
    settings = getattr(app.conf, "mriq_settings", None)

    def limit(name: str) -> int | None:
        # Hard limits are enforced by the prefork pool only (solo/threads cannot kill a
        # running task); visibility_timeout is validated to exceed all of them.
        value = getattr(settings, name, None)
        return int(value) if value else None

    # shared=False: a shared task would be added to every app finalized later in this
    # process (tests build several apps with different settings).
    common: dict[str, Any] = {
        "bind": True,
        "shared": False,
        "acks_late": True,
        "reject_on_worker_lost": True,
    }
    app.task(
        name=CLASSIFY_CHUNK_TASK,
        max_retries=None,
        time_limit=limit("chunk_time_limit"),
        on_failure=_on_chunk_failure,
        **common,
    )(_wrap(classify_chunk))
    app.task(name=TRAIN_TASK, max_retries=0, time_limit=limit("train_time_limit"), **common)(
        _wrap(train_job)
    )
    app.task(name=EVALUATE_TASK, max_retries=0, time_limit=limit("evaluate_time_limit"), **common)(
        _wrap(evaluate_job)
    )
    app.task(name=FINALIZE_TASK, max_retries=0, **common)(_wrap(finalize_job))
    app.task(name=RETRAIN_TASK, max_retries=0, **common)(_wrap(retrain))
    app.task(name=BROKER_JANITOR_TASK, max_retries=0, **common)(_wrap(broker_janitor))
