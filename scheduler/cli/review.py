"""``mriq review``: work through the review queue and export what was reviewed.

Mounted on the root app (``app.add_typer(review_app, name="review")``). The root callback's
runtime object (``ctx.find_root().obj``: ``settings`` and ``sessions()``) gives the
database, so this module does not import the CLI's root module (which imports this one).
The rules live in :mod:`scheduler.review`; this module parses, prints and maps errors:
unknown items exit 1, refused input (a label outside the model's classes, an error row, an
export folder that holds other data) exits 2, each with one ``error:`` line on stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session, sessionmaker

from scheduler import review
from scheduler.repository import NotFoundError
from scheduler.review_export import ExportError
from scheduler.schema import ReviewDecision, ReviewStatus
from scheduler.settings import Settings

__all__ = ["review_app"]

review_app = typer.Typer(
    help="The review queue: uncertain or flagged predictions, most uncertain first; accept "
    "or correct them, export the reviewed images as a training set.",
    no_args_is_help=True,
)


class _Runtime(Protocol):
    settings: Settings

    def sessions(self) -> sessionmaker[Session]: ...


class StatusChoice(StrEnum):
    pending = "pending"
    accepted = "accepted"
    corrected = "corrected"
    all = "all"


def default_reviewer() -> str:
    """The OS user, as decisions made from this shell are recorded."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


JsonOpt = typer.Option(False, "--json", help="Print one JSON document instead of a table.")
JobOpt = typer.Option(None, "--job", min=1, help="Only items of this classify job.")
ReviewerOpt = typer.Option(None, "--reviewer", help="Who decides (default: the OS user).")
ItemArg = typer.Argument(..., min=1, help="Review item id (from `mriq review list`).")


def _runtime(ctx: typer.Context) -> _Runtime:
    obj: Any = ctx.find_root().obj
    if obj is None or not hasattr(obj, "sessions"):
        raise RuntimeError("the root callback did not run")
    runtime: _Runtime = obj
    return runtime


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except NotFoundError as exc:
        _fail(str(exc), 1)
    except (review.ReviewError, ExportError) as exc:
        _fail(str(exc), 2)


def _fail(message: str, code: int) -> None:
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    raise typer.Exit(code)


def _plain(value: Any) -> Any:
    if isinstance(value, StrEnum):
        return value.value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=_plain, indent=2) + "\n")


def item_dict(item: review.ReviewItem) -> dict[str, Any]:
    """The JSON entry of an item: item_id, job_id, path, label, confidence, top_k,
    explanation, status, then the queue's order key and the current decision."""
    doc = dataclasses.asdict(item)
    doc["top_k"] = [list(pair) for pair in item.top_k]
    keys = ("item_id", "job_id", "path", "label", "confidence", "top_k", "explanation",
            "status", "entropy", "flagged", "item_index", "reviewed_label", "reviewer",
            "decided_at", "review_id")
    return {key: _plain(doc[key]) for key in keys} | {"cursor": item.cursor}


def decision_dict(decision: ReviewDecision) -> dict[str, Any]:
    return {
        "review_id": decision.id, "item_id": int(decision.prediction_id),
        "job_id": decision.job_id, "decision": _plain(decision.decision),
        "label": decision.label, "reviewer": decision.reviewer,
        "decided_at": _plain(decision.decided_at), "current": not decision.superseded,
    }


def _items_table(items: list[review.ReviewItem], title: str) -> Table:
    table = Table(title=title)
    for column in ("item", "job", "status", "label", "conf", "entropy", "reviewed", "path"):
        table.add_column(column, overflow="fold")
    for i in items:
        table.add_row(*[Text(str(v)) for v in (
            i.item_id, i.job_id, i.status.value + (" (flagged)" if i.flagged else ""), i.label,
            "" if i.confidence is None else f"{i.confidence:.3f}", f"{i.entropy:.3f}",
            i.reviewed_label or "", i.path)])
    return table


def _stdout() -> Console:
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


@review_app.command("list")
def review_list(
    ctx: typer.Context,
    job: int | None = JobOpt,
    status: StatusChoice = typer.Option(StatusChoice.pending, "--status",
                                        help="pending, accepted, corrected or all."),
    limit: int = typer.Option(review.DEFAULT_LIMIT, "--limit", min=1, max=review.MAX_LIMIT),
    after: str | None = typer.Option(None, "--after", help="Cursor: list after this entry."),
    as_json: bool = JsonOpt,
) -> None:
    """List review items, most uncertain first."""
    wanted = None if status is StatusChoice.all else ReviewStatus(status.value)
    with _errors(), _runtime(ctx).sessions()() as session:
        items = review.queue(session, job_id=job, status=wanted, limit=limit, after=after)
    if as_json:
        _print_json([item_dict(i) for i in items])
    else:
        _stdout().print(_items_table(items, f"review queue ({status.value})"))


