"""``POST /jobs/{id}/predictions/{item}/explanation`` and the explanation URL of the
predictions API; a real SQLite database and the embedded filesystem broker (the sent task
is read back from its queue folder; no worker runs)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.dispatch import EXPLAIN_TASK
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind
from scheduler.settings import Settings
from tests.scheduler.api_factories import add_model, make_images, sent_tasks


def _classified(client: TestClient, root: Path, sessions: sessionmaker[Session]) -> int:
    add_model(sessions)
    job_id = int(client.post("/jobs/classify",
                             json={"inputs": [str(make_images(root, 2))]}).json()["id"])
    with sessions() as s, s.begin():
        (_, first), (_, second) = list(repository.iter_job_items(s, job_id))
        repository.record_predictions(s, job_id, [
            PredictionRecord(item_index=0, path=first, file_sha256=None, label="Normal",
                             confidence=0.55, top_k=(("Normal", 0.55),), entropy=0.7),
            PredictionRecord(item_index=1, path=second, file_sha256=None, label=None,
                             confidence=None, error="unreadable"),
        ])
    return job_id


def _item_ids(sessions: sessionmaker[Session], job_id: int) -> list[int]:
    with sessions() as s:
        return [int(r.id) for r in repository.list_predictions(s, job_id)]


def test_explanation_request_sends_the_task_and_links_the_artifact(
    client: TestClient, root: Path, sessions: sessionmaker[Session], settings: Settings
) -> None:
    job_id = _classified(client, root, sessions)
    good, _ = _item_ids(sessions, job_id)
    before = len(sent_tasks(settings.data_dir))
    response = client.post(f"/jobs/{job_id}/predictions/{good}/explanation")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["job_id"] == job_id and body["item_id"] == good
    assert body["item"]["item_id"] == good and body["item"]["explanation"] is None
    assert sent_tasks(settings.data_dir)[before:] == [(EXPLAIN_TASK, [job_id, good])]

    # What the worker does once it wrote the file: the API shows a download URL, no path.
    png = settings.jobs_dir / str(job_id) / "explanations" / f"{good}.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG fake")
    with sessions() as s, s.begin():
        artifact_id = repository.set_explanation(s, good, str(png)).id
    items = client.get(f"/jobs/{job_id}/predictions").json()["items"]
    assert [i["explanation"] for i in items] == [f"/artifacts/{artifact_id}", None]
    assert str(settings.data_dir) not in client.get(f"/jobs/{job_id}/predictions").text
    assert client.get(f"/artifacts/{artifact_id}").content == b"\x89PNG fake"
    again = client.post(f"/jobs/{job_id}/predictions/{good}/explanation").json()
    assert again["item"]["explanation"] == f"/artifacts/{artifact_id}"


def test_explanation_refusals(
    client: TestClient, root: Path, sessions: sessionmaker[Session], settings: Settings
) -> None:
    job_id = _classified(client, root, sessions)
    good, error_row = _item_ids(sessions, job_id)
    with sessions() as s, s.begin():
        train_id = int(repository.list_jobs(s, kind=JobKind.TRAIN)[0].id)
    before = len(sent_tasks(settings.data_dir))
    unknown_job = client.post(f"/jobs/999/predictions/{good}/explanation")
    assert unknown_job.status_code == 404 and unknown_job.json()["detail"] == "job 999 not found"
    unknown_item = client.post(f"/jobs/{job_id}/predictions/999999/explanation")
    assert unknown_item.status_code == 404
    assert unknown_item.json()["detail"] == f"job {job_id} item 999999 not found"
    other_job = client.post(f"/jobs/{train_id}/predictions/{good}/explanation")
    assert other_job.status_code == 409 and "only the predictions of classify jobs" in (
        other_job.json()["detail"])
    error = client.post(f"/jobs/{job_id}/predictions/{error_row}/explanation")
    assert error.status_code == 409 and "is an error row (unreadable)" in error.json()["detail"]
    assert client.post(f"/jobs/{job_id}/predictions/0/explanation").status_code == 422
    assert len(sent_tasks(settings.data_dir)) == before  # nothing sent for a refusal
