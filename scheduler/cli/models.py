"""``mriq models list|show|promote|rollback``: the model registry."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from core.formats import EXPORT_FORMATS
from scheduler.cli.app import models_app, runtime
from scheduler.cli.render import (
    JsonOpt,
    cells,
    fmt_float,
    metric,
    model_doc,
    print_json,
    stdout_console,
)
from scheduler.cli.submit import submitter
from scheduler.cli.waiting import WaitOpt, report_submitted


def _models_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("id", "arch", "labels", "stage", "accuracy", "macro_f1", "train job", "reviews",
                "created", "promoted"):
        table.add_column(col, overflow="fold")
    for m in rows:
        table.add_row(*cells(
            str(m["id"]),
            m["arch"],
            str(m["label_mode"]),
            m["stage"],
            fmt_float(metric(m["metrics"], "accuracy", "test_accuracy")),
            fmt_float(metric(m["metrics"], "macro_f1", "test_macro_f1")),
            "" if m["training_job_id"] is None else str(m["training_job_id"]),
            "" if m["reviews_used"] is None else str(m["reviews_used"]),
            (m["created_at"] or "")[:19],
            (m["promoted_at"] or "")[:19],
        ))
    return table


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """List model versions."""
    from scheduler import repository

    with runtime(ctx).sessions()() as session:
        rows = [model_doc(m) for m in repository.list_model_versions(session)]
    if as_json:
        print_json(rows)
    else:
        stdout_console().print(_models_table(rows, "model versions"))


@models_app.command("show")
def models_show(
    ctx: typer.Context, model_id: int = typer.Argument(..., min=1), as_json: bool = JsonOpt
) -> None:
    """Show one model version with its metrics and lineage (the reviews it trained on)."""
    from scheduler import repository

    with runtime(ctx).sessions()() as session:
        doc = model_doc(repository.get_model_version(session, model_id))
        doc["exports"] = [
            a.path for a in repository.list_model_artifacts(
                session, model_id, repository.EXPORT_ARTIFACT
            )
        ]
    if as_json:
        print_json(doc)
        return
    table = Table(title=f"model version {model_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in doc.items():
        if key in ("classes", "metrics", "review_ids", "exports"):
            value = json.dumps(value)
        table.add_row(*cells(key, "" if value is None else str(value)))
    stdout_console().print(table)


@models_app.command("promote")
def models_promote(
    ctx: typer.Context, model_id: int = typer.Argument(..., min=1), as_json: bool = JsonOpt
) -> None:
    """Make a model version the production model (the previous one is archived)."""
    from scheduler import repository

    with runtime(ctx).sessions()() as session, session.begin():
        doc = model_doc(repository.promote_model_version(session, model_id))
    if as_json:
        print_json(doc)
    else:
        stdout_console().print(f"model version {doc['id']} is now production", highlight=False)


@models_app.command("rollback")
def models_rollback(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Archive the production model and restore the previously promoted one."""
    from scheduler import repository

    with runtime(ctx).sessions()() as session, session.begin():
        doc = model_doc(repository.rollback_production(session))
    if as_json:
        print_json(doc)
    else:
        stdout_console().print(
            f"rolled back: model version {doc['id']} is production", highlight=False
        )


@models_app.command("export")
def models_export(
    ctx: typer.Context,
    model_id: int = typer.Argument(..., min=1),
    fmt: str = typer.Option(
        ..., "--format", "-f", help=f"Export format: {' or '.join(EXPORT_FORMATS)}."
    ),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export a model version to ONNX or TorchScript, verified against the checkpoint
    (outputs within 1e-4); the file is listed by `mriq models show`."""
    from scheduler import submission

    rt = runtime(ctx)
    job_id = submission.submit_export(
        rt.sessions(), rt.dispatcher, rt.settings, model_id, fmt, submitter=submitter()
    )
    report_submitted(rt, job_id, wait=wait, as_json=as_json)
