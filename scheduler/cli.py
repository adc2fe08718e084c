"""The ``mriq`` command line: submit and follow jobs, read results, manage models, run services.

Settings are read once, in the root callback (``load_settings``), and handed to every command
through the Typer context. Tables go to stdout (``--json`` prints exactly one JSON document
instead); progress bars and notes go to stderr so stdout stays pipeable. Known errors print a
one-line message and exit 1 (runtime) or 2 (refused input) without a traceback.

The CLI never imports torch: training runs in worker processes. With the embedded default
(SQLite + filesystem broker) ``--wait`` and ``mriq demo`` start a worker subprocess for the
duration when none answers a ping.
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from core.config import ARCHITECTURES
from scheduler import export, submission
from scheduler.paths import InvalidPathError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from scheduler.dispatch import Dispatcher
    from scheduler.settings import Settings

TERMINAL = ("succeeded", "partial", "failed", "cancelled")
DEMO_MARKER = ".mriq-demo"

# Replaced in tests: exec'ing would replace the test process.
_exec: Callable[[str, Sequence[str], dict[str, str]], NoReturn] = os.execve  # type: ignore[assignment]


class CliError(Exception):
    """A failure with a message for the user; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _stderr() -> Console:
    # soft_wrap: notes carry long paths that are more useful unbroken than wrapped.
    return Console(stderr=True, soft_wrap=True)


def _stdout() -> Console:
    # Created per call so test runners that swap sys.stdout capture the output. Piped
    # output gets a wide fixed width instead of Rich's 80 columns, so rows are not folded
    # (COLUMNS still wins when set).
    tty = sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if tty or os.environ.get("COLUMNS") else 160)


def _error_exit_code(exc: BaseException) -> tuple[int, str] | None:
    """Map known exceptions to (exit code, message); None for unknown ones."""
    from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, submission.SubmissionError | InvalidPathError):
        return 2, str(exc)
    name = type(exc).__name__
    if name in ("DatabaseNotMigratedError", "NotFoundError", "NoRollbackTargetError") or isinstance(
        exc, submission.DispatchError
    ):
        return 1, str(exc)
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        # The server is down, unreachable or refusing: say so, in the driver's own words
        # (psycopg names the host and port), on one line.
        cause = getattr(exc, "orig", None) or exc
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        return 1, f"database unavailable: {lines[0] if lines else type(cause).__name__}"
    if isinstance(exc, SQLAlchemyError):
        return 1, f"database error: {exc.__class__.__name__}: {str(exc).splitlines()[0]}"
    if isinstance(exc, ValueError | OSError):
        return 1, str(exc)
    return None


class _Group(TyperGroup):
    """Root group that turns known exceptions into a message and an exit status."""

    # ``ctx`` is typer's vendored click Context (a private module), hence Any.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            # Typer's own usage errors/exits (Exit and Abort are RuntimeErrors in typer 0.29,
            # so they must be let through before the generic handler below).
            raise
        except KeyboardInterrupt:
            _stderr().print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:
            mapped = _error_exit_code(exc)
            if mapped is None:
                # Still no traceback for users; the type name helps a bug report.
                mapped = (1, f"unexpected {type(exc).__name__}: {exc}")
            code, message = mapped
            # soft_wrap: keep the message on one line so it can be grepped from logs.
            _stderr().print(
                f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code) from None


