"""Migrations create exactly the models' schema, repeatably, and downgrade."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, Table, inspect, text

from scheduler import repository as repo
from scheduler.database import (
    alembic_config,
    current_revision,
    ensure_migrated,
    head_revision,
    make_engine,
    make_session_factory,
    upgrade,
)
from scheduler.schema import Base

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
