"""``mriq.evaluate``: evaluate a model version on a labelled folder (every image, no split)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from celery import Task

from core.atomicio import write_text_atomically
from scheduler import repository
from scheduler.database import is_retryable
from scheduler.schema import JobStatus
from worker import runtime, sessions
from worker.appsettings import job_dir
from worker.ledger import DEFAULT_BATCH_SIZE
from worker.tasks.common import (
    CANCEL_CHECK_INTERVAL_S,
    CancelCheck,
    error_text,
    finish,
    job_heartbeat,
    job_lock,
    job_model_version,
    record_outputs,
    task_settings,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.dataset import Sample
    from core.evaluation import EvalOutputs
    from scheduler.settings import Settings

log = logging.getLogger(__name__)


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
        version = job_model_version(session, job)
        return _EvalJob(
            status=JobStatus(job.status),
            data=str(params["data"]),
            model_version_id=int(version.id),
            checkpoint_path=str(version.checkpoint_path),
            checkpoint_sha256=str(version.checkpoint_sha256),
            batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)),
        )

    return sessions.with_session(settings, fn)


def evaluate_job(task: Task, job_id: int) -> str:
    settings = task_settings(task)
    try:
        job = _start_eval(settings, job_id)
    except Exception as exc:
        finish(settings, job_id, JobStatus.FAILED, error_text(exc))
        return f"failed: {error_text(exc)}"
    if job.status != JobStatus.RUNNING:
        return f"skipped: job is {job.status}"
    try:
        # A re-sent copy must not run beside a live run: both write the same report files.
        with job_lock(job_dir(settings, job_id)) as locked:
            if not locked:
                return "skipped: another worker is evaluating this job"
            with job_heartbeat(task, settings, job_id):
                return _run_evaluation(settings, job_id, job)
    except Exception as exc:
        if is_retryable(exc):  # as in train_job: the recovery sweep re-sends it later
            log.error("evaluate job %s: database unreachable; left to the recovery sweep", job_id)
            raise
        log.exception("evaluate job %s failed", job_id)
        finish(settings, job_id, JobStatus.FAILED, error_text(exc))
        return f"failed: {error_text(exc)}"


def _relabel(samples: list[Sample], mode: str, classes: tuple[str, ...]) -> list[Sample]:
    """Map scan_folder's label indices (over ``classes_for(mode)``) onto the checkpoint's."""
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
    from core.evaluation import EvaluationCancelled, evaluate_checkpoint_outputs

    runtime.configure_threads()
    model = runtime.load_model(
        job.checkpoint_path, job.checkpoint_sha256, device=settings.default_device
    )
    meta = model.checkpoint.meta
    samples = scan_folder(
        Path(job.data), mode=meta.label_mode, roots=settings.data_roots, on_warning=log.warning
    )
    samples = _relabel(list(samples), meta.label_mode, tuple(meta.classes))
    if not samples:
        raise ValueError(f"{job.data}: no labelled images found")
    total = len(samples)
    sessions.with_session(settings, lambda s: repository.set_progress(s, job_id, 0, total))
    cancel = CancelCheck(settings, job_id)
    last_progress = [0.0]

    def on_batch(done: int, _total: int) -> None:
        now = time.monotonic()
        if now - last_progress[0] >= CANCEL_CHECK_INTERVAL_S or done >= total:
            last_progress[0] = now
            sessions.with_session(settings, lambda s: repository.set_progress(s, job_id, done))

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
        finish(settings, job_id, JobStatus.CANCELLED)
        return "cancelled"
    _record_evaluation(settings, job_id, job, outputs, total)
    return f"evaluated {outputs.report.n} images"


def _record_evaluation(
    settings: Settings, job_id: int, job: _EvalJob, outputs: EvalOutputs, total: int
) -> None:
    """Write the report and plots, then record them and finish the job in one transaction."""
    from core.plots import plot_confusion_matrix, write_evaluation_plots

    report = outputs.report
    out_dir = job_dir(settings, job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_dict = report.to_dict()
    report_path = out_dir / "evaluation_report.json"
    write_text_atomically(report_path, json.dumps(report_dict, indent=2))
    plots: dict[str, Path] = {
        "confusion_matrix": plot_confusion_matrix(report, out_dir / "confusion_matrix.png"),
        **write_evaluation_plots(outputs, out_dir),
    }

    def fn(session: Session) -> None:
        record_outputs(
            session,
            job_id=job_id,
            model_version_id=job.model_version_id,
            dataset=job.data,
            report=report_dict,
            artifacts=(("report", report_path), *plots.items()),
        )
        repository.set_progress(session, job_id, total, total)
        repository.finish_job(session, job_id, JobStatus.SUCCEEDED)

    sessions.with_session(settings, fn)
