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
