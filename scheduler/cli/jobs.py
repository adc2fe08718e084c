"""``mriq jobs list|show|cancel|wait``: read and steer jobs already submitted."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from scheduler import submission
from scheduler.cli.app import Runtime, jobs_app, runtime
from scheduler.cli.render import (
    JsonOpt,
    artifact_doc,
    cells,
    epoch_doc,
    evaluation_doc,
    fmt_float,
    job_doc,
    print_json,
    short,
    stdout_console,
)
from scheduler.cli.waiting import wait_and_report
from scheduler.schema import JobKind, JobStatus


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: JobStatus | None = typer.Option(None, help="Only jobs with this status."),
    kind: JobKind | None = typer.Option(None, help="Only jobs of this kind."),
    limit: int = typer.Option(50, min=1, max=10_000),
    offset: int = typer.Option(0, min=0),
    as_json: bool = JsonOpt,
) -> None:
    """List jobs, newest first."""
    from scheduler import repository

    rt = runtime(ctx)
    with rt.sessions()() as session:
        rows = [
            job_doc(j)
            for j in repository.list_jobs(
                session, status=status, kind=kind, limit=limit, offset=offset
            )
        ]
    if as_json:
        print_json(rows)
        return
    table = Table(title="jobs")
    for col in ("id", "kind", "status", "progress", "model", "submitter", "created", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*cells(
            str(r["id"]),
            r["kind"],
            r["status"],
            f"{r['progress_done']}/{r['progress_total']}",
            "" if r["model_version_id"] is None else str(r["model_version_id"]),
            r["submitter"] or "",
            (r["created_at"] or "")[:19],
            short(r["error"], 40),
        ))
    stdout_console().print(table)


def job_details(rt: Runtime, job_id: int) -> dict[str, Any]:
    """The job's document plus its epochs, evaluation summary, artifacts and prediction count."""
    from scheduler import repository

    with rt.sessions()() as session:
        doc = job_doc(repository.get_job(session, job_id))
        doc["epochs"] = [epoch_doc(m) for m in repository.list_epoch_metrics(session, job_id)]
        try:
            evaluation = repository.get_evaluation(session, job_id)
        except repository.NotFoundError:  # train jobs before their test split, classify jobs
            doc["evaluation"] = None
        else:
            doc["evaluation"] = evaluation_doc(evaluation)
        doc["artifacts"] = [artifact_doc(a) for a in repository.list_artifacts(session, job_id)]
        if doc["kind"] == JobKind.CLASSIFY:
            doc["predictions"] = repository.count_predictions(session, job_id)
    return doc


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context, job_id: int = typer.Argument(..., min=1), as_json: bool = JsonOpt
) -> None:
    """Show one job: status, progress, epochs, evaluation and artifacts."""
    doc = job_details(runtime(ctx), job_id)
    if as_json:
        print_json(doc)
        return
    out = stdout_console()
    summary = Table(title=f"job {job_id}", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    for key in ("kind", "status", "progress_done", "progress_total", "model_version_id",
                "submitter", "created_at", "started_at", "finished_at", "error"):
        summary.add_row(*cells(key, "" if doc[key] is None else str(doc[key])))
    summary.add_row(*cells("params", json.dumps(doc["params"])))
    if "predictions" in doc:
        summary.add_row(*cells("predictions", str(doc["predictions"])))
    out.print(summary)
    if doc["epochs"]:
        epochs = Table(title="epochs")
        for col in ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds"):
            epochs.add_column(col, justify="right")
        for e in doc["epochs"]:
            epochs.add_row(*cells(str(e["epoch"]), *(fmt_float(e[k]) for k in (
                "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds"))))
        out.print(epochs)
    if doc["evaluation"]:
        ev = doc["evaluation"]
        out.print(
            f"evaluation: accuracy {fmt_float(ev['accuracy'])}, macro F1 "
            f"{fmt_float(ev['macro_f1'])} on {ev['dataset']}",
            highlight=False,
        )
    if doc["artifacts"]:
        arts = Table(title="artifacts")
        for col in ("id", "kind", "path"):
            arts.add_column(col, overflow="fold")
        for a in doc["artifacts"]:
            arts.add_row(*cells(str(a["id"]), a["kind"], a["path"]))
        out.print(arts)


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context, job_id: int = typer.Argument(..., min=1), as_json: bool = JsonOpt
) -> None:
    """Cancel a job: queued jobs stop at once, running ones at their next checkpoint."""
    rt = runtime(ctx)
    status = submission.cancel_job(rt.sessions(), rt.dispatcher, job_id)
    if as_json:
        print_json({"id": job_id, "status": status})
    else:
        stdout_console().print(f"job {job_id}: {status}", highlight=False)


@jobs_app.command("wait")
def jobs_wait(
    ctx: typer.Context,
    job_id: int = typer.Argument(..., min=1),
    timeout: float | None = typer.Option(None, min=0, help="Give up after this many seconds."),
    as_json: bool = JsonOpt,
) -> None:
    """Follow a job until it finishes; exit 1 unless it succeeded."""
    wait_and_report(runtime(ctx), job_id, as_json=as_json, timeout=timeout)
