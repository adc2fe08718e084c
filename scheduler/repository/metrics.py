"""Training metrics per epoch and evaluation reports, both keyed by their job.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.repository.base import NotFoundError, dialect_insert, table_of
from scheduler.schema import EpochMetric, EvaluationReport, utcnow

__all__ = [
    "get_evaluation",
    "list_epoch_metrics",
    "record_epoch_metric",
    "record_evaluation",
]


def record_epoch_metric(
    session: Session,
    job_id: int,
    *,
    epoch: int,
    train_loss: float | None,
    val_loss: float | None,
    val_accuracy: float | None,
    val_macro_f1: float | None,
    lr: float | None,
    seconds: float | None,
) -> None:
    """Insert or overwrite the metrics of (job_id, epoch): a resumed run re-reports epochs."""
    values = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "val_macro_f1": val_macro_f1,
        "lr": lr,
        "seconds": seconds,
    }
    insert = dialect_insert(session, table_of(EpochMetric)).values(
        job_id=job_id, epoch=epoch, created_at=utcnow(), **values
    )
    session.execute(insert.on_conflict_do_update(index_elements=["job_id", "epoch"], set_=values))


def list_epoch_metrics(session: Session, job_id: int) -> list[EpochMetric]:
    return list(
        session.scalars(
            select(EpochMetric)
            .where(EpochMetric.job_id == job_id)
            .order_by(EpochMetric.epoch)
            .execution_options(populate_existing=True)
        )
    )


def record_evaluation(
    session: Session,
    *,
    job_id: int,
    model_version_id: int | None,
    dataset: str | None,
    report: dict[str, Any],
) -> EvaluationReport:
    """Store the job's evaluation report (one per job; a retry overwrites it).

    ``accuracy`` and ``macro_f1`` are copied out of ``report`` for listing and sorting.
    """
    accuracy = report.get("accuracy")
    macro_f1 = report.get("macro_f1")
    row = session.scalars(
        select(EvaluationReport).where(EvaluationReport.job_id == job_id)
    ).one_or_none()
    if row is None:
        row = EvaluationReport(job_id=job_id, created_at=utcnow())
        session.add(row)
    row.model_version_id = model_version_id
    row.dataset = dataset
    row.accuracy = None if accuracy is None else float(accuracy)
    row.macro_f1 = None if macro_f1 is None else float(macro_f1)
    row.report = dict(report)
    session.flush()
    return row


def get_evaluation(session: Session, job_id: int) -> EvaluationReport:
    """The evaluation report of a job; NotFoundError("evaluation", job_id) if none yet."""
    row = session.scalars(
        select(EvaluationReport).where(EvaluationReport.job_id == job_id)
    ).one_or_none()
    if row is None:
        raise NotFoundError("evaluation", job_id)
    return row
