"""``mriq explain JOB_ID ITEM_ID``: ask a worker for the Grad-CAM explanation of one
prediction (:func:`scheduler.explanations.request_explanation`, as the API and the dashboard
do) and, with ``--wait``, print the file once it is written."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import typer

from scheduler import explanations
from scheduler.cli.app import CliError, Runtime, app, runtime
from scheduler.cli.render import JsonOpt, print_json, stderr_console
from scheduler.cli.waiting import embedded_worker

#: How often ``--wait`` looks at the prediction row.
POLL_S = 0.5


def _written(rt: Runtime, job_id: int, item_id: int) -> tuple[str | None, float | None]:
    """The item's explanation path and its file's modification time (None: no file yet)."""
    with rt.sessions()() as session:
        path = explanations.explanation_of(session, job_id, item_id).explanation
    if not path:
        return None, None
    try:
        return path, os.stat(path).st_mtime
    except OSError:
        return path, None


def _wait(rt: Runtime, job_id: int, item_id: int, before: tuple[str | None, float | None],
          timeout: float) -> str:
    # An item explained before keeps its path (explanations/<item_id>.png): the new file is
    # told apart by its modification time.
    deadline = time.monotonic() + timeout
    with embedded_worker(rt) as worker:
        while True:
            path, mtime = _written(rt, job_id, item_id)
            if path is not None and mtime is not None and (path, mtime) != before:
                return path
            if worker is not None and worker.poll() is not None:
                raise CliError(f"the embedded worker exited with status {worker.returncode} "
                               f"before item {item_id} was explained")
            if time.monotonic() > deadline:
                raise CliError(f"item {item_id} of job {job_id} not explained after "
                               f"{timeout:g} s (is a worker with a GPU queue running?)")
            time.sleep(POLL_S)


@app.command()
def explain(
    ctx: typer.Context,
    job_id: int = typer.Argument(..., min=1, help="The classify job."),
    item_id: int = typer.Argument(..., min=1, help="The prediction's item id (review item)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the file and print its path."),
    timeout: float = typer.Option(300.0, "--timeout", min=1.0, help="Seconds --wait waits."),
    as_json: bool = JsonOpt,
) -> None:
    """Explain one prediction with Grad-CAM (a worker task; asking again re-explains it)."""
    rt = runtime(ctx)
    try:
        before = _written(rt, job_id, item_id)
        explanations.request_explanation(rt.sessions(), rt.dispatcher, job_id, item_id)
    except explanations.NotExplainableError as exc:
        raise CliError(str(exc), code=2) from None
    except explanations.ExplanationNotSentError as exc:
        raise CliError(f"{exc} ({exc.reason})") from None
    path = _wait(rt, job_id, item_id, before, timeout) if wait else None
    doc: dict[str, Any] = {"job_id": job_id, "item_id": item_id, "queued": True,
                           "explanation": path}
    if as_json:
        print_json(doc)
    elif path is not None:
        sys.stdout.write(f"{path}\n")
    else:
        stderr_console().print(
            f"explanation of item {item_id} of job {job_id} queued; "
            f"`mriq explain {job_id} {item_id} --wait` prints the file", highlight=False)
