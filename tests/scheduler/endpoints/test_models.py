"""scheduler.endpoints.models: promotion, rollback, calibration fields; on a real SQLite
database and the embedded filesystem broker (no worker).
"""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from tests.scheduler.api_factories import (
    add_model,
)

# ----------------------------------------------------------------------------- models, health


def test_models_promote_rollback(client: TestClient, sessions: sessionmaker[Session]) -> None:
    assert client.post("/models/rollback").status_code == 409
    first = add_model(sessions, promote=False)
    second = add_model(sessions, promote=False)
    assert [m["id"] for m in client.get("/models").json()] == [second, first]
    assert client.post(f"/models/{first}/promote").json()["stage"] == "production"
    assert client.post(f"/models/{second}/promote").json()["stage"] == "production"
    assert client.get(f"/models/{first}").json()["stage"] == "archived"
    restored = client.post("/models/rollback")
    assert restored.status_code == 200 and restored.json()["id"] == first
    assert client.post("/models/rollback").status_code in (200, 409)


def test_model_out_has_calibration_fields(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    legacy = add_model(sessions, promote=False)
    with sessions() as s, s.begin():
        version = repository.register_model_version(
            s, training_job_id=None, arch="resnet18", label_mode="15",
            classes=["Glioblastoma", "Normal"], checkpoint_path="/m/c.pt",
            checkpoint_sha256="d" * 64, metrics={},
            calibration={"temperature": 2.5, "calibrated": True, "ece": 0.03, "nll": 0.5},
        )
        calibrated = int(version.id)
    body = client.get(f"/models/{calibrated}").json()
    assert (body["temperature"], body["calibrated"], body["ece"], body["nll"]) == (
        2.5, True, 0.03, 0.5
    )
    assert body["ece_uncalibrated"] is None
    old = client.get(f"/models/{legacy}").json()
    assert old["temperature"] == 1.0 and old["calibrated"] is False and old["ece"] is None


def test_model_lineage_names_the_reviews_it_trained_on(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    from scheduler import review

    plain = add_model(sessions, promote=False)
    reviewed = add_model(sessions, promote=False)
    with sessions() as s, s.begin():
        review.record_lineage(s, reviewed, review_ids=[9, 4, 4])
    doc = client.get(f"/models/{reviewed}").json()
    assert doc["reviews_used"] == 2 and doc["review_ids"] == [4, 9]
    without = client.get(f"/models/{plain}").json()
    assert without["reviews_used"] is None and without["review_ids"] is None
    listed = {m["id"]: m["reviews_used"] for m in client.get("/models").json()}
    assert listed == {plain: None, reviewed: 2}
