"""Rows the repository tests build: a classify job's inputs, predictions, a chunked job."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy.orm import Session

from scheduler import repository as repo
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind


def make_paths(n: int) -> Iterator[str]:
    # A generator, as submission passes one: add_job_items must not need a list.
    return (f"/data/img_{i:05d}.png" for i in range(n))


def make_record(i: int, *, error: str | None = None) -> PredictionRecord:
    if error is not None:
        return PredictionRecord(i, f"/data/img_{i:05d}.png", None, None, None, (), error)
    return PredictionRecord(
        item_index=i,
        path=f"/data/img_{i:05d}.png",
        file_sha256="ab" * 32,
        label="glioma",
        confidence=0.75,
        top_k=(("glioma", 0.75), ("normal", 0.2), ("meningioma", 0.05)),
        error=None,
    )


def make_classify_job(session: Session, n: int, chunk_size: int) -> int:
    with session.begin():
        job = repo.create_job(session, kind=JobKind.CLASSIFY, params={"model": "prod"})
        assert repo.add_job_items(session, job.id, make_paths(n), chunk_size=chunk_size) == n
        return job.id
