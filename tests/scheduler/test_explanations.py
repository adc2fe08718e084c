"""scheduler.explanations: the checks before an explanation task is sent, and a broker that
refuses it (a dispatcher whose send fails, as a down broker's does) changing nothing."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import explanations, repository
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind


class _RefusingDispatcher:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def explain(self, job_id: int, item_id: int) -> str:
        self.calls.append((job_id, item_id))
        raise ConnectionRefusedError("Error 111 connecting to broker:6379")


def test_a_refused_task_is_reported_and_nothing_changes(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as s, s.begin():
        job_id = int(repository.create_job(s, kind=JobKind.CLASSIFY, params={}).id)
        repository.add_job_items(s, job_id, ["/d/a.png"], chunk_size=1)
        repository.record_predictions(s, job_id, [PredictionRecord(
            item_index=0, path="/d/a.png", file_sha256=None, label="Normal", confidence=0.4)])
        item_id = int(repository.list_predictions(s, job_id)[0].id)
    dispatcher = _RefusingDispatcher()
    with pytest.raises(explanations.ExplanationNotSentError, match="broker is unavailable") as e:
        explanations.request_explanation(sessions, dispatcher, job_id, item_id)
    assert "Error 111" in e.value.reason and dispatcher.calls == [(job_id, item_id)]
    with sessions() as s:
        assert repository.list_predictions(s, job_id)[0].explanation is None
    with pytest.raises(repository.NotFoundError):
        explanations.request_explanation(sessions, dispatcher, job_id + 1, item_id)
    assert len(dispatcher.calls) == 1  # checked before anything is sent