app = typer.Typer(
    name="mriq",
    cls=_Group,
    help="Train, evaluate and serve CNN classifiers for brain MRI slices as batch jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
jobs_app = typer.Typer(help="List, inspect, wait for and cancel jobs.", no_args_is_help=True)
models_app = typer.Typer(help="List model versions, promote one to production, roll back.",
                         no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")


# --------------------------------------------------------------------------------------
# Runtime: settings -> engine, sessions, dispatcher (created on first use)
# --------------------------------------------------------------------------------------


@dataclass
class Runtime:
    settings: Settings
    _engine: Engine | None = field(default=None, init=False)
    _sessions: sessionmaker[Session] | None = field(default=None, init=False)
    _dispatcher: Dispatcher | None = field(default=None, init=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from scheduler.database import make_engine

            self._engine = make_engine(self.settings.resolved_database_url)
        return self._engine

    def sessions(self) -> sessionmaker[Session]:
        """The session factory, after checking the schema is at the latest revision."""
        if self._sessions is None:
            from scheduler.database import ensure_migrated, make_session_factory

            ensure_migrated(self.engine)
            self._sessions = make_session_factory(self.engine)
        return self._sessions

    def check_migrated(self) -> None:
        self.sessions()

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            from scheduler.dispatch import Dispatcher

            self._dispatcher = Dispatcher(self.settings)
        return self._dispatcher

    def close(self) -> None:
        if self._dispatcher is not None:
            with contextlib.suppress(Exception):
                self._dispatcher.close()
        if self._engine is not None:
            self._engine.dispose()


def _rt(ctx: typer.Context) -> Runtime:
    obj = ctx.find_root().obj
    assert isinstance(obj, Runtime), "root callback did not run"
    return obj


@app.callback()
def _root(ctx: typer.Context) -> None:
    """Settings come from MRIQ_* environment variables (see docs); defaults need no server:
    SQLite and a filesystem broker under ./mriq-data."""
    from pydantic import ValidationError

    from scheduler.settings import load_settings

    try:
        settings = load_settings()
    except ValidationError as exc:
        raise CliError(f"invalid MRIQ_* settings: {exc}", code=2) from None
    _configure_logging(settings.log_level)
    rt = Runtime(settings)
    ctx.obj = rt
    ctx.call_on_close(rt.close)


def _configure_logging(level: str) -> None:
    """Library logs (SQLAlchemy, Celery, ...) to stderr at MRIQ_LOG_LEVEL; stdout stays for
    tables and JSON. Settings are never logged (secrets are SecretStr, URLs masked in repr)."""
    root = logging.getLogger()
    if not root.handlers:  # an embedding process (tests, uvicorn) configured its own
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    if logging.getLevelName(level.upper()) != logging.DEBUG:
        # Alembic narrates every plugin and migration step at INFO, and kombu warns that the
        # filesystem transport has no hostname (it needs none): noise around the CLI's own
        # output unless someone asked for DEBUG.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------
# Serialisation helpers
# --------------------------------------------------------------------------------------


def _cells(*values: Any) -> list[Text]:
    """Table cells as plain Text: paths and errors may contain [brackets] Rich would eat."""
    return [v if isinstance(v, Text) else Text(str(v)) for v in values]


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def job_dict(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": _plain(job.kind),
        "status": _plain(job.status),
        "progress_done": job.progress_done,
        "progress_total": job.progress_total,
        "model_version_id": job.model_version_id,
        "submitter": job.submitter,
        "params": job.params,
        "error": job.error,
        "cancel_requested": bool(job.cancel_requested),
        "created_at": _plain(job.created_at),
        "started_at": _plain(job.started_at),
        "finished_at": _plain(job.finished_at),
    }


def model_dict(model: Any) -> dict[str, Any]:
    return {
        "id": model.id,
        "arch": model.arch,
        "label_mode": model.label_mode,
        "classes": list(model.classes or []),
        "stage": _plain(model.stage),
        "checkpoint_path": model.checkpoint_path,
        "checkpoint_sha256": model.checkpoint_sha256,
        "training_job_id": model.training_job_id,
        "metrics": model.metrics or {},
        "created_at": _plain(model.created_at),
        "promoted_at": _plain(model.promoted_at),
        # calibrated False: trained before temperature scaling, confidences are the raw softmax
        "temperature": model.temperature,
        "calibrated": model.calibrated,
        "ece": model.ece,
        "ece_uncalibrated": model.ece_uncalibrated,
        "nll": model.nll,
        "nll_uncalibrated": model.nll_uncalibrated,
    }


def prediction_dict(row: Any) -> dict[str, Any]:
    return {
        "item_index": row.item_index,
        "path": row.path,
        "label": row.label,
        "confidence": row.confidence,
        "top_k": [list(pair) for pair in (row.top_k or [])],
        "error": row.error,
    }


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=_plain, indent=2) + "\n")


def _fmt_float(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _metric(metrics: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if metrics and metrics.get(key) is not None:
            return metrics[key]
    return None


# --------------------------------------------------------------------------------------
# Waiting, with an embedded worker when no worker is running
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_worker(
    rt: Runtime, *, quiet: bool = False
) -> Iterator[subprocess.Popen[bytes] | None]:
    """Start ``python -m worker --pool solo`` for the duration if no worker answers a ping.

    The worker inherits the environment (so the same MRIQ_* settings) and logs to
    ``<data_dir>/logs/embedded-worker.log``. It is stopped with SIGTERM (a warm shutdown that
    requeues an unfinished task) and killed if it does not exit in time.
    """
    if rt.dispatcher.workers_alive(timeout=1.0):
        yield None
        return
    if not rt.settings.is_embedded_broker:
        # A shared broker has workers of its own (a busy one may not answer a ping in
        # time); a client must not start one that would consume the deployment's queues.
        if not quiet:
            _stderr().print(
                "[yellow]note:[/] no worker answered a ping; the job runs when one is free",
                highlight=False,
            )
        yield None
        return
    log_dir = Path(rt.settings.data_dir).expanduser() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "embedded-worker.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--pool", "solo"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    if not quiet:
        _stderr().print(
            f"no worker running: started an embedded worker (pid {proc.pid}, log {log_path})",
            highlight=False,
        )
    try:
        yield proc
    finally:
        _stop_process(proc)


def _stop_process(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _snapshot(rt: Runtime, job_id: int) -> dict[str, Any]:
    from scheduler import repository

    with rt.sessions()() as session:
        return job_dict(repository.get_job(session, job_id))


def wait_for_job(
    rt: Runtime,
    job_id: int,
    *,
    worker: subprocess.Popen[bytes] | None = None,
    timeout: float | None = None,
    poll: float = 0.5,
) -> dict[str, Any]:
    """Poll the job row until it is terminal, showing a live progress bar on stderr."""
    deadline = None if timeout is None else time.monotonic() + timeout
    snap = _snapshot(rt, job_id)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_stderr(), transient=False) as progress:
        task = progress.add_task(f"job {job_id} {snap['kind']}", total=None)
        while True:
            total = snap["progress_total"] or None
            progress.update(
                task,
                completed=snap["progress_done"] or 0,
                total=total,
                description=f"job {job_id} {snap['kind']} {snap['status']}",
            )
            if snap["status"] in TERMINAL:
                return snap
            if worker is not None and worker.poll() is not None:
                raise CliError(
                    f"the embedded worker exited with status {worker.returncode} before job "
                    f"{job_id} finished; see its log under {rt.settings.data_dir}/logs"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(f"job {job_id} is still {snap['status']} after {timeout:g} s")
            time.sleep(poll)
            snap = _snapshot(rt, job_id)


def _outcome(snap: dict[str, Any]) -> str:
    text = (
        f"job {snap['id']} {snap['kind']} {snap['status']} "
        f"({snap['progress_done']}/{snap['progress_total']})"
    )
    if snap.get("error"):
        text += f": {snap['error']}"
    return text


def _submitted(rt: Runtime, job_id: int, *, wait: bool, as_json: bool) -> None:
    """Print the new job's id; with ``wait``, follow it and exit non-zero unless it succeeded."""
    if not wait:
        if as_json:
            _print_json({"id": job_id})
        else:
            sys.stdout.write(f"{job_id}\n")
            _stderr().print(f"job {job_id} queued; follow it with `mriq jobs wait {job_id}`")
        return
    if not as_json:
        sys.stdout.write(f"{job_id}\n")
        sys.stdout.flush()
    _wait_and_report(rt, job_id, as_json=as_json)


def _wait_and_report(
    rt: Runtime, job_id: int, *, as_json: bool, timeout: float | None = None
) -> None:
    snap = _snapshot(rt, job_id)
    if snap["status"] not in TERMINAL:
        # Only now look for (or start) a worker: a finished job needs none.
        with embedded_worker(rt) as worker:
            snap = wait_for_job(rt, job_id, worker=worker, timeout=timeout)
    if as_json:
        _print_json(snap)
    else:
        colour = "green" if snap["status"] == "succeeded" else "red"
        _stdout().print(f"[{colour}]{escape(_outcome(snap))}[/]", highlight=False)
    if snap["status"] != "succeeded":
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------

JsonOpt = typer.Option(False, "--json", help="Print exactly one JSON document on stdout.")
WaitOpt = typer.Option(
    False, "--wait", help="Follow the job with a progress bar; exit 1 unless it succeeds."
)


@app.command()
def classify(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(
        ..., help="Image files, folders (recursive), globs or @list.txt (one path per line)."
    ),
    model: int | None = typer.Option(
        None, "--model", "-m", help="Model version id (default: the production model)."
    ),
    top_k: int = typer.Option(3, "--top-k", min=1, max=44, help="Labels kept per image."),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Classify images with a model version (a classify job, split into chunks)."""
    rt = _rt(ctx)
    job_id = submission.submit_classify(
        rt.sessions(),
        rt.dispatcher,
        rt.settings,
        inputs,
        model_version_id=model,
        submitter=_submitter(),
        top_k=top_k,
    )
    _submitted(rt, job_id, wait=wait, as_json=as_json)


class LabelsChoice(StrEnum):
    fifteen = "15"
    fortyfour = "44"


@app.command()
def train(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Folder of class folders (Kaggle 44c layout)."),
    arch: str = typer.Option(
        "efficientnet_b0", help=f"Architecture: {', '.join(ARCHITECTURES)}."
    ),
    epochs: int = typer.Option(10, min=1),
    image_size: int = typer.Option(224, "--image-size", min=32, max=2048),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    finetune: bool = typer.Option(
        False, "--finetune/--no-finetune", help="Train only the head of a pretrained backbone."
    ),
    weights: str = typer.Option("auto", help="auto, none, imagenet or a checkpoint path."),
    labels: LabelsChoice = typer.Option(LabelsChoice.fifteen, help="Label space: 15 or 44."),
    seed: int = typer.Option(0, min=0),
    device: str | None = typer.Option(
        None, help="auto, cpu, cuda or cuda:N (default: settings.default_device)."
    ),
    warm_start: bool = typer.Option(
        False, "--warm-start", help="Start from the production model's weights."
    ),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train a model version on a folder (a train job; the worker registers a candidate)."""
    rt = _rt(ctx)
    options = {
        "arch": arch,
        "epochs": epochs,
        "image_size": image_size,
        "batch_size": batch_size,
        "lr": lr,
        "finetune": finetune,
        "weights": weights,
        "labels": labels.value,
        "seed": seed,
        "device": device,
        "warm_start": warm_start,
    }
    job_id = submission.submit_train(
        rt.sessions(), rt.dispatcher, rt.settings, data, options, submitter=_submitter()
    )
    _submitted(rt, job_id, wait=wait, as_json=as_json)


@app.command()
def evaluate(
    ctx: typer.Context,
    model: int = typer.Option(..., "--model", "-m", help="Model version id."),
    data: Path = typer.Option(..., "--data", help="Folder of class folders; every image used."),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Evaluate a model version on a labelled folder (an evaluate job)."""
    rt = _rt(ctx)
    job_id = submission.submit_evaluate(
        rt.sessions(),
        rt.dispatcher,
        rt.settings,
        model_version_id=model,
        data_dir=data,
        submitter=_submitter(),
    )
    _submitted(rt, job_id, wait=wait, as_json=as_json)


def _submitter() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:200]
    except Exception:  # no passwd entry in some containers
        return "cli"


# --------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------


class StatusChoice(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    partial = "partial"
    failed = "failed"
    cancelled = "cancelled"


class KindChoice(StrEnum):
    train = "train"
    evaluate = "evaluate"
    classify = "classify"


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: StatusChoice | None = typer.Option(None, help="Only jobs with this status."),
    kind: KindChoice | None = typer.Option(None, help="Only jobs of this kind."),
    limit: int = typer.Option(50, min=1, max=10_000),
    offset: int = typer.Option(0, min=0),
    as_json: bool = JsonOpt,
) -> None:
    """List jobs, newest first."""
    from scheduler import repository
    from scheduler.schema import JobKind, JobStatus

    rt = _rt(ctx)
    with rt.sessions()() as session:
        rows = [
            job_dict(j)
            for j in repository.list_jobs(
                session,
                status=JobStatus(status.value) if status else None,
                kind=JobKind(kind.value) if kind else None,
                limit=limit,
                offset=offset,
            )
        ]
    if as_json:
        _print_json(rows)
        return
    table = Table(title="jobs")
    for col in ("id", "kind", "status", "progress", "model", "submitter", "created", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*_cells(
            str(r["id"]),
            r["kind"],
            r["status"],
            f"{r['progress_done']}/{r['progress_total']}",
            "" if r["model_version_id"] is None else str(r["model_version_id"]),
            r["submitter"] or "",
            (r["created_at"] or "")[:19],
            _short(r["error"], 40),
        ))
    _stdout().print(table)


def _job_details(rt: Runtime, job_id: int) -> dict[str, Any]:
    from scheduler import repository

    with rt.sessions()() as session:
        doc = job_dict(repository.get_job(session, job_id))
        doc["epochs"] = [
            {
                "epoch": m.epoch,
                "train_loss": m.train_loss,
                "val_loss": m.val_loss,
                "val_accuracy": m.val_accuracy,
                "val_macro_f1": m.val_macro_f1,
                "lr": m.lr,
                "seconds": m.seconds,
            }
            for m in repository.list_epoch_metrics(session, job_id)
        ]
        try:
            evaluation = repository.get_evaluation(session, job_id)
        except repository.NotFoundError:  # train jobs before their test split, classify jobs
            doc["evaluation"] = None
        else:
            doc["evaluation"] = {
                "model_version_id": evaluation.model_version_id,
                "dataset": evaluation.dataset,
                "accuracy": evaluation.accuracy,
                "macro_f1": evaluation.macro_f1,
            }
        doc["artifacts"] = [
            {"id": a.id, "kind": a.kind, "path": a.path, "model_version_id": a.model_version_id}
            for a in repository.list_artifacts(session, job_id)
        ]
        if doc["kind"] == "classify":
            doc["predictions"] = repository.count_predictions(session, job_id)
    return doc


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context, job_id: int = typer.Argument(..., min=1), as_json: bool = JsonOpt
) -> None:
    """Show one job: status, progress, epochs, evaluation and artifacts."""
    doc = _job_details(_rt(ctx), job_id)
    if as_json:
        _print_json(doc)
        return
    out = _stdout()
    summary = Table(title=f"job {job_id}", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    for key in ("kind", "status", "progress_done", "progress_total", "model_version_id",
                "submitter", "created_at", "started_at", "finished_at", "error"):
        summary.add_row(*_cells(key, "" if doc[key] is None else str(doc[key])))
    summary.add_row(*_cells("params", json.dumps(doc["params"])))
    if "predictions" in doc:
        summary.add_row(*_cells("predictions", str(doc["predictions"])))
    out.print(summary)
    if doc["epochs"]:
        epochs = Table(title="epochs")
        for col in ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds"):
            epochs.add_column(col, justify="right")
        for e in doc["epochs"]:
            epochs.add_row(*_cells(str(e["epoch"]), *(_fmt_float(e[k]) for k in (
                "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "seconds"))))
        out.print(epochs)
    if doc["evaluation"]:
        ev = doc["evaluation"]
        out.print(
            f"evaluation: accuracy {_fmt_float(ev['accuracy'])}, macro F1 "
            f"{_fmt_float(ev['macro_f1'])} on {ev['dataset']}",
            highlight=False,
        )
    if doc["artifacts"]:
        arts = Table(title="artifacts")
        for col in ("id", "kind", "path"):
            arts.add_column(col, overflow="fold")
        for a in doc["artifacts"]:
            arts.add_row(*_cells(str(a["id"]), a["kind"], a["path"]))
        out.print(arts)


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context, job_id: int = typer.Argument(..., min=1), as_json: bool = JsonOpt
) -> None:
    """Cancel a job: queued jobs stop at once, running ones at their next checkpoint."""
    rt = _rt(ctx)
    status = submission.cancel_job(rt.sessions(), rt.dispatcher, job_id)
    if as_json:
        _print_json({"id": job_id, "status": status})
    else:
        _stdout().print(f"job {job_id}: {status}", highlight=False)


@jobs_app.command("wait")
def jobs_wait(
    ctx: typer.Context,
    job_id: int = typer.Argument(..., min=1),
    timeout: float | None = typer.Option(None, min=0, help="Give up after this many seconds."),
    as_json: bool = JsonOpt,
) -> None:
    """Follow a job until it finishes; exit 1 unless it succeeded."""
    rt = _rt(ctx)
    _wait_and_report(rt, job_id, as_json=as_json, timeout=timeout)


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------


class ResultFormat(StrEnum):
    csv = "csv"
    json = "json"


def write_predictions_csv(rt: Runtime, job_id: int, out: TextIO) -> int:
    """Stream a classify job's predictions as CSV (ordered by item_index); returns rows."""
    from scheduler import repository

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(export.PREDICTION_COLUMNS)
    n = 0
    with rt.sessions()() as session:
        _require_classify(repository.get_job(session, job_id))
        for row in repository.iter_predictions(session, job_id):
            writer.writerow(export.prediction_csv_row(row))
            n += 1
    return n


def _write_predictions_json(rt: Runtime, job_id: int, out: TextIO) -> int:
    # One JSON array, written element by element so memory stays flat for 100k rows.
    from scheduler import repository

    n = 0
    with rt.sessions()() as session:
        _require_classify(repository.get_job(session, job_id))
        out.write("[")
        for row in repository.iter_predictions(session, job_id):
            out.write(("\n  " if n == 0 else ",\n  ") + json.dumps(prediction_dict(row)))
            n += 1
        out.write("\n]\n" if n else "]\n")
    return n


def _require_classify(job: Any) -> None:
    if _plain(job.kind) != "classify":
        raise CliError(f"job {job.id} is a {_plain(job.kind)} job: only classify jobs have "
                       f"predictions (see `mriq jobs show {job.id}`)")


@app.command()
def results(
    ctx: typer.Context,
    job_id: int = typer.Argument(..., min=1),
    fmt: ResultFormat = typer.Option(ResultFormat.csv, "--format", help="csv or json."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write to this file, not stdout."),
) -> None:
    """Export a classify job's predictions (streamed from SQL, in input order).

    CSV columns: item_index, path, label, confidence, top_k (JSON [[label, p], ...]), error.
    """
    rt = _rt(ctx)
    writer = write_predictions_csv if fmt is ResultFormat.csv else _write_predictions_json
    if out is None:
        writer(rt, job_id, sys.stdout)
        return
    tmp = out.with_name(out.name + ".part")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            n = writer(rt, job_id, fh)
        os.replace(tmp, out)  # never leave a half-written export under the real name
    except OSError as exc:
        # A full disk's ENOSPC names no file; say which and that nothing half-written stays.
        reason = exc.strerror or str(exc)
        raise CliError(f"{out}: cannot write the export ({reason}); nothing was written") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _stderr().print(f"wrote {n} predictions to {out}", highlight=False)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


def _models_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("id", "arch", "labels", "stage", "accuracy", "macro_f1", "train job", "created",
                "promoted"):
        table.add_column(col, overflow="fold")
    for m in rows:
        table.add_row(*_cells(
            str(m["id"]),
            m["arch"],
            str(m["label_mode"]),
            m["stage"],
            _fmt_float(_metric(m["metrics"], "accuracy", "test_accuracy")),
            _fmt_float(_metric(m["metrics"], "macro_f1", "test_macro_f1")),
            "" if m["training_job_id"] is None else str(m["training_job_id"]),
            (m["created_at"] or "")[:19],
            (m["promoted_at"] or "")[:19],
        ))
    return table


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """List model versions."""
    from scheduler import repository

    with _rt(ctx).sessions()() as session:
        rows = [model_dict(m) for m in repository.list_model_versions(session)]
    if as_json:
        _print_json(rows)
    else:
        _stdout().print(_models_table(rows, "model versions"))


@models_app.command("show")
def models_show(
    ctx: typer.Context, model_id: int = typer.Argument(..., min=1), as_json: bool = JsonOpt
) -> None:
    """Show one model version with its metrics."""
    from scheduler import repository

    with _rt(ctx).sessions()() as session:
        doc = model_dict(repository.get_model_version(session, model_id))
    if as_json:
        _print_json(doc)
        return
    table = Table(title=f"model version {model_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in doc.items():
        if key in ("classes", "metrics"):
            value = json.dumps(value)
        table.add_row(*_cells(key, "" if value is None else str(value)))
    _stdout().print(table)


@models_app.command("promote")
def models_promote(
    ctx: typer.Context, model_id: int = typer.Argument(..., min=1), as_json: bool = JsonOpt
) -> None:
    """Make a model version the production model (the previous one is archived)."""
    from scheduler import repository

    with _rt(ctx).sessions()() as session, session.begin():
        doc = model_dict(repository.promote_model_version(session, model_id))
    if as_json:
        _print_json(doc)
    else:
        _stdout().print(f"model version {doc['id']} is now production", highlight=False)


@models_app.command("rollback")
def models_rollback(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Archive the production model and restore the previously promoted one."""
    from scheduler import repository

    with _rt(ctx).sessions()() as session, session.begin():
        doc = model_dict(repository.rollback_production(session))
    if as_json:
        _print_json(doc)
    else:
        _stdout().print(f"rolled back: model version {doc['id']} is production", highlight=False)


# --------------------------------------------------------------------------------------
# services
# --------------------------------------------------------------------------------------


@app.command()
def worker(
    ctx: typer.Context,
    queues: str = typer.Option("gpu,cpu", help="Comma-separated queues to consume."),
    concurrency: int = typer.Option(1, min=1, max=64, help="Tasks run at once."),
    pool: str | None = typer.Option(
        None, help="solo, threads or prefork (default: threads, which keeps answering "
        "ping, revoke and Flower while a long task runs)."
    ),
    hostname: str | None = typer.Option(
        None, help="Worker node name, e.g. gpu@%h (default: mriq-<pid>@<host>)."
    ),
) -> None:
    """Run a worker (replaces this process with `python -m worker`)."""
    rt = _rt(ctx)
    rt.check_migrated()
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise CliError("--queues: give at least one queue (gpu, cpu)", code=2)
    if pool is None:
        # threads, as `python -m worker` defaults to: with solo the task runs on the
        # consumer's thread, so a busy worker misses pings (and `--wait` clients, Flower and
        # revokes see no worker) until the task returns.
        pool = "threads"
    if pool not in ("solo", "threads", "prefork"):
        raise CliError(f"--pool: {pool!r} is not one of solo, threads, prefork", code=2)
    if pool == "solo" and concurrency != 1:
        raise CliError("--pool solo runs one task at a time; use threads or prefork", code=2)
    argv = [sys.executable, "-m", "worker", "--queues", ",".join(names),
            "--concurrency", str(concurrency), "--pool", pool]
    if hostname:
        argv += ["--hostname", hostname]
    rt.close()
    sys.stdout.flush()
    sys.stderr.flush()
    _exec(sys.executable, argv, dict(os.environ))


@app.command()
def api(
    ctx: typer.Context,
    host: str | None = typer.Option(
        None, help="Interface to bind (default settings.api_host; 0.0.0.0 in containers)."
    ),
    port: int | None = typer.Option(
        None, min=1, max=65535, help="Port (default settings.api_port)."
    ),
    insecure: bool = typer.Option(
        False, "--insecure",
        help="Serve on a non-loopback address without MRIQ_API_TOKEN (anyone who can reach "
        "the port can submit jobs and read results).",
    ),
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    rt = _rt(ctx)
    settings = rt.settings
    bind = host or settings.api_host
    if settings.api_token is None and not is_loopback(bind):
        if not insecure:
            raise CliError(
                f"refusing to serve on {bind} without a token: set MRIQ_API_TOKEN (or "
                "MRIQ_API_TOKEN_FILE), bind to 127.0.0.1, or pass --insecure", code=2
            )
        _stderr().print(f"[yellow]warning:[/] serving on {escape(bind)} without a token "
                        "(--insecure): anyone who reaches the port controls the jobs",
                        highlight=False)
    import uvicorn

    from scheduler.api import create_app

    rt.check_migrated()
    uvicorn.run(
        create_app(settings),
        host=bind,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
    )


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost); any
    other name or address (0.0.0.0, ::, a hostname) may be reachable from outside."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return str(value) or None


@app.command()
def flower(
    ctx: typer.Context,
    port: int = typer.Option(5555, min=1, max=65535),
    address: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 in containers)."),
) -> None:
    """Run the Flower monitoring UI (`celery -A worker.app flower`).

    Basic auth comes from MRIQ_FLOWER_BASIC_AUTH (user:password[,user2:password2]). Without it
    the UI and API are open (FLOWER_UNAUTHENTICATED_API is then set, as Flower 2 requires).
    Flower's /metrics and /healthcheck stay unauthenticated either way.
    """
    rt = _rt(ctx)
    env = dict(os.environ)
    auth = _secret(getattr(rt.settings, "flower_basic_auth", None))
    if auth:
        # Via the environment, not argv: argv is visible to every user in `ps`.
        env["FLOWER_BASIC_AUTH"] = auth
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
    else:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
        _stderr().print(
            "[yellow]warning:[/] MRIQ_FLOWER_BASIC_AUTH is not set: Flower runs without "
            "authentication"
        )
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "flower",
            f"--port={port}", f"--address={address}"]
    rt.close()
    sys.stdout.flush()
    sys.stderr.flush()
    _exec(sys.executable, argv, env)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the database schema to the latest revision."""
    from scheduler.database import upgrade

    rt = _rt(ctx)
    upgrade(rt.settings.resolved_database_url)
    _stderr().print(f"database {_redacted(rt.settings.resolved_database_url)} is up to date",
                    highlight=False)


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


def _prepare_demo_dir(folder: Path) -> None:
    """(Re)create a demo data folder; only folders carrying our marker are ever deleted."""
    if folder.exists():
        if not (folder / DEMO_MARKER).exists():
            raise CliError(f"{folder}: exists and was not created by `mriq demo`; "
                           "pass another --out", code=2)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / DEMO_MARKER).write_text("created by `mriq demo`; safe to delete\n")


def _synthesise(folder: Path, *, per_folder: int, seed: int, size: tuple[int, int]) -> None:
    _prepare_demo_dir(folder)
    cmd = [sys.executable, "-m", "core.synth", "--out", str(folder),
           "--per-folder", str(per_folder), "--seed", str(seed),
           "--size-min", str(size[0]), "--size-max", str(size[1])]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        raise CliError(f"synthesising {folder} failed: {' | '.join(tail)}")


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@app.command()
def demo(
    ctx: typer.Context,
    out: Path | None = typer.Option(
        None, "--out", help="Folder for the synthetic data and the CSV (default <data_dir>/demo)."
    ),
    per_folder: int = typer.Option(16, "--per-folder", min=2, max=200,
                                   help="Training images per class folder (44 folders)."),
    epochs: int = typer.Option(10, min=1, max=100, help="Training epochs."),
    image_size: int = typer.Option(64, "--image-size", min=32, max=512,
                                   help="Input size of the model (pixels)."),
    arch: str = typer.Option("resnet18"),
    seed: int = typer.Option(0, min=0),
    as_json: bool = JsonOpt,
) -> None:
    """The main job end to end on synthetic data: synthesise -> train -> promote -> evaluate
    on a held-out set -> bulk-classify a folder -> results table, plots and a CSV export.

    Uses the same submission and job code as production; with the embedded default it
    migrates the SQLite database and starts a worker for the duration.
    """
    from scheduler import repository

    rt = _rt(ctx)
    settings = rt.settings
    err = _stderr()
    started = time.monotonic()
    if _is_sqlite(settings.resolved_database_url):
        # Only the embedded database is migrated implicitly; a shared PostgreSQL is the
        # operator's to migrate (`mriq db upgrade`), so ensure_migrated below stops there.
        from scheduler.database import upgrade

        upgrade(settings.resolved_database_url)
    sessions = rt.sessions()
    base = (out or Path(settings.data_dir) / "demo").expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    train_dir, heldout_dir, inbox_dir = base / "train", base / "heldout", base / "inbox"

    def step(text: str) -> None:
        err.print(f"[bold cyan]==>[/] {text}", highlight=False)

    step(f"synthesising {per_folder} images x 44 folders into {train_dir}")
    _synthesise(train_dir, per_folder=per_folder, seed=seed, size=(72, 112))
    held = max(2, per_folder // 2)
    step(f"synthesising a held-out set ({held} per folder, seed {seed + 1}) into {heldout_dir}")
    _synthesise(heldout_dir, per_folder=held, seed=seed + 1, size=(72, 112))
    step(f"synthesising images to classify (seed {seed + 2}) into {inbox_dir}")
    _synthesise(inbox_dir, per_folder=1, seed=seed + 2, size=(72, 112))

    dispatcher = rt.dispatcher
    submitter = "demo"
    summary: dict[str, Any] = {}
    with embedded_worker(rt) as worker_proc:

        def run(job_id: int, what: str) -> dict[str, Any]:
            step(f"{what}: job {job_id}")
            snap = wait_for_job(rt, job_id, worker=worker_proc)
            if snap["status"] != "succeeded":
                raise CliError(f"demo stopped: {_outcome(snap)}")
            return snap

        train_id = submission.submit_train(
            sessions, dispatcher, settings, train_dir,
            {"arch": arch, "epochs": epochs, "image_size": image_size, "batch_size": 32,
             "lr": 1e-3, "weights": "none", "labels": "15", "seed": seed},
            submitter=submitter,
        )
        run(train_id, f"training {arch} for {epochs} epochs at {image_size} px")
        with sessions() as session, session.begin():
            versions = [m for m in repository.list_model_versions(session)
                        if m.training_job_id == train_id]
            if not versions:
                raise CliError(f"train job {train_id} registered no model version")
            model = repository.promote_model_version(session, versions[0].id)
            model_id = int(model.id)
        step(f"promoted model version {model_id} to production")

        eval_id = submission.submit_evaluate(
            sessions, dispatcher, settings, model_version_id=model_id, data_dir=heldout_dir,
            submitter=submitter,
        )
        run(eval_id, "evaluating on the held-out set")
        classify_id = submission.submit_classify(
            sessions, dispatcher, settings, [str(inbox_dir)], submitter=submitter
        )
        run(classify_id, f"classifying every image in {inbox_dir}")

    csv_path = base / f"predictions-job{classify_id}.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as fh:
        write_predictions_csv(rt, classify_id, fh)
    details = {jid: _job_details(rt, jid) for jid in (train_id, eval_id, classify_id)}
    with sessions() as session:
        preds = [prediction_dict(p) for p in repository.list_predictions(
            session, classify_id, offset=0, limit=1000)]
    correct = sum(1 for p in preds if p["label"] and _true_class(p["path"]) == p["label"])
    labelled = sum(1 for p in preds if _true_class(p["path"]) is not None)
    artifacts = [a["path"] for d in details.values() for a in d["artifacts"]]
    summary = {
        "train_job": train_id,
        "evaluate_job": eval_id,
        "classify_job": classify_id,
        "model_version": model_id,
        "test_split": details[train_id]["evaluation"],
        "heldout": details[eval_id]["evaluation"],
        "classified": len(preds),
        "classify_accuracy": (correct / labelled) if labelled else None,
        "csv": str(csv_path),
        "artifacts": artifacts,
        "seconds": round(time.monotonic() - started, 1),
    }
    if as_json:
        _print_json(summary)
        return
    console = _stdout()
    table = Table(title=f"classify job {classify_id}: first {min(len(preds), 20)} of {len(preds)}")
    for col in ("#", "file", "true class", "label", "confidence", "top-3"):
        table.add_column(col, overflow="fold")
    for p in preds[:20]:
        table.add_row(*_cells(
            str(p["item_index"]),
            str(Path(p["path"]).relative_to(inbox_dir)) if p["path"].startswith(str(inbox_dir))
            else p["path"],
            _true_class(p["path"]) or "",
            p["label"] or Text(p["error"] or "", style="red"),
            _fmt_float(p["confidence"]),
            ", ".join(f"{lab} {prob:.2f}" for lab, prob in p["top_k"]),
        ))
    console.print(table)
    heldout = summary["heldout"] or {}
    console.print(
        f"model version {model_id}: held-out accuracy {_fmt_float(heldout.get('accuracy'))}, "
        f"macro F1 {_fmt_float(heldout.get('macro_f1'))}; inbox accuracy "
        f"{_fmt_float(summary['classify_accuracy'])} over {labelled} images",
        highlight=False,
    )
    console.print("artifacts (plots, reports, checkpoint):", highlight=False)
    for path in artifacts:
        console.print(f"  {path}", highlight=False)
    console.print(f"CSV export: {csv_path}", highlight=False)
    console.print(f"demo finished in {summary['seconds']:.0f} s", highlight=False)


def _true_class(path: str) -> str | None:
    """The 15-class name implied by a synthetic image's folder (for the demo's table)."""
    from core.labels import parse_folder_name

    parsed = parse_folder_name(Path(path).parent.name)
    if parsed is None:
        return None
    return str(parsed.label("15"))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``mriq``)."""
    app(args=list(argv) if argv is not None else None, prog_name="mriq")

