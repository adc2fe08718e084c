"""``mriq.train``: train a model for a train job and register it as a candidate version."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Task

from scheduler import repository, review
from scheduler.database import is_retryable
from scheduler.schema import JobStatus
from worker import runtime, sessions
from worker.appsettings import job_dir
from worker.tasks.common import (
    CancelCheck,
    error_text,
    finish,
    finite,
    job_heartbeat,
    job_lock,
    record_outputs,
    task_settings,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.checkpoint import CheckpointMeta
    from core.config import TrainConfig
    from core.training import EpochMetrics, TrainResult
    from scheduler.settings import Settings

log = logging.getLogger(__name__)

#: Job params that are not TrainConfig fields (or that the worker sets itself).
_NOT_CONFIG = frozenset(
    {
        "data",
        "warm_start",
        "out_dir",
        "resume",
        "init_checkpoint",
        "data_dir",
        "data_roots",
        "with_reviews",
        "reviews_from",
    }
)

#: Folder (in the job's directory) of the dataset a train job with reviews trains on.
REVIEWS_DATA_DIR = "data-with-reviews"

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


def _train_device(spec: str) -> str:
    # TrainConfig takes auto/cpu/cuda; a specific GPU index goes through CUDA_VISIBLE_DEVICES
    # on the worker, and backends TrainConfig does not know fall back to auto.
    if spec.startswith("cuda"):
        return "cuda"
    return spec if spec in ("auto", "cpu") else "auto"


def build_train_config(
    settings: Settings, job_id: int, params: dict[str, Any], init_checkpoint: Path | None
) -> TrainConfig:
    """The job's TrainConfig: every param that is a TrainConfig field, plus what we own."""
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

    return sessions.with_session(settings, fn)


def train_job(task: Task, job_id: int) -> str:
    settings = task_settings(task)
    job = _start_train(settings, job_id)
    if job.status != JobStatus.RUNNING:
        return f"skipped: job is {job.status}"
    with job_lock(job_dir(settings, job_id)) as locked:
        if not locked:
            return "skipped: another worker is training this job"
        try:
            with job_heartbeat(task, settings, job_id):
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
                    settings.db_outage_limit,
                )
                raise
            log.exception("train job %s failed", job_id)
            finish(settings, job_id, JobStatus.FAILED, error_text(exc))
            return f"failed: {error_text(exc)}"


def _verified_init(job: _TrainJob) -> Path | None:
    from core.checkpoint import file_sha256

    if job.init_path is None:
        return None
    init = Path(job.init_path)
    actual = file_sha256(init)
    if job.init_sha256 and actual != job.init_sha256:
        raise RuntimeError(
            f"{init}: warm-start checkpoint sha256 {actual} != registered {job.init_sha256}"
        )
    return init


def uses_reviews(params: dict[str, Any]) -> bool:
    """Whether a train job learns from review decisions too (``--with-reviews`` or
    ``--reviews-from JOB``)."""
    return bool(params.get("with_reviews")) or params.get("reviews_from") is not None


def _with_reviews(
    settings: Settings, job_id: int, params: dict[str, Any], config: TrainConfig
) -> tuple[TrainConfig, tuple[int, ...]]:
    """The job's data plus the reviewed items (scheduler.review.training_set), linked into
    the job's folder; the config trains on that folder, and the review ids are its lineage.

    Rebuilt on a redelivered run (the export replaces the folder whole), so a resumed
    training and its lineage agree with the reviews of that moment."""
    reviews_from = params.get("reviews_from")
    ts = sessions.with_session(
        settings,
        lambda s: review.training_set(
            s,
            data_dir=Path(params["data"]),
            out_dir=job_dir(settings, job_id) / REVIEWS_DATA_DIR,
            roots=settings.data_roots,
            reviews_from=None if reviews_from is None else int(reviews_from),
        ),
    )
    for path, reason in ts.export.skipped:
        log.warning("train job %s: review of %s not used: %s", job_id, path, reason)
    log.info("train job %s: %d reviewed items added to %s", job_id, ts.reviews_used, ts.data_dir)
    # The links in the folder lead into the data roots; the folder itself is in the job's.
    roots = (*settings.data_roots, ts.data_dir)
    return replace(config, data_dir=ts.data_dir, data_roots=roots), ts.review_ids


