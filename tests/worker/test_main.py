"""``python -m worker`` (worker/__main__.py): its arguments and its start-up checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.__main__ import parse_args


def test_worker_arguments() -> None:
    args = parse_args([])
    assert (args.queues, args.pool, args.concurrency) == ("gpu,cpu", "threads", 1)
    args = parse_args(["--queues", " cpu ,", "--pool", "prefork", "--concurrency", "2"])
    assert (args.queues, args.pool, args.concurrency) == ("cpu", "prefork", 2)
    with pytest.raises(SystemExit):
        parse_args(["--pool", "solo", "--concurrency", "2"])
    with pytest.raises(SystemExit):
        parse_args(["--queues", ","])


def test_worker_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    """A worker started on a database nobody migrated stops at once and says what to run."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}
    env["MRIQ_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--no-reexec"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "mriq db upgrade" in proc.stderr
