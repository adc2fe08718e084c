"""Migrations create exactly the models' schema; database helpers behave on both databases."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, Table, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository as repo
from scheduler.database import (
    READ_ONLY,
    DatabaseNotMigratedError,
    alembic_config,
    current_revision,
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
from scheduler.schema import Base, Job, JobKind, JobStatus

TABLES = {
    "jobs",
    "job_items",
    "job_chunks",
    "predictions",
    "epoch_metrics",
    "evaluation_reports",
    "model_versions",
    "artifacts",
}


def test_upgrade_creates_exactly_the_models_schema(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert set(inspect(conn).get_table_names()) >= TABLES
        assert current_revision(engine) == head_revision()
        ensure_migrated(engine)
    finally:
        engine.dispose()


def test_compare_detects_drift(db_url: str) -> None:
    # Guards the test above: a model the migration does not create must show up as a diff.
    upgrade(db_url)
    engine = make_engine(db_url)
    metadata = Base.metadata
    extra = Table("not_migrated", metadata, Column("id", Integer, primary_key=True))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(context, metadata)
        assert [d[0] for d in diffs] == ["add_table"]
    finally:
        metadata.remove(extra)
        engine.dispose()


def test_upgrade_is_repeatable_and_downgrade_works(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # already at head: no-op
    # The URL-only path (env.py builds its own engine), as `alembic` would run it.
    command.downgrade(alembic_config(db_url), "base")
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        command.upgrade(alembic_config(db_url), "head")
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


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


def test_foreign_keys_are_enforced(session: Session) -> None:
    with pytest.raises(IntegrityError), session.begin():
        repo.record_artifact(session, job_id=12345, kind="csv", path="/x.csv")


def test_timestamps_are_aware_utc(session: Session) -> None:
    local = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    with session.begin():
        job = repo.create_job(session, kind=JobKind.TRAIN, params={})
        job.started_at = local
        job_id = job.id
    session.expunge_all()
    loaded = repo.get_job(session, job_id)
    assert loaded.created_at.tzinfo is not None
    assert loaded.created_at.utcoffset() == timedelta(0)
    assert loaded.started_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert loaded.started_at is not None and loaded.started_at.tzinfo == UTC
    assert abs(datetime.now(UTC) - loaded.created_at) < timedelta(minutes=5)


def test_enums_are_stored_as_lowercase_values(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind="classify", params={"a": [1, 2]}).id
    raw = session.execute(text("SELECT kind, status FROM jobs WHERE id = :id"), {"id": job_id})
    assert tuple(raw.one()) == ("classify", "queued")
    session.rollback()
    job = session.get(Job, job_id)
    assert job is not None and job.kind is JobKind.CLASSIFY and job.status is JobStatus.QUEUED
    assert job.params == {"a": [1, 2]}


# --------------------------------------------------------------------------- retries


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


def test_calibration_revision_upgrades_old_models_and_downgrades(db_url: str) -> None:
    # A model version registered before calibration existed (schema at 0001) ...
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO model_versions (arch, label_mode, classes, checkpoint_path, "
                    "checkpoint_sha256, metrics, stage, created_at) VALUES ('resnet18', '15', "
                    "'[]', '/m/best.pt', :sha, '{}', 'candidate', :now)"
                ),
                {"sha": "0" * 64, "now": datetime.now(UTC)},
            )
        command.upgrade(cfg, "0003")
        columns = {c["name"] for c in inspect(engine).get_columns("model_versions")}
        assert {"temperature", "calibrated", "ece", "ece_uncalibrated", "nll",
                "nll_uncalibrated"} <= columns
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT temperature, calibrated, ece, nll FROM model_versions")
            ).one()
        # ... reads as uncalibrated: temperature 1.0, said so by the flag, no ECE/NLL.
        assert row.temperature == 1.0 and not row.calibrated
        assert row.ece is None and row.nll is None
        # The models map later revisions' columns too: read them through the ORM at head.
        command.upgrade(cfg, "head")
        with make_session_factory(engine)() as session:
            version = repo.list_model_versions(session)[0]
            assert version.temperature == 1.0 and version.calibrated is False
        command.downgrade(cfg, "0001")
        engine.dispose()
        columns = {c["name"] for c in inspect(engine).get_columns("model_versions")}
        assert "temperature" not in columns and "calibrated" not in columns
        assert "ece" not in columns and "checkpoint_sha256" in columns
    finally:
        engine.dispose()
