"""worker.sessions: per-process session factories and transactions that wait out outages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tests.worker.conftest import make_settings, migrated_factory
from worker import sessions


def test_session_factory_is_made_once_per_process_and_url(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = sessions.session_factory(settings)
    assert sessions.session_factory(settings) is factory
    assert (os.getpid(), settings.resolved_database_url) in sessions._factories
    other = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'other.db'}"})
    assert sessions.session_factory(other) is not factory
    assert sessions.with_session(settings, lambda s: s.execute(text("SELECT 7")).scalar()) == 7


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

    assert sessions.with_session(settings, flaky, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0]

    def broken(session: Session) -> None:
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        sessions.with_session(settings, broken, sleep=sleeps.append)
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
        assert sessions.with_session(settings, down_for(20), sleep=sleep) == "ok"  # type: ignore[arg-type]
        assert len(calls) == 21 and sum(slept) > 60

        calls.clear()
        slept.clear()
        clock[0] = 0.0
        short = settings.model_copy(update={"db_outage_limit": 30.0})
        with pytest.raises(OperationalError):
            sessions.with_session(short, down_for(10**6), sleep=sleep)  # type: ignore[arg-type]
        assert 30.0 <= clock[0] <= 31.0 and max(slept) <= sessions.DB_RETRY_MAX_DELAY_S * 1.2
