"""worker/isolation.py: death detection through the chunk's lock file, setting aside the item
a dead process was reading, and the signal named from its crash report.

Processes really die here (SIGKILL/SIGABRT of a child ``python`` that holds a guard); the
database is a real SQLite file.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import JobKind
from scheduler.settings import Settings
from tests.worker.conftest import REPO, TinyModel, make_settings, migrated_factory, write_images
from worker import isolation

ITEMS = [(i, f"/data/img_{i}.png") for i in range(8)]

#: A child process that takes the guard of chunk 0 of job JOB, marks item N as being read or
#: confirmed (MARK = "reading:N" / "confirming:N" / "-") and dies by SIGNAL without leaving
#: the ``with`` block.
CHILD = """
import os, signal, sys
from scheduler.settings import Settings
from worker import isolation

settings = Settings(data_dir=sys.argv[1], database_url=sys.argv[2])
job, mark, signame = int(sys.argv[3]), sys.argv[4], sys.argv[5]
with isolation.ChunkGuard(settings, job, 0) as guard:
    assert guard.active
    if mark != "-":
        what, item = mark.split(":")
        getattr(guard, what)(int(item))
    os.kill(os.getpid(), getattr(signal, signame))
"""


def _die(settings: Settings, job_id: int, mark: str, signame: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(settings.data_dir),
            str(settings.database_url),
            str(job_id),
            mark,
            signame,
        ],
        cwd=str(REPO),
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -getattr(signal, signame), proc.stderr.decode()


@pytest.fixture
def job(tmp_path: Path, sqlite_url: str) -> tuple[Settings, sessionmaker[Session], int]:
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    with factory.begin() as session:
        job_id = int(repository.create_job(session, kind=JobKind.CLASSIFY, params={}).id)
        repository.add_job_items(session, job_id, [p for _, p in ITEMS], chunk_size=len(ITEMS))
    return settings, factory, job_id


def _errors(factory: sessionmaker[Session], job_id: int) -> dict[int, str | None]:
    with factory() as session:
        return {r.item_index: r.error for r in repository.iter_predictions(session, job_id)}


def test_normal_end_is_not_a_death(job: tuple[Settings, sessionmaker[Session], int]) -> None:
    settings, factory, job_id = job
    with isolation.ChunkGuard(settings, job_id, 0) as guard:
        assert guard.active and not guard.busy and guard.died is None
        guard.reading(3)  # an exit in Python mid-item clears it
    assert not guard.path.exists(), "a chunk that lost no worker leaves no state file"
    with isolation.ChunkGuard(settings, job_id, 0) as guard:
        assert guard.died is None and guard.suspect is None
        assert guard.set_aside(ITEMS) == ITEMS
    assert _errors(factory, job_id) == {}


def test_a_live_attempt_makes_a_second_one_busy(
    job: tuple[Settings, sessionmaker[Session], int],
) -> None:
    settings, _, job_id = job
    with isolation.ChunkGuard(settings, job_id, 0) as first:
        with isolation.ChunkGuard(settings, job_id, 0) as second:
            assert first.active and second.busy and not second.active
        # The busy one touched nothing: the live owner is still recorded.
        assert isolation.load_state(first.path)["owner"] is not None


def test_death_between_reads_blames_nobody(
    job: tuple[Settings, sessionmaker[Session], int],
) -> None:
    settings, factory, job_id = job
    _die(settings, job_id, "-", "SIGKILL")
    with isolation.ChunkGuard(settings, job_id, 0) as guard:
        assert guard.died is not None and guard.suspect is None
        assert guard.set_aside(ITEMS) == ITEMS and guard.set_aside_count == 0
    assert _errors(factory, job_id) == {}


def test_death_while_reading_only_makes_a_suspect(
    job: tuple[Settings, sessionmaker[Session], int],
) -> None:
    """One death while the decode thread read item 5 may be anyone's (kill -9 from outside):
    item 5 is read alone first next time, not set aside."""
    settings, factory, job_id = job
    _die(settings, job_id, "reading:5", "SIGKILL")
    with isolation.ChunkGuard(settings, job_id, 0) as guard:
        assert guard.died is not None and guard.suspect == 5
        assert guard.set_aside(ITEMS) == ITEMS and guard.set_aside_count == 0
    assert _errors(factory, job_id) == {}


@pytest.mark.parametrize(
    ("signame", "expected"),
    [
        ("SIGABRT", "signal SIGABRT (Aborted); crash report: "),
        ("SIGKILL", "no crash report: killed by SIGKILL"),
    ],
)
def test_death_while_confirming_sets_that_item_aside(
    job: tuple[Settings, sessionmaker[Session], int], signame: str, expected: str
) -> None:
    settings, factory, job_id = job
    _die(settings, job_id, "confirming:5", signame)
    with isolation.ChunkGuard(settings, job_id, 0) as guard:
        assert guard.died is not None
        left = guard.set_aside(ITEMS)
        assert left == [item for item in ITEMS if item[0] != 5]
        assert guard.set_aside_count == 1
    errors = _errors(factory, job_id)
    assert list(errors) == [5]
    assert "the worker process died while reading or classifying this file" in str(errors[5])
    assert expected in str(errors[5]), errors[5]
    # A later attempt does not set it aside again (its row exists, it counts once).
    with isolation.ChunkGuard(settings, job_id, 0) as guard:
        assert guard.set_aside(left) == left
        assert guard.set_aside_count == 1


def test_suspect_is_read_first_and_results_stay_in_input_order(
    job: tuple[Settings, sessionmaker[Session], int], tiny_model: TinyModel, tmp_path: Path
) -> None:
    from core.checkpoint import load_checkpoint
    from core.inference import Predictor

    settings, _, job_id = job
    paths = write_images(tmp_path / "images", 6)
    items = [(i, str(p)) for i, p in enumerate(paths)]
    predictor = Predictor(load_checkpoint(tiny_model.path), batch_size=2)
    seen: list[object] = []
    for suspect in (3, 5):  # inside and at the end of the chunk
        _die(settings, job_id, f"reading:{suspect}", "SIGKILL")
        with isolation.ChunkGuard(settings, job_id, 0) as guard:
            assert guard.suspect == suspect
            out = list(isolation.predictions(guard, predictor, items, paths, lambda: False))
            seen.append(isolation.load_state(guard.path))
        assert [p.path for p in out] == [str(p) for p in paths]
        assert all(p.label is not None for p in out)
    # Reads were marked and cleared; the suspect survived its confirmation.
    assert all(s["reading"] is None and s["confirming"] is None for s in seen)  # type: ignore[index]


def test_unusable_storage_runs_unguarded(
    job: tuple[Settings, sessionmaker[Session], int],
) -> None:
    """A state folder that cannot be created must not fail the chunk: it runs as before."""
    settings, _, job_id = job
    path = isolation.chunk_state_path(settings, job_id, 0)
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    path.parent.write_text("a file where the folder should be")
    with isolation.ChunkGuard(settings, job_id, 0) as guard:
        assert not guard.busy and not guard.active and guard.died is None
        guard.reading(1)
        assert guard.set_aside(ITEMS) == ITEMS and guard.set_aside_count == 0


def test_describe_death_without_report() -> None:
    assert isolation.describe_death(None) == "the process left no crash report"
    assert isolation.describe_death("/nonexistent/report.txt") == (
        "the process left no crash report"
    )
