"""Predictions of classify jobs: idempotent bulk inserts (COPY on PostgreSQL), counts, pages
and keyset streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from scheduler.repository.artifacts import record_artifact
from scheduler.repository.base import (
    NotFoundError,
    dialect_insert,
    psycopg_connection,
    table_of,
)
from scheduler.schema import Artifact, PredictionRow, utcnow

__all__ = [
    "EXPLANATION_KIND",
    "PredictionRecord",
    "count_prediction_errors",
    "count_predictions",
    "iter_predictions",
    "list_predictions",
    "record_predictions",
    "set_explanation",
]

#: The artifact kind of a prediction's Grad-CAM explanation.
EXPLANATION_KIND = "explanation"


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One classified input as a worker reports it (``error`` set when the file was unreadable)."""

    item_index: int
    path: str
    file_sha256: str | None
    label: str | None
    confidence: float | None
    top_k: tuple[tuple[str, float], ...] = ()
    error: str | None = None
    #: Entropy of the calibrated probabilities (the review queue's order).
    entropy: float | None = None
    #: Path of the Grad-CAM artifact, when the worker explained the item with the batch
    #: (it records the Artifact row itself, or calls :func:`set_explanation`).
    explanation: str | None = None


def record_predictions(session: Session, job_id: int, records: Sequence[PredictionRecord]) -> int:
    """Bulk insert predictions; rows whose (job_id, item_index) exists are skipped.

    Returns the number of rows actually added. PostgreSQL (psycopg 3): the rows are COPYed
    into a session-private staging table, then moved with one ``INSERT ... SELECT ... ON
    CONFLICT (job_id, item_index) DO NOTHING`` (multi-row VALUES statements spend most of their
    time in client-side query parsing; COPY does not). SQLite and other drivers: an
    ``executemany`` of ``INSERT ... ON CONFLICT DO NOTHING``.
    """
    if not records:
        return 0
    now = utcnow()
    psycopg_conn = psycopg_connection(session)
    if psycopg_conn is not None:
        return _copy_predictions(psycopg_conn, job_id, records, now)
    rows = [
        {
            "job_id": job_id,
            "item_index": r.item_index,
            "path": r.path,
            "file_sha256": r.file_sha256,
            "label": r.label,
            "confidence": r.confidence,
            "top_k": _top_k_json(r.top_k),
            "error": r.error,
            "entropy": r.entropy,
            "explanation": r.explanation,
            "created_at": now,
        }
        for r in records
    ]
    stmt = dialect_insert(session, table_of(PredictionRow)).on_conflict_do_nothing(
        index_elements=["job_id", "item_index"]
    )
    # preserve_rowcount: SQLAlchemy otherwise drops the cursor's rowcount for INSERTs; for an
    # executemany sqlite3 reports the total of inserted rows (skipped conflicts count 0).
    result = session.execute(stmt, rows, execution_options={"preserve_rowcount": True})
    return int(result.rowcount)  # type: ignore[attr-defined]


def _top_k_json(top_k: Sequence[tuple[str, float]]) -> list[list[Any]]:
    return [[str(label), float(p)] for label, p in top_k]


_STAGE_TABLE = "mriq_prediction_stage"


def _copy_predictions(
    conn: Any, job_id: int, records: Sequence[PredictionRecord], now: datetime
) -> int:
    with conn.cursor() as cursor:
        # A temporary table is private to this connection; ON COMMIT DELETE ROWS empties it at
        # every commit and the DELETE below empties it for further calls in this transaction.
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE_TABLE} ("
            "item_index integer, path text, file_sha256 text, label text, "
            "confidence double precision, top_k text, error text, entropy double precision, "
            "explanation text) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(
            f"COPY {_STAGE_TABLE} (item_index, path, file_sha256, label, confidence, top_k, "
            "error, entropy, explanation) FROM STDIN"
        ) as copy:
            for r in records:
                copy.write_row(
                    (
                        r.item_index,
                        r.path,
                        r.file_sha256,
                        r.label,
                        r.confidence,
                        json.dumps(_top_k_json(r.top_k)),
                        r.error,
                        r.entropy,
                        r.explanation,
                    )
                )
        # A batch repeating an item_index is fine too: DO NOTHING skips the second row.
        cursor.execute(
            "INSERT INTO predictions (job_id, item_index, path, file_sha256, label, confidence, "
            "top_k, error, entropy, explanation, created_at) "
            "SELECT %s, item_index, path, file_sha256, label, confidence, top_k::json, error, "
            f"entropy, explanation, %s FROM {_STAGE_TABLE} "
            "ON CONFLICT (job_id, item_index) DO NOTHING",
            (job_id, now),
        )
        added = cursor.rowcount
        cursor.execute(f"DELETE FROM {_STAGE_TABLE}")
    return int(added)


def set_explanation(session: Session, item_id: int, path: str) -> Artifact:
    """Record ``path`` (the artifact file, as other artifacts: a path inside the job folder)
    as the explanation of prediction ``item_id`` and register it as an artifact of the job.

    Idempotent: explaining an item again replaces its explanation, and the artifact row of
    an earlier file at another path goes with it (the old file is no longer the item's).
    Raises :class:`NotFoundError` for an unknown item."""
    row = session.get(PredictionRow, item_id)
    if row is None:
        raise NotFoundError("prediction", item_id)
    previous = row.explanation
    if previous and previous != path:
        session.execute(
            delete(Artifact).where(Artifact.job_id == row.job_id, Artifact.path == previous,
                                   Artifact.kind == EXPLANATION_KIND)
        )
    row.explanation = path
    return record_artifact(session, job_id=row.job_id, kind=EXPLANATION_KIND, path=path)


def count_predictions(session: Session, job_id: int) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(PredictionRow).where(PredictionRow.job_id == job_id)
        )
        or 0
    )


def count_prediction_errors(session: Session, job_id: int) -> int:
    """Predictions of the job that are per-file errors (unreadable input, failed chunk)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(PredictionRow)
            .where(PredictionRow.job_id == job_id, PredictionRow.error.is_not(None))
        )
        or 0
    )


def list_predictions(
    session: Session, job_id: int, *, offset: int = 0, limit: int = 1000
) -> list[PredictionRow]:
    """A page of the job's predictions ordered by item_index."""
    return list(
        session.scalars(
            select(PredictionRow)
            .where(PredictionRow.job_id == job_id)
            .order_by(PredictionRow.item_index)
            .offset(offset)
            .limit(limit)
        )
    )


def iter_predictions(session: Session, job_id: int, batch: int = 5000) -> Iterator[PredictionRow]:
    """All of the job's predictions ordered by item_index, fetched in keyset pages of ``batch``
    rows (no OFFSET scans; memory stays flat because the session's identity map only holds
    rows weakly, so pages the caller dropped are freed). For a long export on SQLite, start the
    session with ``session.connection(execution_options=scheduler.database.READ_ONLY)`` so the
    stream does not hold the write lock."""
    last = -1
    while True:
        rows = list(
            session.scalars(
                select(PredictionRow)
                .where(PredictionRow.job_id == job_id, PredictionRow.item_index > last)
                .order_by(PredictionRow.item_index)
                .limit(batch)
            )
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].item_index
