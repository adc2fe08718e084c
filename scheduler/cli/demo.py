"""``mriq demo``: the main job end to end on synthetic data, through the production code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from scheduler import submission
from scheduler.cli.app import CliError, Runtime, app, runtime
from scheduler.cli.jobs import job_details
from scheduler.cli.render import (
    JsonOpt,
    cells,
    fmt_float,
    prediction_doc,
    print_json,
    stderr_console,
    stdout_console,
)
from scheduler.cli.results import write_predictions_csv
from scheduler.cli.waiting import embedded_worker, outcome, wait_for_job
from scheduler.schema import JobStatus
from scheduler.settings import Settings

DEMO_MARKER = ".mriq-demo"


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


def dashboard_url(settings: Settings) -> str:
    """Where ``mriq api`` (same settings) serves the dashboard; a wildcard bind is reached
    on the loopback address."""
    host = settings.api_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{settings.api_port}/ui/"


def _step(text: str) -> None:
    stderr_console().print(f"[bold cyan]==>[/] {text}", highlight=False)


# Plain frozen records, alike by shape to web.session's: nothing to share but the decorator.
@dataclass(frozen=True)
class _DemoData:
    train: Path
    heldout: Path
    inbox: Path


@dataclass(frozen=True)
class _DemoJobs:
    train: int
    evaluate: int
    classify: int
    model_version: int


def _synthesise_all(base: Path, *, per_folder: int, seed: int) -> _DemoData:
    data = _DemoData(base / "train", base / "heldout", base / "inbox")
    _step(f"synthesising {per_folder} images x 44 folders into {data.train}")
    _synthesise(data.train, per_folder=per_folder, seed=seed, size=(72, 112))
    held = max(2, per_folder // 2)
    _step(f"synthesising a held-out set ({held} per folder, seed {seed + 1}) into {data.heldout}")
    _synthesise(data.heldout, per_folder=held, seed=seed + 1, size=(72, 112))
    _step(f"synthesising images to classify (seed {seed + 2}) into {data.inbox}")
    _synthesise(data.inbox, per_folder=1, seed=seed + 2, size=(72, 112))
    return data


def _run_jobs(
    rt: Runtime, data: _DemoData, *, arch: str, epochs: int, image_size: int, seed: int
) -> _DemoJobs:
    """Train, promote, evaluate on the held-out set and classify the inbox, in turn."""
    from scheduler import repository

    settings, sessions, dispatcher = rt.settings, rt.sessions(), rt.dispatcher
    submitter = "demo"
    with embedded_worker(rt) as worker_proc:

        def run(job_id: int, what: str) -> None:
            _step(f"{what}: job {job_id}")
            snap = wait_for_job(rt, job_id, worker=worker_proc)
            if snap["status"] != JobStatus.SUCCEEDED:
                raise CliError(f"demo stopped: {outcome(snap)}")

        train_id = submission.submit_train(
            sessions, dispatcher, settings, data.train,
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
        _step(f"promoted model version {model_id} to production")

        eval_id = submission.submit_evaluate(
            sessions, dispatcher, settings, model_version_id=model_id, data_dir=data.heldout,
            submitter=submitter,
        )
        run(eval_id, "evaluating on the held-out set")
        classify_id = submission.submit_classify(
            sessions, dispatcher, settings, [str(data.inbox)], submitter=submitter
        )
        run(classify_id, f"classifying every image in {data.inbox}")
    return _DemoJobs(train_id, eval_id, classify_id, model_id)


def _summarise(
    rt: Runtime, jobs: _DemoJobs, csv_path: Path, started: float
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The demo's JSON summary, the classify job's predictions for the table, and how many
    of them came from a known class folder."""
    from scheduler import repository

    details = {jid: job_details(rt, jid) for jid in (jobs.train, jobs.evaluate, jobs.classify)}
    with rt.sessions()() as session:
        preds = [prediction_doc(p) for p in repository.list_predictions(
            session, jobs.classify, offset=0, limit=1000)]
    correct = sum(1 for p in preds if p["label"] and _true_class(p["path"]) == p["label"])
    labelled = sum(1 for p in preds if _true_class(p["path"]) is not None)
    summary = {
        "train_job": jobs.train,
        "evaluate_job": jobs.evaluate,
        "classify_job": jobs.classify,
        "model_version": jobs.model_version,
        "test_split": details[jobs.train]["evaluation"],
        "heldout": details[jobs.evaluate]["evaluation"],
        "classified": len(preds),
        "classify_accuracy": (correct / labelled) if labelled else None,
        "csv": str(csv_path),
        "artifacts": [a["path"] for d in details.values() for a in d["artifacts"]],
        "seconds": round(time.monotonic() - started, 1),
        "dashboard": dashboard_url(rt.settings),
    }
    return summary, preds, labelled


