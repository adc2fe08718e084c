"""Model versions: registration (idempotent per training job), promotion, rollback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.repository.base import NoRollbackTargetError, NotFoundError
from scheduler.schema import ModelStage, ModelVersion, utcnow

__all__ = [
    "CALIBRATION_FIELDS",
    "get_model_version",
    "get_production_model",
    "list_model_versions",
    "promote_model_version",
    "register_model_version",
    "rollback_production",
]


CALIBRATION_FIELDS = (
    "temperature",
    "calibrated",
    "ece",
    "ece_uncalibrated",
    "nll",
    "nll_uncalibrated",
)


def _calibration_columns(calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    data = dict(calibration or {})
    unknown = set(data) - set(CALIBRATION_FIELDS)
    if unknown:
        raise ValueError(f"unknown calibration fields: {sorted(unknown)}")

    def opt(key: str) -> float | None:
        value = data.get(key)
        return None if value is None else float(value)

    return {
        "temperature": float(data.get("temperature", 1.0)),
        "calibrated": bool(data.get("calibrated", False)),
        "ece": opt("ece"),
        "ece_uncalibrated": opt("ece_uncalibrated"),
        "nll": opt("nll"),
        "nll_uncalibrated": opt("nll_uncalibrated"),
    }


def register_model_version(
    session: Session,
    *,
    training_job_id: int | None,
    arch: str,
    label_mode: str,
    classes: Sequence[str],
    checkpoint_path: str,
    checkpoint_sha256: str,
    metrics: dict[str, Any],
    calibration: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Register a trained checkpoint as a candidate; idempotent per ``training_job_id``.

    A retry for the same training job returns the existing row; while it is still a candidate
    its checkpoint and metrics are refreshed (the retry's files are the current ones).
    ``calibration`` holds any of ``CALIBRATION_FIELDS`` (absent: temperature 1.0, not
    calibrated, no ECE/NLL).
    """
    cal = _calibration_columns(calibration)
    if training_job_id is not None:
        existing = session.scalars(
            select(ModelVersion).where(ModelVersion.training_job_id == training_job_id)
        ).one_or_none()
        if existing is not None:
            if existing.stage == ModelStage.CANDIDATE:
                existing.arch = arch
                existing.label_mode = label_mode
                existing.classes = list(classes)
                existing.checkpoint_path = checkpoint_path
                existing.checkpoint_sha256 = checkpoint_sha256
                existing.metrics = dict(metrics)
                for key, value in cal.items():
                    setattr(existing, key, value)
                session.flush()
            return existing
    version = ModelVersion(
        training_job_id=training_job_id,
        arch=arch,
        label_mode=label_mode,
        classes=list(classes),
        checkpoint_path=checkpoint_path,
        checkpoint_sha256=checkpoint_sha256,
        metrics=dict(metrics),
        stage=ModelStage.CANDIDATE,
        created_at=utcnow(),
        **cal,
    )
    session.add(version)
    session.flush()
    return version


def get_model_version(session: Session, id: int) -> ModelVersion:
    version = session.get(ModelVersion, id)
    if version is None:
        raise NotFoundError("model version", id)
    return version


def list_model_versions(session: Session) -> list[ModelVersion]:
    """All model versions, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def get_production_model(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.stage == ModelStage.PRODUCTION)
    ).one_or_none()


def _production_for_update(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.stage == ModelStage.PRODUCTION)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def promote_model_version(session: Session, id: int) -> ModelVersion:
    """Make ``id`` the production model; the current production one becomes archived.

    Promoting the production model again is a no-op. The partial unique index on
    ``stage = 'production'`` guarantees a concurrent promotion cannot leave two.
    """
    version = get_model_version(session, id)
    current = _production_for_update(session)
    if current is not None and current.id == version.id:
        return version
    now = utcnow()
    if current is not None:
        current.stage = ModelStage.ARCHIVED
        current.archived_at = now
        # Flush the demotion first: the unit of work orders UPDATEs by primary key, not by our
        # intent, and the unique index would reject two production rows even transiently.
        session.flush()
    version.stage = ModelStage.PRODUCTION
    version.promoted_at = now
    version.archived_at = None
    session.flush()
    return version


def rollback_production(session: Session) -> ModelVersion:
    """Archive the production model and restore the most recently archived former production
    model; returns the restored one. Raises NoRollbackTargetError if there is no production
    model or no earlier one (nothing is changed then)."""
    current = _production_for_update(session)
    if current is None:
        raise NoRollbackTargetError("there is no production model to roll back")
    target = session.scalars(
        select(ModelVersion)
        .where(
            ModelVersion.stage == ModelStage.ARCHIVED,
            ModelVersion.promoted_at.is_not(None),
            ModelVersion.id != current.id,
        )
        .order_by(ModelVersion.archived_at.desc(), ModelVersion.id.desc())
        .limit(1)
    ).one_or_none()
    if target is None:
        raise NoRollbackTargetError(
            f"model version {current.id} is the only model that has been in production"
        )
    now = utcnow()
    current.stage = ModelStage.ARCHIVED
    current.archived_at = now
    session.flush()  # demote first, see promote_model_version
    target.stage = ModelStage.PRODUCTION
    target.promoted_at = now
    target.archived_at = None
    session.flush()
    return target
