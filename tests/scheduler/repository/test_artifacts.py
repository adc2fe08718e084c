"""scheduler.repository.artifacts: idempotent per job and path.

On real SQLite and PostgreSQL databases (``db_url`` runs both)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from scheduler import repository as repo
from scheduler.schema import JobKind


def test_artifacts_are_idempotent_per_job_and_path(session: Session) -> None:
    with session.begin():
        job_id = repo.create_job(session, kind=JobKind.TRAIN, params={}).id
        first = repo.record_artifact(
            session, job_id=job_id, kind="confusion_matrix", path="/jobs/1/cm.png"
        )
        repo.record_artifact(session, job_id=job_id, kind="csv", path="/jobs/1/p.csv")
    with session.begin():
        again = repo.record_artifact(
            session, job_id=job_id, kind="confusion_matrix", path="/jobs/1/cm.png"
        )
    assert again.id == first.id
    assert [a.kind for a in repo.list_artifacts(session, job_id)] == ["confusion_matrix", "csv"]
    assert repo.get_artifact(session, first.id).path == "/jobs/1/cm.png"
