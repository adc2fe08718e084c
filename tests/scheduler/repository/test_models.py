"""scheduler.repository.models: registration, promotion, rollback.

On real SQLite and PostgreSQL databases (``db_url`` runs both)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from scheduler import repository as repo
from scheduler.repository import NoRollbackTargetError
from scheduler.schema import JobKind, ModelStage


def _register(session: Session, training_job_id: int | None, sha: str = "0" * 64) -> int:
    return repo.register_model_version(
        session,
        training_job_id=training_job_id,
        arch="efficientnet_b0",
        label_mode="15",
        classes=["a", "b"],
        checkpoint_path=f"/models/{training_job_id}/best.pt",
        checkpoint_sha256=sha,
        metrics={"macro_f1": 0.5},
    ).id


def test_register_model_version_is_idempotent_per_training_job(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        first = _register(session, job_id)
    with session.begin():
        assert _register(session, job_id, sha="1" * 64) == first
    version = repo.get_model_version(session, first)
    assert version.stage is ModelStage.CANDIDATE and version.checkpoint_sha256 == "1" * 64
    assert version.classes == ["a", "b"] and version.created_at.tzinfo is not None
    assert [v.id for v in repo.list_model_versions(session)] == [first]


def test_promote_keeps_exactly_one_production_and_rollback_restores(session: Session) -> None:
    with session.begin():
        jobs = [repo.create_job(session, kind=JobKind.TRAIN, params={}).id for _ in range(3)]
        a, b, c = (_register(session, j) for j in jobs)
    assert repo.get_production_model(session) is None
    session.rollback()

    def production() -> int | None:
        with session.begin():
            current = repo.get_production_model(session)
            return None if current is None else current.id

    def stages() -> dict[int, ModelStage]:
        with session.begin():
            return {v.id: v.stage for v in repo.list_model_versions(session)}

    with session.begin():
        repo.promote_model_version(session, a)
    with session.begin():
        repo.promote_model_version(session, a)  # again: no-op
    assert production() == a
    with session.begin():
        promoted = repo.promote_model_version(session, b)
        assert promoted.stage is ModelStage.PRODUCTION and promoted.promoted_at is not None
    assert production() == b
    assert stages() == {a: ModelStage.ARCHIVED, b: ModelStage.PRODUCTION, c: ModelStage.CANDIDATE}
    with session.begin():
        repo.promote_model_version(session, c)
    with session.begin():
        assert repo.rollback_production(session).id == b
    assert stages() == {a: ModelStage.ARCHIVED, b: ModelStage.PRODUCTION, c: ModelStage.ARCHIVED}
    with session.begin():
        assert repo.rollback_production(session).id == c  # most recently archived former prod
    assert list(stages().values()).count(ModelStage.PRODUCTION) == 1


def test_rollback_without_target_changes_nothing(session: Session) -> None:
    with pytest.raises(NoRollbackTargetError, match="no production model"), session.begin():
        repo.rollback_production(session)
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        version = _register(session, job_id)
        repo.promote_model_version(session, version)
    with pytest.raises(NoRollbackTargetError, match="only model"), session.begin():
        repo.rollback_production(session)
    production = repo.get_production_model(session)
    assert production is not None and production.id == version


def test_database_refuses_two_production_models(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        a, b = _register(session, job_id), _register(session, None)
        repo.promote_model_version(session, a)
    with pytest.raises(IntegrityError), session.begin():
        repo.get_model_version(session, b).stage = ModelStage.PRODUCTION
