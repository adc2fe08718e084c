"""worker.app: a worker answers the dispatcher's ping and ``celery -A worker.app inspect``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduler.dispatch import Dispatcher
from tests.scheduler.test_dispatch import _fs_settings
from tests.worker.conftest import REPO, StartWorker


@pytest.mark.slow
def test_ping_answered_by_worker_on_filesystem_broker(
    tmp_path: Path, start_worker: StartWorker
) -> None:
    settings = _fs_settings(tmp_path)
    dispatcher = Dispatcher(settings)
    try:
        assert dispatcher.workers_alive(timeout=0.5) is False
        worker = start_worker(settings)  # waits until its ping reply arrives
        started = time.monotonic()
        assert dispatcher.workers_alive(timeout=5.0) is True
        # limit=1: returns on the first reply instead of waiting out the timeout.
        assert time.monotonic() - started < 3.0
        assert worker.hostname in dispatcher.ping(timeout=2.0)
        # `celery inspect ping` (the CLI) on the same broker, via the lazy worker.app.
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker.app", "inspect", "ping", "--timeout=5"],
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")},
                "MRIQ_DATA_DIR": str(settings.data_dir),
                "PYTHONPATH": str(REPO),
            },
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "pong" in out.stdout
        assert worker.hostname in out.stdout
        # Broadcasts do not pile up: the janitor's rules leave no task message behind and
        # control-queue leftovers are only kept for a grace period.
        dispatcher.revoke(12345)
    finally:
        dispatcher.close()
