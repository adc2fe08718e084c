"""The dashboard's read queries that the JSON API has no counterpart for.

Keyset pages (no OFFSET scans, so page 200 costs what page 1 does) of jobs and of a job's
predictions filtered by label, confidence range and errors, sorted by index or confidence.
Everything else the dashboard shows comes from :mod:`scheduler.repository`, the functions
the API calls. Like the repository, every function takes the session first and never
commits; these belong in ``scheduler/repository/`` once that package exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from scheduler.schema import Job, JobKind, JobStatus, PredictionRow

__all__ = [
    "MATCH_COUNT_CAP",
    "PredictionCursor",
    "PredictionFilter",
    "PredictionSort",
    "count_filtered_predictions",
    "cursor_after",
    "error_counts",
    "filtered_predictions",
    "get_prediction",
    "jobs_before",
]

PredictionSort = Literal["index", "confidence_desc", "confidence_asc"]
#: Filtered counts stop here; the page shows "10,000+ matching".
MATCH_COUNT_CAP = 10_000
#: Sort key of a row without a confidence (an error row): below every probability.
_NO_CONFIDENCE = -1.0


def jobs_before(
    session: Session,
    *,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    before: int | None = None,
    limit: int = 50,
) -> list[Job]:
    """Jobs newest first with an id below ``before`` (the previous page's last id)."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if before is not None:
        query = query.where(Job.id < before)
    return list(session.scalars(query))


def error_counts(session: Session, job_ids: Sequence[int]) -> dict[int, int]:
    """Per job, how many of its predictions are per-file errors (jobs without any: absent)."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(PredictionRow.job_id, func.count())
        .where(PredictionRow.job_id.in_(list(job_ids)), PredictionRow.error.is_not(None))
        .group_by(PredictionRow.job_id)
    )
    return {int(job_id): int(count) for job_id, count in rows}


@dataclass(frozen=True)
class PredictionFilter:
    """Which predictions of a job the table shows, and in which order."""

    label: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    errors_only: bool = False
    sort: PredictionSort = "index"


@dataclass(frozen=True)
class PredictionCursor:
    """Where the next page starts: the last row's sort key (confidence, item index)."""

    item_index: int
    confidence: float | None = None

    def encode(self) -> str:
        if self.confidence is None:
            return str(self.item_index)
        return f"{self.confidence!r}:{self.item_index}"

    @classmethod
    def decode(cls, text: str) -> PredictionCursor:
        """Raises ValueError for anything but ``<index>`` or ``<confidence>:<index>``."""
        confidence, _, index = text.rpartition(":")
        item_index = int(index)
        if not confidence:
            return cls(item_index)
        value = float(confidence)
        if value != value:  # NaN orders nowhere
            raise ValueError("confidence must be a number")
        return cls(item_index, value)


def _sort_confidence() -> ColumnElement[float]:
    return func.coalesce(PredictionRow.confidence, _NO_CONFIDENCE)


def _conditions(job_id: int, flt: PredictionFilter) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [PredictionRow.job_id == job_id]
    if flt.label is not None:
        where.append(PredictionRow.label == flt.label)
    if flt.min_confidence is not None:
        where.append(PredictionRow.confidence >= flt.min_confidence)
    if flt.max_confidence is not None:
        where.append(PredictionRow.confidence <= flt.max_confidence)
    if flt.errors_only:
        where.append(PredictionRow.error.is_not(None))
    return where


def filtered_predictions(
    session: Session,
    job_id: int,
    flt: PredictionFilter,
    *,
    after: PredictionCursor | None = None,
    limit: int = 50,
) -> list[PredictionRow]:
    """One page of the job's predictions matching ``flt``, starting after ``after``."""
    index = PredictionRow.item_index
    where = _conditions(job_id, flt)
    if flt.sort == "index":
        if after is not None:
            where.append(index > after.item_index)
        return list(session.scalars(
            select(PredictionRow).where(*where).order_by(index).limit(limit)))
    conf = _sort_confidence()
    # Ties in confidence are broken by index ascending in both directions, so the cursor's
    # (confidence, index) pair always names one position.
    if after is not None and after.confidence is not None:
        beyond = conf < after.confidence if flt.sort == "confidence_desc" \
            else conf > after.confidence
        where.append(or_(beyond, and_(conf == after.confidence, index > after.item_index)))
    order = (conf.desc(), index) if flt.sort == "confidence_desc" else (conf, index)
    # Sort only (confidence, index) pairs, then fetch the page's rows: no index serves this
    # order, and sorting a 100k-row job's whole rows (paths, top-k JSON) costs several times
    # as much as sorting the pairs.
    picked = [int(i) for i in session.scalars(
        select(index).where(*where).order_by(*order).limit(limit))]
    if not picked:
        return []
    rows = {r.item_index: r for r in session.scalars(
        select(PredictionRow).where(PredictionRow.job_id == job_id, index.in_(picked)))}
    return [rows[i] for i in picked if i in rows]


def cursor_after(row: PredictionRow, flt: PredictionFilter) -> PredictionCursor:
    """The cursor of the page that follows ``row`` (the last row shown)."""
    if flt.sort == "index":
        return PredictionCursor(row.item_index)
    confidence = _NO_CONFIDENCE if row.confidence is None else float(row.confidence)
    return PredictionCursor(row.item_index, confidence)


def count_filtered_predictions(session: Session, job_id: int, flt: PredictionFilter, *,
                               cap: int = MATCH_COUNT_CAP) -> int:
    """How many predictions match ``flt``, counted up to ``cap + 1`` (a page needs "more
    than 10,000", not a full scan of a 100k-row job per filter change)."""
    matching = select(PredictionRow.id).where(*_conditions(job_id, flt)).limit(cap + 1)
    query = select(func.count()).select_from(matching.subquery())
    return int(session.scalar(query) or 0)


def get_prediction(session: Session, job_id: int, item_index: int) -> PredictionRow | None:
    return session.scalars(
        select(PredictionRow).where(
            PredictionRow.job_id == job_id, PredictionRow.item_index == item_index
        )
    ).one_or_none()
