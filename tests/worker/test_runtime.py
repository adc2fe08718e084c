"""worker.runtime (model cache, DB retries, threads), worker.beat and the CLI arguments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from celery.schedules import crontab
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from scheduler.dispatch import CPU_QUEUE, RETRAIN_TASK
from tests.worker.conftest import TinyModel, make_settings, migrated_factory
from worker import runtime
from worker.__main__ import parse_args
from worker.beat import InvalidCronError, beat_schedule, parse_cron


def test_model_cache_loads_once_and_verifies(tiny_model: TinyModel) -> None:
    from core.checkpoint import ChecksumMismatchError

    first = runtime.load_model(str(tiny_model.path), tiny_model.sha256, device="cpu")
    second = runtime.load_model(str(tiny_model.path), tiny_model.sha256, device="cpu")
    assert first is second
    assert first.checkpoint.sha256 == tiny_model.sha256
    assert not first.checkpoint.model.training
    with pytest.raises(ChecksumMismatchError):
        runtime.load_model(str(tiny_model.path), "f" * 64, device="cpu")


def test_model_cache_is_bounded(tiny_model: TinyModel, tmp_path: Path) -> None:
    from dataclasses import replace

    from core.checkpoint import load_checkpoint, save_checkpoint

    base = load_checkpoint(tiny_model.path)
    for i in range(runtime.MODEL_CACHE_SIZE + 1):
        # Different metadata -> different bytes -> a different sha256 (the cache key).
        path = tmp_path / f"m{i}.pt"
        sha = save_checkpoint(path, model=base.model, meta=replace(base.meta, metrics={"i": i}))
        runtime.load_model(str(path), sha, device="cpu")
    assert runtime.cached_model_count() == runtime.MODEL_CACHE_SIZE


def test_with_session_retries_connection_errors(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    migrated_factory(sqlite_url).kw["bind"].dispose()
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky(session: Session) -> str:
        calls.append(1)
        if len(calls) < 3:
            # What psycopg raises (wrapped) while PostgreSQL restarts.
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return "ok"

    assert runtime.with_session(settings, flaky, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0]

    def broken(session: Session) -> None:
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        runtime.with_session(settings, broken, sleep=sleeps.append)
    assert len(sleeps) == 2  # no retry for other errors


def test_with_session_waits_out_an_outage_for_db_outage_limit(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Retries are bounded by time (settings.db_outage_limit), not by a count: 20 failed
    attempts (over a minute of backoff) still end in success within the 600 s default, and
    the limit is where it stops."""
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    migrated_factory(sqlite_url).kw["bind"].dispose()
    slept: list[float] = []
    calls: list[int] = []

    def down_for(n: int) -> object:
        def fn(session: Session) -> str:
            calls.append(1)
            if len(calls) <= n:
                raise OperationalError("SELECT 1", {}, Exception("connection refused"))
            return "ok"

        return fn

    clock = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    with pytest.MonkeyPatch.context() as mp:
        # retrying() reads the time from time.monotonic; the test's sleeps advance it.
        mp.setattr("scheduler.database.time.monotonic", lambda: clock[0])
        assert runtime.with_session(settings, down_for(20), sleep=sleep) == "ok"  # type: ignore[arg-type]
        assert len(calls) == 21 and sum(slept) > 60

        calls.clear()
        slept.clear()
        clock[0] = 0.0
        short = settings.model_copy(update={"db_outage_limit": 30.0})
        with pytest.raises(OperationalError):
            runtime.with_session(short, down_for(10**6), sleep=sleep)  # type: ignore[arg-type]
        assert 30.0 <= clock[0] <= 31.0 and max(slept) <= runtime.DB_RETRY_MAX_DELAY_S * 1.2


def test_threads_per_task() -> None:
    cores = runtime.available_cores()
    assert runtime.threads_per_task(1) == cores
    assert runtime.threads_per_task(cores * 4) == 1


def test_inference_streams_split_the_task_cores_and_training_gets_them_back() -> None:
    import torch

    from core.devices import cpu_parallelism

    before = torch.get_num_threads()
    try:
        split = cpu_parallelism(runtime.threads_per_task(1))
        runtime.configure_threads(1)
        assert runtime.inference_streams("cpu") == split.streams
        assert torch.get_num_threads() == split.threads
        # A training/evaluation task after a classification chunk in the same process
        # gets all of the task's cores again.
        assert runtime.configure_threads() == runtime.threads_per_task(1)
        assert torch.get_num_threads() == runtime.threads_per_task(1)
        # The inference_streams setting, capped at the task's cores.
        assert runtime.inference_streams("cpu", 1) == 1
        assert torch.get_num_threads() == runtime.threads_per_task(1)
        assert runtime.inference_streams("cpu", 999) == runtime.threads_per_task(1)
        assert torch.get_num_threads() == 1
        assert runtime.inference_streams("cuda:0", 4) == 1
        # More concurrent tasks than cores: one stream, one thread each.
        runtime.configure_threads(runtime.available_cores() * 4)
        assert runtime.inference_streams("cpu") == 1
        assert torch.get_num_threads() == 1
    finally:
        runtime.configure_threads(1)
        torch.set_num_threads(before)


def test_beat_schedule(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url="sqlite://", broker_url=None)
    assert beat_schedule(settings) == {}
    on = settings.model_copy(update={"retrain_cron": "30 3 * * 0", "retrain_data_dir": tmp_path})
    schedule = beat_schedule(on)
    (entry,) = schedule.values()
    assert entry["task"] == RETRAIN_TASK
    assert entry["options"]["queue"] == CPU_QUEUE
    assert entry["schedule"] == crontab(minute="30", hour="3", day_of_week="0")


@pytest.mark.parametrize("expr", ["* * *", "61 * * * *", "x y z w v"])
def test_parse_cron_rejects(expr: str) -> None:
    with pytest.raises(InvalidCronError):
        parse_cron(expr)


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
