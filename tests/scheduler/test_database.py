"""scheduler.database: engines, migration checks, URL handling and transaction retries."""

from __future__ import annotations

import threading

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository as repo
from scheduler.database import (
    READ_ONLY,
    DatabaseNotMigratedError,
    ensure_migrated,
    head_revision,
    make_engine,
    make_session_factory,
    mask_url,
    normalize_url,
    retrying,
    run_in_transaction,
    upgrade,
)
from scheduler.schema import JobKind


def test_ensure_migrated_on_empty_database_says_what_to_run(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with pytest.raises(DatabaseNotMigratedError) as info:
            ensure_migrated(engine)
    finally:
        engine.dispose()
    message = str(info.value)
    assert "run `mriq db upgrade`" in message
    assert "no revision" in message
    assert head_revision() in message
    assert info.value.current is None


def test_not_migrated_error_masks_the_password(postgres_url: str) -> None:
    # Trust auth ignores the password, so the connection works and the message is real.
    url = postgres_url.replace("postgres@", "postgres:hunter2@")
    engine = make_engine(url)
    try:
        with pytest.raises(DatabaseNotMigratedError) as info:
            ensure_migrated(engine)
    finally:
        engine.dispose()
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)
    assert mask_url(url).count("***") == 1


def test_bare_postgresql_url_uses_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_sqlite_engine_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'sub' / 'dir' / 'mriq.db'}"  # folder created on demand
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()


def test_retrying_retries_operational_errors_with_backoff() -> None:
    calls: list[int] = []
    delays: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return "ok"

    assert retrying(flaky, attempts=5, base_delay=0.1, sleep=delays.append) == "ok"
    assert len(calls) == 3
    assert len(delays) == 2 and delays[1] > delays[0]


def test_retrying_gives_up_and_never_retries_integrity_errors() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        retrying(broken, attempts=5, sleep=lambda _: None)
    assert len(calls) == 1

    def down() -> None:
        calls.append(1)
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    calls.clear()
    with pytest.raises(OperationalError):
        retrying(down, attempts=3, sleep=lambda _: None)
    assert len(calls) == 3


def test_raw_driver_errors_of_an_outage_are_retryable() -> None:
    """The COPY fast paths talk to psycopg directly; its lost-connection and disk-full
    errors must be retried like SQLAlchemy's (they used to fail the chunk at once)."""
    import psycopg

    from scheduler.database import is_retryable

    assert is_retryable(psycopg.errors.DiskFull("could not extend file"))
    assert is_retryable(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert not is_retryable(psycopg.errors.UniqueViolation("duplicate key"))
    assert not is_retryable(ValueError("not a database error"))


def test_run_in_transaction_survives_a_killed_postgres_connection(postgres_url: str) -> None:
    """The server ends our backend mid-transaction (as a restart would); the whole
    transaction is re-run on a fresh connection and its idempotent writes land once."""
    upgrade(postgres_url)
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    factory: sessionmaker[Session] = make_session_factory(engine)
    with factory() as s, s.begin():
        job_id = repo.create_job(s, kind=JobKind.CLASSIFY, params={}).id
        repo.add_job_items(s, job_id, [f"/d/{i}.png" for i in range(10)], chunk_size=5)
    attempts: list[int] = []

    def write(session: Session) -> int:
        attempts.append(1)
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        added = repo.record_predictions(
            session,
            job_id,
            [repo.PredictionRecord(i, f"/d/{i}.png", None, "glioma", 0.9) for i in range(5)],
        )
        if len(attempts) == 1:
            dbname = engine.url.database
            with psycopg.connect(
                host="127.0.0.1", user="postgres", dbname=dbname, autocommit=True
            ) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return added

    try:
        added = run_in_transaction(factory, write, attempts=4, base_delay=0.05)
        assert added == 5
        assert len(attempts) == 2
        with factory() as s:
            assert repo.count_predictions(s, job_id) == 5
    finally:
        engine.dispose()


def test_sqlite_read_only_transaction_does_not_block_writers(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    try:
        with factory() as reader:
            reader.connection(execution_options=READ_ONLY)
            assert repo.list_jobs(reader) == []  # read transaction open from here on
            with factory() as writer, writer.begin():
                # Would wait 30 s for the lock if the reader had begun IMMEDIATE.
                repo.create_job(writer, kind=JobKind.TRAIN, params={})
            assert repo.list_jobs(reader) == []  # its snapshot predates the write
        with factory() as fresh:
            assert len(repo.list_jobs(fresh)) == 1
    finally:
        engine.dispose()


def test_sqlite_writers_wait_instead_of_failing(sqlite_url: str) -> None:
    """Two threads doing read-then-write transactions at once: BEGIN IMMEDIATE makes the
    second wait for the first (no 'database is locked' upgrade failure)."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    with factory() as s, s.begin():
        job_id = repo.create_job(s, kind=JobKind.TRAIN, params={}).id
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def bump() -> None:
        try:
            barrier.wait()
            for _ in range(20):
                with factory() as s, s.begin():
                    job = repo.get_job(s, job_id)
                    job.progress_done = job.progress_done + 1
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with factory() as s:
            assert repo.get_job(s, job_id).progress_done == 40  # no lost update
    finally:
        engine.dispose()
