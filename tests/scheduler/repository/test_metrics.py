"""scheduler.repository.metrics: epoch metrics and evaluation reports.

On real SQLite and PostgreSQL databases (``db_url`` runs both)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from scheduler import repository as repo
from scheduler.schema import JobKind


def test_epoch_metrics_upsert(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
    metrics = dict(val_loss=0.9, val_accuracy=0.5, val_macro_f1=0.4, lr=1e-3, seconds=12.5)
    with session.begin():
        repo.record_epoch_metric(session, job_id, epoch=1, train_loss=1.5, **metrics)
        repo.record_epoch_metric(session, job_id, epoch=2, train_loss=1.2, **metrics)
    with session.begin():
        # A resumed run reports epoch 2 again: overwritten, not duplicated.
        repo.record_epoch_metric(session, job_id, epoch=2, train_loss=1.1, **metrics)
        repo.record_epoch_metric(
            session,
            job_id,
            epoch=3,
            train_loss=float("nan"),
            val_loss=None,
            val_accuracy=None,
            val_macro_f1=None,
            lr=None,
            seconds=None,
        )
    rows = repo.list_epoch_metrics(session, job_id)
    assert [(r.epoch, r.train_loss) for r in rows[:2]] == [(1, 1.5), (2, 1.1)]
    assert rows[1].val_accuracy == 0.5 and rows[1].seconds == 12.5
    assert rows[2].epoch == 3 and rows[2].val_loss is None


def test_evaluation_is_idempotent_per_job(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.EVALUATE, params={}).id
        first = repo.record_evaluation(
            session,
            job_id=job_id,
            model_version_id=None,
            dataset="/data/test",
            report={"n": 10, "accuracy": 0.8, "macro_f1": 0.7, "classes": ["a", "b"]},
        )
    with session.begin():
        second = repo.record_evaluation(
            session,
            job_id=job_id,
            model_version_id=None,
            dataset="/data/test",
            report={"n": 10, "accuracy": 0.9, "macro_f1": 0.85},
        )
    assert first.id == second.id
    loaded = repo.get_evaluation(session, job_id)
    assert (loaded.accuracy, loaded.macro_f1, loaded.report["n"]) == (0.9, 0.85, 10)
