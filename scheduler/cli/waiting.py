"""Following a job to its end: a progress bar on stderr, and an embedded worker for the
duration when the embedded default (SQLite + filesystem broker) has none running.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from scheduler.cli.app import CliError, Runtime
from scheduler.cli.render import job_doc, print_json, stderr_console, stdout_console
from scheduler.schema import JobStatus

WaitOpt: bool = typer.Option(
    False, "--wait", help="Follow the job with a progress bar; exit 1 unless it succeeds."
)


def is_terminal(snap: dict[str, Any]) -> bool:
    return JobStatus(snap["status"]).is_terminal


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
            stderr_console().print(
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
        stderr_console().print(
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


def snapshot(rt: Runtime, job_id: int) -> dict[str, Any]:
    """The job's JSON document as it is now."""
    from scheduler import repository

    with rt.sessions()() as session:
        return job_doc(repository.get_job(session, job_id))


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
    snap = snapshot(rt, job_id)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr_console(), transient=False) as progress:
        task = progress.add_task(f"job {job_id} {snap['kind']}", total=None)
        while True:
            total = snap["progress_total"] or None
            progress.update(
                task,
                completed=snap["progress_done"] or 0,
                total=total,
                description=f"job {job_id} {snap['kind']} {snap['status']}",
            )
            if is_terminal(snap):
                return snap
            if worker is not None and worker.poll() is not None:
                raise CliError(
                    f"the embedded worker exited with status {worker.returncode} before job "
                    f"{job_id} finished; see its log under {rt.settings.data_dir}/logs"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(f"job {job_id} is still {snap['status']} after {timeout:g} s")
            time.sleep(poll)
            snap = snapshot(rt, job_id)


def outcome(snap: dict[str, Any]) -> str:
    """One line: the job, its status and progress, and its error if any."""
    text = (
        f"job {snap['id']} {snap['kind']} {snap['status']} "
        f"({snap['progress_done']}/{snap['progress_total']})"
    )
    if snap.get("error"):
        text += f": {snap['error']}"
    return text


def report_submitted(rt: Runtime, job_id: int, *, wait: bool, as_json: bool) -> None:
    """Print the new job's id; with ``wait``, follow it and exit non-zero unless it succeeded."""
    if not wait:
        if as_json:
            print_json({"id": job_id})
        else:
            sys.stdout.write(f"{job_id}\n")
            stderr_console().print(f"job {job_id} queued; follow it with `mriq jobs wait {job_id}`")
        return
    if not as_json:
        sys.stdout.write(f"{job_id}\n")
        sys.stdout.flush()
    wait_and_report(rt, job_id, as_json=as_json)


def wait_and_report(
    rt: Runtime, job_id: int, *, as_json: bool, timeout: float | None = None
) -> None:
    """Follow the job to its end, print its outcome; exit 1 unless it succeeded."""
    snap = snapshot(rt, job_id)
    if not is_terminal(snap):
        # Only now look for (or start) a worker: a finished job needs none.
        with embedded_worker(rt) as worker:
            snap = wait_for_job(rt, job_id, worker=worker, timeout=timeout)
    if as_json:
        print_json(snap)
    else:
        colour = "green" if snap["status"] == JobStatus.SUCCEEDED else "red"
        stdout_console().print(f"[{colour}]{escape(outcome(snap))}[/]", highlight=False)
    if snap["status"] != JobStatus.SUCCEEDED:
        raise typer.Exit(1)
