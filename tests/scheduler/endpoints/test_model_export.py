"""``POST /models/{id}/export``: an export job stored and its task sent; the refusals."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.dispatch import EXPORT_TASK
from scheduler.schema import JobKind, JobStatus
from scheduler.settings import Settings
from tests.scheduler.api_factories import add_model, sent_tasks


def test_export_queues_a_job_and_refuses_bad_requests(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    model_id = add_model(sessions)
    response = client.post(f"/models/{model_id}/export", json={"format": "onnx"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    with sessions() as s:
        job = repository.get_job(s, job_id)
        assert (job.kind, job.status) == (JobKind.EXPORT, JobStatus.QUEUED)
        assert job.params == {"format": "onnx"} and job.model_version_id == model_id
    assert sent_tasks(Path(settings.data_dir)) == [(EXPORT_TASK, [job_id])]
    assert client.post(f"/models/{model_id}/export", json={"format": "tflite"}).status_code == 422
    assert client.post("/models/999999/export", json={"format": "onnx"}).status_code == 404
    assert len(sent_tasks(Path(settings.data_dir))) == 1