@review_app.command("next")
def review_next(ctx: typer.Context, job: int | None = JobOpt, as_json: bool = JsonOpt) -> None:
    """The most uncertain pending item (JSON null when the queue is empty)."""
    with _errors(), _runtime(ctx).sessions()() as session:
        item = review.next_item(session, job_id=job)
    if as_json:
        _print_json(None if item is None else item_dict(item))
    elif item is None:
        Console(stderr=True).print("the review queue is empty")
    else:
        _stdout().print(_items_table([item], "next review item"))


def _decide(ctx: typer.Context, item_id: int, status: ReviewStatus, label: str | None,
            reviewer: str | None) -> None:
    who = reviewer or default_reviewer()
    with _errors(), _runtime(ctx).sessions()() as session:
        with session.begin():
            decision = review.decide(session, item_id, status=status, label=label, reviewer=who)
        doc = decision_dict(decision)
    Console(stderr=True, soft_wrap=True).print(
        f"item {item_id}: {doc['decision']} as {escape(doc['label'])} by {escape(who)}",
        highlight=False,
    )


@review_app.command("accept")
def review_accept(ctx: typer.Context, item_id: int = ItemArg,
                  reviewer: str | None = ReviewerOpt) -> None:
    """Accept the predicted label."""
    _decide(ctx, item_id, ReviewStatus.ACCEPTED, None, reviewer)


@review_app.command("correct")
def review_correct(
    ctx: typer.Context,
    item_id: int = ItemArg,
    label: str = typer.Argument(..., help="The right label: one of the model's classes."),
    reviewer: str | None = ReviewerOpt,
) -> None:
    """Correct the label (it replaces an earlier decision; the history keeps both)."""
    _decide(ctx, item_id, ReviewStatus.CORRECTED, label, reviewer)


@review_app.command("flag")
def review_flag(ctx: typer.Context, item_id: int = ItemArg,
                reviewer: str | None = ReviewerOpt) -> None:
    """Put a prediction into the review queue whatever its confidence."""
    with _errors(), _runtime(ctx).sessions()() as session, session.begin():
        review.flag(session, item_id, reviewer=reviewer or default_reviewer())
    Console(stderr=True).print(f"item {item_id}: flagged for review")


@review_app.command("history")
def review_history(ctx: typer.Context, item_id: int = ItemArg, as_json: bool = JsonOpt) -> None:
    """Every decision made on an item, oldest first."""
    with _errors(), _runtime(ctx).sessions()() as session:
        docs = [decision_dict(d) for d in review.history(session, item_id)]
    if as_json:
        _print_json(docs)
        return
    table = Table(title=f"review item {item_id}")
    for column in ("review", "decision", "label", "reviewer", "decided_at", "current"):
        table.add_column(column)
    for d in docs:
        table.add_row(*[Text(str(d[k])) for k in ("review_id", "decision", "label", "reviewer",
                                                  "decided_at", "current")])
    _stdout().print(table)


@review_app.command("export")
def review_export(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Folder to write (new, empty or an earlier "
                                               "export, which is replaced)."),
    job: int | None = JobOpt,
    copy: bool = typer.Option(False, "--copy", help="Copy the images instead of linking."),
    as_json: bool = JsonOpt,
) -> None:
    """Write the reviewed images as a dataset `mriq train --data` reads: class folders plus
    manifest.csv (path,label,reviewer,decided_at,source_job)."""
    rt = _runtime(ctx)
    with _errors(), rt.sessions()() as session:
        items = review.reviewed_items(session, job_id=job)
        summary = review.export_dataset(items, out, roots=rt.settings.data_roots, copy=copy)
    if as_json:
        _print_json({"out_dir": summary.out_dir, "manifest": summary.manifest,
                     "written": summary.written, "per_label": dict(summary.per_label),
                     "skipped": [{"path": p, "reason": r} for p, r in summary.skipped]})
        return
    err = Console(stderr=True, soft_wrap=True)
    for path, reason in summary.skipped:
        err.print(f"skipped {escape(path)}: {escape(reason)}", highlight=False)
    err.print(f"exported {summary.written} reviewed image(s) to {escape(str(summary.out_dir))}",
              highlight=False)
