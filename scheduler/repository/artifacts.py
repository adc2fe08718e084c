"""Files jobs produced (plots, reports, CSV exports), idempotent on (job_id, path).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.repository.base import NotFoundError
from scheduler.schema import Artifact, utcnow

__all__ = [
    "EXPORT_ARTIFACT",
    "artifact_ids",
    "get_artifact",
    "list_artifacts",
    "list_model_artifacts",
    "record_artifact",
]


def record_artifact(
    session: Session,
    *,
    job_id: int,
    kind: str,
    path: str,
    model_version_id: int | None = None,
) -> Artifact:
    """Register a file a job produced; idempotent on (job_id, path)."""
    artifact = session.scalars(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.path == path)
    ).one_or_none()
    if artifact is None:
        artifact = Artifact(
            job_id=job_id,
            kind=kind,
            path=path,
            model_version_id=model_version_id,
            created_at=utcnow(),
        )
        session.add(artifact)
    else:
        artifact.kind = kind
        if model_version_id is not None:
            artifact.model_version_id = model_version_id
    session.flush()
    return artifact


def list_artifacts(session: Session, job_id: int) -> list[Artifact]:
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id))
    )


#: The artifact kind of a model version's export (worker/tasks/export.py records it).
EXPORT_ARTIFACT = "export"


def list_model_artifacts(session: Session, model_version_id: int, kind: str) -> list[Artifact]:
    """The artifacts of ``kind`` recorded for a model version (its exports), oldest first."""
    query = select(Artifact).where(
        Artifact.model_version_id == model_version_id, Artifact.kind == kind
    )
    return list(session.scalars(query.order_by(Artifact.id)))


def get_artifact(session: Session, artifact_id: int) -> Artifact:
    artifact = session.get(Artifact, artifact_id)
    if artifact is None:
        raise NotFoundError("artifact", artifact_id)
    return artifact


def artifact_ids(session: Session, job_id: int, paths: Iterable[str | None]) -> dict[str, int]:
    """path -> id of the job's artifact at that path (Nones and unrecorded paths left out):
    the API links a stored path to its download URL, never the path itself."""
    wanted = {p for p in paths if p}
    if not wanted:
        return {}
    rows = session.execute(
        select(Artifact.path, Artifact.id).where(Artifact.job_id == job_id,
                                                 Artifact.path.in_(wanted))
    )
    return {str(path): int(aid) for path, aid in rows}
