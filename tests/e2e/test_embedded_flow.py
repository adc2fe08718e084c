"""The README's first command, ``mriq demo``, on the embedded default: SQLite + filesystem broker.

Only ``MRIQ_DATA_DIR`` and ``MRIQ_DATA_ROOTS`` are set (no database or broker URL), so the
demo migrates ``<data_dir>/mriq.db`` itself and starts (and stops) its own worker process.
The test checks the exit status, what the demo prints (results table, plot and CSV paths)
and the rows it left in the SQLite database.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from scheduler import repository
from scheduler.database import make_engine, make_session_factory
from scheduler.schema import Job, JobKind, JobStatus, ModelStage
from tests.e2e.conftest import clean_env, mriq_argv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PER_FOLDER = 2
FOLDERS = 44
DEMO_TIMEOUT_S = 300


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_mriq_demo_on_the_embedded_default(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    out = tmp_path / "demo-out"
    env = clean_env({"MRIQ_DATA_DIR": str(data_dir), "MRIQ_DATA_ROOTS": str(tmp_path)})
    assert not any(k in env for k in ("MRIQ_DATABASE_URL", "MRIQ_BROKER_URL"))
    argv = mriq_argv("demo", "--per-folder", str(PER_FOLDER), "--epochs", "1",
                     "--image-size", "32", "--out", str(out))
    with subprocess.Popen(argv, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=DEMO_TIMEOUT_S)
        finally:
            if proc.poll() is None:  # timed out: stop the demo and the worker it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    report = f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
    assert proc.returncode == 0, report

    # The demo started a worker for the run and stopped it again.
    started = re.search(r"started an embedded worker \(pid (\d+)", stderr)
    assert started, report
    worker_pid = int(started.group(1))
    deadline = time.monotonic() + 10
    while _pid_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(worker_pid):
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail(f"the demo left its worker (pid {worker_pid}) running")

    # Printed outputs: the results table, the artifact paths and the CSV export path.
    assert re.search(r"classify job \d+: first \d+ of \d+", stdout), report
    for header in ("file", "true class", "label", "confidence", "top-3"):
        assert header in stdout, f"results table lacks column {header!r}\n{report}"
    assert "held-out accuracy" in stdout, report
    artifacts = [Path(line.strip()) for line in stdout.splitlines()
                 if line.startswith("  /")]
    assert artifacts, report
    for path in artifacts:
        assert path.is_file(), f"printed artifact {path} does not exist"
    assert {p.suffix for p in artifacts} >= {".png", ".pt", ".json"}
    assert any(p.name == "confusion_matrix.png" for p in artifacts)
    assert any(p.name == "training_curves.png" for p in artifacts)
    csv_match = re.search(r"CSV export: (\S+\.csv)", stdout)
    assert csv_match, report
    csv_path = Path(csv_match.group(1))
    assert csv_path.is_file() and csv_path.parent == out
    assert re.search(r"demo finished in \d+ s", stdout), report
    # It ends by saying how to open the dashboard (the settings' default address).
    assert ("dashboard: run `mriq api` (with the same MRIQ_* settings), then open "
            "http://127.0.0.1:8000/ui/") in stdout, report

    # The embedded database: SQLite under the data dir, no other database was used.
    db_file = data_dir / "mriq.db"
    assert db_file.is_file()
    assert (data_dir / "broker").is_dir()
    engine = make_engine(f"sqlite:///{db_file}")
    try:
        with make_session_factory(engine)() as s:
            jobs = {job.kind: job for job in s.scalars(select(Job).order_by(Job.id))}
            assert set(jobs) == {JobKind.TRAIN, JobKind.EVALUATE, JobKind.CLASSIFY}
            assert len(repository.list_jobs(s)) == 3
            for job in jobs.values():
                assert job.status is JobStatus.SUCCEEDED, (job.kind, job.status, job.error)
                assert job.progress_done == job.progress_total > 0
                assert job.finished_at is not None
            train, evaluate, classify = (
                jobs[JobKind.TRAIN], jobs[JobKind.EVALUATE], jobs[JobKind.CLASSIFY])

            production = repository.get_production_model(s)
            assert production is not None
            assert production.stage is ModelStage.PRODUCTION
            assert production.training_job_id == train.id
            assert Path(production.checkpoint_path).is_file()
            assert len(repository.list_epoch_metrics(s, train.id)) == 1

            assert evaluate.model_version_id == classify.model_version_id == production.id
            held = repository.get_evaluation(s, evaluate.id)
            assert held.model_version_id == production.id
            heldout_files = _image_files(out / "heldout")
            assert held.report["n"] == len(heldout_files) == FOLDERS * max(2, PER_FOLDER // 2)

            inbox = _image_files(out / "inbox")
            assert len(inbox) == FOLDERS
            predictions = repository.list_predictions(s, classify.id, limit=10_000)
            assert repository.count_predictions(s, classify.id) == len(inbox)
            assert classify.progress_total == len(inbox)
            assert sorted(p.path for p in predictions) == sorted(str(p) for p in inbox)
            assert all(p.label is not None and p.error is None for p in predictions)
    finally:
        engine.dispose()

    # The CSV export holds the classify job's rows.
    with csv_path.open(encoding="utf-8", newline="") as fh:
        exported = list(csv.DictReader(fh))
    assert [(int(r["item_index"]), r["path"], r["label"]) for r in exported] == [
        (p.item_index, p.path, p.label) for p in predictions
    ]


def _image_files(folder: Path) -> list[Path]:
    suffixes = {".png", ".jpg", ".jpeg"}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
