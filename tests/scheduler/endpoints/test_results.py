"""scheduler.endpoints.results: predictions (pages and CSV), metrics, artifacts and their
download, no server path in responses; on a real SQLite database and the embedded
filesystem broker (no worker).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind, JobStatus
from scheduler.settings import Settings
from tests.scheduler.api_factories import (
    add_model,
    make_images,
)

# ----------------------------------------------------------------------------- results


def test_predictions_paging_and_csv(
    client: TestClient, root: Path, sessions: sessionmaker[Session]
) -> None:
    add_model(sessions)
    inputs = [str(make_images(root, 5))]
    job_id = client.post("/jobs/classify", json={"inputs": inputs}).json()["id"]
    with sessions() as s, s.begin():
        items = list(repository.iter_job_items(s, job_id))
        records = [PredictionRecord(item_index=i, path=p, file_sha256="d" * 64, label="Normal",
                                    confidence=0.9, top_k=(("Normal", 0.9), ("Glioblastoma", 0.1)))
                   for i, p in items[:4]]
        records.append(PredictionRecord(item_index=4, path=items[4][1], file_sha256=None,
                                        label=None, confidence=None, error="unreadable"))
        repository.record_predictions(s, job_id, records)

    page = client.get(f"/jobs/{job_id}/predictions", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 5 and page["offset"] == 1 and page["limit"] == 2
    assert [p["item_index"] for p in page["items"]] == [1, 2]
    assert page["items"][0]["top_k"] == [["Normal", 0.9], ["Glioblastoma", 0.1]]
    assert client.get(f"/jobs/{job_id}/predictions", params={"limit": 5000}).status_code == 422

    response = client.get(f"/jobs/{job_id}/predictions", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(r["item_index"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [r["path"] for r in rows] == [p for _, p in items]
    assert rows[4]["error"] == "unreadable" and rows[4]["label"] == ""
    assert json.loads(rows[0]["top_k"]) == [["Normal", 0.9], ["Glioblastoma", 0.1]]


def test_metrics_artifacts_and_download(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    plot = Path(settings.data_dir) / "jobs" / "1" / "confusion_matrix.png"
    plot.parent.mkdir(parents=True)
    plot.write_bytes(b"\x89PNG fake")
    elsewhere = tmp_path / "etc-passwd"
    elsewhere.write_text("root:x:0:0")
    with sessions() as s, s.begin():
        job = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d"})
        repository.record_epoch_metric(s, job.id, epoch=1, train_loss=1.0, val_loss=0.9,
                                       val_accuracy=0.5, val_macro_f1=0.4, lr=1e-3, seconds=2.0)
        repository.record_evaluation(s, job_id=job.id, model_version_id=None, dataset="test",
                                     report={"accuracy": 0.5, "macro_f1": 0.4, "n": 10})
        good = repository.record_artifact(s, job_id=job.id, kind="confusion_matrix",
                                          path=str(plot))
        bad = repository.record_artifact(s, job_id=job.id, kind="report", path=str(elsewhere))
        repository.finish_job(s, job.id, JobStatus.SUCCEEDED)
        job_id, good_id, bad_id = int(job.id), int(good.id), int(bad.id)

    metrics = client.get(f"/jobs/{job_id}/metrics").json()
    assert metrics["epochs"][0]["val_accuracy"] == 0.5
    assert metrics["evaluation"]["accuracy"] == 0.5 and metrics["evaluation"]["report"]["n"] == 10
    arts = client.get(f"/jobs/{job_id}/artifacts").json()
    assert {a["id"]: a["url"] for a in arts} == {
        good_id: f"/artifacts/{good_id}", bad_id: f"/artifacts/{bad_id}"
    }
    download = client.get(f"/artifacts/{good_id}")
    assert download.status_code == 200 and download.content == b"\x89PNG fake"
    # A row pointing outside the data folder is never served.
    refused = client.get(f"/artifacts/{bad_id}")
    assert refused.status_code == 403 and "root:x" not in refused.text


def test_responses_name_no_server_path(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """Checkpoint files and artifact locations are the server's: clients get ids and
    download URLs (the old responses carried ``checkpoint_path`` and ``path``)."""
    model_id = add_model(sessions)  # its checkpoint_path is /m/best.pt
    plot = Path(settings.jobs_dir) / "7" / "curves.png"
    plot.parent.mkdir(parents=True)
    plot.write_bytes(b"PNG")
    with sessions() as s, s.begin():
        job = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d"})
        artifact = repository.record_artifact(s, job_id=job.id, kind="curves", path=str(plot))
        job_id, artifact_id = int(job.id), int(artifact.id)
    bodies = [client.get("/models").text, client.get(f"/models/{model_id}").text,
              client.post(f"/models/{model_id}/promote").text,
              client.get(f"/jobs/{job_id}/artifacts").text]
    for body in bodies:
        assert "/m/best.pt" not in body and str(settings.data_dir) not in body, body
        assert '"path"' not in body and "checkpoint_path" not in body, body
    model = client.get(f"/models/{model_id}").json()
    assert model["checkpoint_sha256"] == "c" * 64
    assert client.get(f"/jobs/{job_id}/artifacts").json()[0]["url"] == f"/artifacts/{artifact_id}"
    assert client.get(f"/artifacts/{artifact_id}").content == b"PNG"
    schema = json.dumps(client.get("/openapi.json").json()["components"]["schemas"])
    assert "checkpoint_path" not in schema
