"""Rows for the review-queue tests: a model, a classify job and its predictions, written
through the repository as a worker would (entropy set afterwards, as the worker will)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import Session

from scheduler import repository
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind, PredictionRow

CLASSES = ("Glioblastoma", "Meningioma", "Normal")


@contextmanager
def write(session: Session) -> Iterator[None]:
    """One committed transaction, after ending the read transaction a query began."""
    if session.in_transaction():
        session.rollback()
    with session.begin():
        yield


@dataclass(frozen=True)
class Pred:
    path: str
    label: str | None
    confidence: float | None
    top_k: tuple[tuple[str, float], ...] = ()
    entropy: float | None = None
    error: str | None = None


def add_classify_job(
    session: Session, preds: Sequence[Pred], *, review_below: float = 0.6,
    classes: Sequence[str] = CLASSES,
) -> tuple[int, list[int]]:
    """(job id, prediction ids in input order); commits."""
    with write(session):
        train = repository.create_job(session, kind=JobKind.TRAIN, params={"data": "/d"})
        version = repository.register_model_version(
            session, training_job_id=train.id, arch="resnet18", label_mode="15",
            classes=list(classes), checkpoint_path="/m/best.pt", checkpoint_sha256="c" * 64,
            metrics={},
        )
        job = repository.create_job(session, kind=JobKind.CLASSIFY, params={},
                                    model_version_id=version.id)
        job.review_below = review_below
        job_id = int(job.id)
        repository.add_job_items(session, job_id, [p.path for p in preds], chunk_size=100)
        repository.record_predictions(session, job_id, [
            PredictionRecord(i, p.path, None, p.label, p.confidence, p.top_k, p.error)
            for i, p in enumerate(preds)
        ])
        ids: list[int] = []
        for i, p in enumerate(preds):
            row = session.query(PredictionRow).filter_by(job_id=job_id, item_index=i).one()
            ids.append(int(row.id))
            if p.entropy is not None:
                session.execute(update(PredictionRow).where(PredictionRow.id == row.id)
                                .values(entropy=p.entropy))
    return job_id, ids


def standard_preds(folder: str = "/data") -> list[Pred]:
    """0: sure (not queued), 1-3: unsure with entropies 0.9/1.0/0.5, 4: an error row,
    5: an old row without entropy (estimated 1.049 from its top-k: the most uncertain)."""
    return [
        Pred(f"{folder}/a.png", "Normal", 0.95, (("Normal", 0.95), ("Glioblastoma", 0.03)), 0.2),
        Pred(f"{folder}/b.png", "Glioblastoma", 0.5, (("Glioblastoma", 0.5),), 0.9),
        Pred(f"{folder}/c.png", "Meningioma", 0.4, (("Meningioma", 0.4),), 1.0),
        Pred(f"{folder}/d.png", "Normal", 0.55, (("Normal", 0.55),), 0.5),
        Pred(f"{folder}/e.png", None, None, (), None, "e.png: not an image"),
        Pred(f"{folder}/f.png", "Normal", 0.45,
             (("Normal", 0.45), ("Glioblastoma", 0.35)), None),
    ]