def _run_training(settings: Settings, job_id: int, job: _TrainJob) -> str:
    from core.training import train

    runtime.configure_threads()
    config = build_train_config(settings, job_id, job.params, _verified_init(job))
    review_ids: tuple[int, ...] | None = None
    if uses_reviews(job.params):
        config, review_ids = _with_reviews(settings, job_id, job.params, config)
    total_epochs = int(config.epochs)
    sessions.with_session(settings, lambda s: repository.set_progress(s, job_id, 0, total_epochs))
    cancel = CancelCheck(settings, job_id, interval=5.0)

    def on_epoch(m: EpochMetrics) -> None:
        def fn(session: Session) -> None:
            repository.record_epoch_metric(
                session,
                job_id,
                epoch=int(m.epoch),
                train_loss=finite(m.train_loss),
                val_loss=finite(m.val_loss),
                val_accuracy=finite(m.val_accuracy),
                val_macro_f1=finite(m.val_macro_f1),
                lr=finite(m.lr),
                seconds=finite(m.seconds),
            )
            repository.set_progress(session, job_id, min(int(m.epoch), total_epochs))

        sessions.with_session(settings, fn)

    def on_log(message: str) -> None:
        # Resume notices (e.g. a corrupt last.pt and what was used instead) belong in the
        # worker's log, where whoever investigates the job looks.
        log.info("train job %s: %s", job_id, message)

    result = train(config, on_epoch=on_epoch, should_stop=cancel, on_log=on_log)
    if result.cancelled:
        finish(settings, job_id, JobStatus.CANCELLED)
        return "cancelled"
    _record_training(settings, job_id, config, result, review_ids)
    return f"trained {len(result.epochs)} epochs"


def _training_metrics(result: TrainResult, report: dict[str, Any] | None) -> dict[str, Any]:
    best = max(result.epochs, key=lambda e: finite(e.val_macro_f1) or -1.0, default=None)
    metrics: dict[str, Any] = {
        "epochs": len(result.epochs),
        "stopped_early": bool(result.stopped_early),
        "resumed_from_epoch": int(result.resumed_from_epoch),
    }
    if best is not None:
        metrics.update(
            best_epoch=int(best.epoch),
            val_accuracy=finite(best.val_accuracy),
            val_macro_f1=finite(best.val_macro_f1),
        )
    if report is not None:
        metrics.update(
            test_accuracy=report.get("accuracy"),
            test_macro_f1=report.get("macro_f1"),
            test_n=report.get("n"),
        )
    return metrics


def _record_training(
    settings: Settings,
    job_id: int,
    config: TrainConfig,
    result: TrainResult,
    review_ids: tuple[int, ...] | None = None,
) -> None:
    from core.checkpoint import load_checkpoint

    # Reading the meta back also proves the registered file is the one training wrote.
    meta = load_checkpoint(result.best_checkpoint, expected_sha256=result.best_sha256).meta
    report = result.test_report.to_dict() if result.test_report is not None else None
    metrics = _training_metrics(result, report)
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
            calibration=calibration_record(meta, report),
        )
        if review_ids is not None:
            # In the version's own transaction: a model trained on reviews is never
            # registered without saying which.
            review.record_lineage(session, version.id, review_ids=review_ids)
        record_outputs(
            session,
            job_id=job_id,
            model_version_id=version.id,
            dataset=f"test split of {config.data_dir}",
            report=report,
            artifacts=[
                (kind, out_dir / name)
                for name, kind in _TRAIN_ARTIFACTS
                if (out_dir / name).is_file()
            ],
        )
        repository.set_progress(session, job_id, int(config.epochs))
        repository.finish_job(session, job_id, JobStatus.SUCCEEDED)

    sessions.with_session(settings, fn)


def calibration_record(meta: CheckpointMeta, report: dict[str, Any] | None) -> dict[str, Any]:
    """What the model version records of its calibration: the checkpoint's temperature and
    the test report's ECE/NLL after and before it."""
    record: dict[str, Any] = {
        "temperature": float(meta.calibration.temperature),
        "calibrated": bool(meta.calibration.calibrated),
    }
    for key in ("ece", "ece_uncalibrated", "nll", "nll_uncalibrated"):
        record[key] = finite(report.get(key)) if report is not None else None
    return record
