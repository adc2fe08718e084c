"""Result export: one CSV layout of a classify job's predictions, for the CLI and the API."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePath
from typing import Any, TextIO

from sqlalchemy.orm import Session

from scheduler import repository

__all__ = [
    "CSV_FLUSH_BYTES",
    "PREDICTION_COLUMNS",
    "explanation_cell",
    "export_to_file",
    "prediction_csv_row",
    "stream_predictions_csv",
    "write_predictions_csv",
]

#: A streamed CSV response is flushed to the client in pieces of about this size.
CSV_FLUSH_BYTES = 64 * 1024

PREDICTION_COLUMNS: tuple[str, ...] = (
    "item_index", "path", "label", "confidence", "top_k", "error", "explanation"
)


def explanation_cell(row: Any) -> str:
    """The row's explanation as the export names it: the artifact's path relative to the job
    folder (``explanations/7.png``), or "" when it has none.

    The job folder is ``settings.jobs_dir / str(job_id)``, the nearest folder of the stored
    path named by the job's id, so the export needs no settings; a path outside any such
    folder keeps only its file name (a server path is never exported)."""
    stored = getattr(row, "explanation", None)
    if not stored:
        return ""
    path = PurePath(stored)
    if not path.is_absolute():
        return path.as_posix()
    parts = path.parts
    job = str(getattr(row, "job_id", ""))
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == job:
            return PurePath(*parts[i + 1:]).as_posix()
    return path.name


def prediction_csv_row(row: Any) -> list[Any]:
    """A prediction row as CSV cells; ``top_k`` is JSON (``[[label, p], ...]``) so it
    round-trips, and ``confidence`` uses ``repr`` so no precision is lost.

    ``row`` is a ``scheduler.schema.Prediction`` or anything with its attributes."""
    return [
        row.item_index,
        row.path,
        row.label or "",
        "" if row.confidence is None else repr(float(row.confidence)),
        json.dumps([list(pair) for pair in (row.top_k or [])]),
        row.error or "",
        explanation_cell(row),
    ]


def write_predictions_csv(rows: Iterable[Any], out: TextIO) -> int:
    """The header and one line per prediction row written to ``out``; returns the rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    n = 0
    for row in rows:
        writer.writerow(prediction_csv_row(row))
        n += 1
    return n


def stream_predictions_csv(sessions: Callable[[], Session], job_id: int) -> Iterator[str]:
    """A job's predictions as CSV text pieces, for a streamed HTTP response (the API's and
    the dashboard's download). Its own session: the generator runs after the endpoint
    returned. Memory stays flat (keyset pages from the repository, flushed every 64 KiB)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    with sessions() as session:
        for row in repository.iter_predictions(session, job_id):
            writer.writerow(prediction_csv_row(row))
            if buffer.tell() >= CSV_FLUSH_BYTES:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()


def export_to_file(path: Path, write: Callable[[TextIO], int]) -> int:
    """Run ``write`` on a sibling ``<name>.part`` file, then rename it onto ``path``; returns
    what ``write`` returned. A failed or interrupted export leaves neither a half-written
    file under the real name nor the part file."""
    tmp = path.with_name(path.name + ".part")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            n = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
