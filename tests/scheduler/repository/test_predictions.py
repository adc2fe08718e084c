"""scheduler.repository.predictions: idempotent bulk inserts.

On real SQLite and PostgreSQL databases (``db_url`` runs both)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from scheduler import repository as repo
from tests.scheduler.repository.factories import make_classify_job, make_record


def test_record_predictions_is_idempotent(session: Session) -> None:
    job_id = make_classify_job(session, 2500, 256)
    batch = [make_record(i) for i in range(2500)]
    with session.begin():
        assert repo.record_predictions(session, job_id, batch) == 2500
    with session.begin():
        assert repo.record_predictions(session, job_id, batch) == 0
        # Overlapping batch: only the new rows count.
        assert repo.record_predictions(session, job_id, [make_record(1)]) == 0
        assert repo.record_predictions(session, job_id, []) == 0
    assert repo.count_predictions(session, job_id) == 2500
    rows = repo.list_predictions(session, job_id, offset=10, limit=3)
    assert [r.item_index for r in rows] == [10, 11, 12]
    assert rows[0].top_k == [["glioma", 0.75], ["normal", 0.2], ["meningioma", 0.05]]
    assert rows[0].label == "glioma" and rows[0].confidence == pytest.approx(0.75)
    assert rows[0].file_sha256 == "ab" * 32 and rows[0].error is None
    streamed = list(repo.iter_predictions(session, job_id, batch=700))
    assert [r.item_index for r in streamed] == list(range(2500))


def test_entropy_and_explanation_are_recorded_and_explanations_replaced(
    session: Session,
) -> None:
    job_id = make_classify_job(session, 3, 4)
    batch = [
        repo.PredictionRecord(item_index=0, path="/d/0.png", file_sha256=None, label="glioma",
                              confidence=0.5, top_k=(("glioma", 0.5),), entropy=0.69,
                              explanation="/jobs/1/explanations/0.png"),
        repo.PredictionRecord(item_index=1, path="/d/1.png", file_sha256=None, label="normal",
                              confidence=0.9, top_k=(("normal", 0.9),), entropy=0.3),
        make_record(2, error="unreadable"),
    ]
    with session.begin():
        assert repo.record_predictions(session, job_id, batch) == 3
    first, second, third = repo.list_predictions(session, job_id)
    assert first.entropy == pytest.approx(0.69)
    assert first.explanation == "/jobs/1/explanations/0.png"
    assert second.explanation is None and third.entropy is None and third.explanation is None
    session.rollback()  # end the read's transaction

    with session.begin():
        artifact = repo.set_explanation(session, second.id, "/jobs/x/explanations/a.png")
        again = repo.set_explanation(session, second.id, "/jobs/x/explanations/a.png")
    assert again.id == artifact.id and artifact.kind == repo.EXPLANATION_KIND
    with session.begin():  # re-explained to another file: it replaces the old artifact
        newer = repo.set_explanation(session, second.id, "/jobs/x/explanations/b.png")
    session.expire_all()
    assert repo.list_predictions(session, job_id)[1].explanation == "/jobs/x/explanations/b.png"
    paths = [a.path for a in repo.list_artifacts(session, job_id)]
    assert paths == ["/jobs/x/explanations/b.png"]
    assert repo.artifact_ids(session, job_id, ["/jobs/x/explanations/b.png", None, "/n"]) == {
        "/jobs/x/explanations/b.png": newer.id}
    with pytest.raises(repo.NotFoundError, match="prediction 999999 not found"):
        repo.set_explanation(session, 999999, "/x.png")