def _print_summary(
    summary: dict[str, Any], preds: list[dict[str, Any]], labelled: int, inbox_dir: Path
) -> None:
    console = stdout_console()
    table = Table(
        title=f"classify job {summary['classify_job']}: first {min(len(preds), 20)} of "
        f"{len(preds)}"
    )
    for col in ("#", "file", "true class", "label", "confidence", "top-3"):
        table.add_column(col, overflow="fold")
    for p in preds[:20]:
        table.add_row(*cells(
            str(p["item_index"]),
            str(Path(p["path"]).relative_to(inbox_dir)) if p["path"].startswith(str(inbox_dir))
            else p["path"],
            _true_class(p["path"]) or "",
            p["label"] or Text(p["error"] or "", style="red"),
            fmt_float(p["confidence"]),
            ", ".join(f"{lab} {prob:.2f}" for lab, prob in p["top_k"]),
        ))
    console.print(table)
    heldout = summary["heldout"] or {}
    console.print(
        f"model version {summary['model_version']}: held-out accuracy "
        f"{fmt_float(heldout.get('accuracy'))}, macro F1 {fmt_float(heldout.get('macro_f1'))}; "
        f"inbox accuracy {fmt_float(summary['classify_accuracy'])} over "
        f"{labelled} images",
        highlight=False,
    )
    console.print("artifacts (plots, reports, checkpoint):", highlight=False)
    for path in summary["artifacts"]:
        console.print(f"  {path}", highlight=False)
    console.print(f"CSV export: {summary['csv']}", highlight=False)
    console.print(f"demo finished in {summary['seconds']:.0f} s", highlight=False)
    console.print(
        f"dashboard: run `mriq api` (with the same MRIQ_* settings), then open "
        f"{summary['dashboard']} (the review queue is at {summary['dashboard']}review)",
        highlight=False, soft_wrap=True,
    )


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
    rt = runtime(ctx)
    settings = rt.settings
    started = time.monotonic()
    if settings.resolved_database_url.startswith("sqlite"):
        # Only the embedded database is migrated implicitly; a shared PostgreSQL is the
        # operator's to migrate (`mriq db upgrade`), so ensure_migrated below stops there.
        from scheduler.database import upgrade

        upgrade(settings.resolved_database_url)
    rt.sessions()
    base = (out or Path(settings.data_dir) / "demo").expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    data = _synthesise_all(base, per_folder=per_folder, seed=seed)
    jobs = _run_jobs(rt, data, arch=arch, epochs=epochs, image_size=image_size, seed=seed)
    csv_path = base / f"predictions-job{jobs.classify}.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as fh:
        write_predictions_csv(rt, jobs.classify, fh)
    summary, preds, labelled = _summarise(rt, jobs, csv_path, started)
    if as_json:
        print_json(summary)
        return
    _print_summary(summary, preds, labelled, data.inbox)


def _true_class(path: str) -> str | None:
    """The 15-class name implied by a synthetic image's folder (for the demo's table)."""
    from core.labels import parse_folder_name

    parsed = parse_folder_name(Path(path).parent.name)
    if parsed is None:
        return None
    return str(parsed.label("15"))
