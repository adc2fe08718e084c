"""``mriq results``: export a classify job's predictions as CSV or JSON, streamed from SQL."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import typer

from scheduler import export
from scheduler.cli.app import CliError, Runtime, app, runtime
from scheduler.cli.render import prediction_doc, stderr_console
from scheduler.schema import JobKind

if TYPE_CHECKING:
    from scheduler.schema import Job


class ResultFormat(StrEnum):
    csv = "csv"
    json = "json"


def write_predictions_csv(rt: Runtime, job_id: int, out: TextIO) -> int:
    """Stream a classify job's predictions as CSV (ordered by item_index); returns rows."""
    from scheduler import repository

    with rt.sessions()() as session:
        _require_classify(repository.get_job(session, job_id))
        return export.write_predictions_csv(repository.iter_predictions(session, job_id), out)


def write_predictions_json(rt: Runtime, job_id: int, out: TextIO) -> int:
    """Stream a classify job's predictions as one JSON array; returns rows."""
    # Written element by element so memory stays flat for 100k rows.
    from scheduler import repository

    n = 0
    with rt.sessions()() as session:
        _require_classify(repository.get_job(session, job_id))
        out.write("[")
        for row in repository.iter_predictions(session, job_id):
            out.write(("\n  " if n == 0 else ",\n  ") + json.dumps(prediction_doc(row)))
            n += 1
        out.write("\n]\n" if n else "]\n")
    return n


def _require_classify(job: Job) -> None:
    if job.kind != JobKind.CLASSIFY:
        kind = JobKind(job.kind).value
        raise CliError(f"job {job.id} is a {kind} job: only classify jobs have "
                       f"predictions (see `mriq jobs show {job.id}`)")


@app.command()
def results(
    ctx: typer.Context,
    job_id: int = typer.Argument(..., min=1),
    fmt: ResultFormat = typer.Option(ResultFormat.csv, "--format", help="csv or json."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write to this file, not stdout."),
) -> None:
    """Export a classify job's predictions (streamed from SQL, in input order).

    CSV columns: item_index, path, label, confidence, top_k (JSON [[label, p], ...]), error,
    explanation (the Grad-CAM file, relative to the job folder).
    """
    rt = runtime(ctx)
    writer = write_predictions_csv if fmt is ResultFormat.csv else write_predictions_json
    if out is None:
        writer(rt, job_id, sys.stdout)
        return
    try:
        # Never a half-written export under the real name (export_to_file writes a .part).
        n = export.export_to_file(out, lambda fh: writer(rt, job_id, fh))
    except OSError as exc:
        # A full disk's ENOSPC names no file; say which and that nothing half-written stays.
        reason = exc.strerror or str(exc)
        raise CliError(f"{out}: cannot write the export ({reason}); nothing was written") from exc
    stderr_console().print(f"wrote {n} predictions to {out}", highlight=False)
