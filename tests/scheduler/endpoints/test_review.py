"""``/review`` over HTTP (TestClient, real databases): paging, decisions, identity, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.api import create_app
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.schema import PredictionRow
from scheduler.settings import Settings
from tests.scheduler.reviewdata import add_classify_job, standard_preds, write

TOKEN = "review-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(tmp_path: Path, url: str, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "state", database_url=url, data_roots=(tmp_path,), **kw)


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def client(
    tmp_path: Path, sqlite_url: str, sessions: sessionmaker[Session]
) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path, sqlite_url, api_token=TOKEN)),
                    headers=AUTH) as c:
        yield c


def _job(sessions: sessionmaker[Session]) -> tuple[int, list[int]]:
    with sessions() as s:
        return add_classify_job(s, standard_preds())


def test_queue_pages_most_uncertain_first(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    job_id, ids = _job(sessions)
    first = client.get("/review", params={"job": job_id, "limit": 3})
    assert first.status_code == 200, first.text
    body = first.json()
    assert [i["item_id"] for i in body["items"]] == [ids[5], ids[2], ids[1]]
    assert body["items"][1]["top_k"] == [["Meningioma", 0.4]]
    assert body["items"][1]["status"] == "pending" and body["next_cursor"]
    rest = client.get("/review", params={"job": job_id, "limit": 3,
                                         "cursor": body["next_cursor"]}).json()
    assert [i["item_id"] for i in rest["items"]] == [ids[3]] and rest["next_cursor"] is None
    assert client.get("/review", params={"cursor": "junk"}).status_code == 422
    assert client.get("/review", params={"status": "maybe"}).status_code == 422
    assert client.get("/review", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_decisions_errors_and_history(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    job_id, ids = _job(sessions)
    missing = client.post("/review/999999", json={"action": "accept"})
    assert missing.status_code == 404 and "review item 999999" in missing.json()["detail"]
    assert client.get("/review/999999").status_code == 404
    bad = client.post(f"/review/{ids[1]}", json={"action": "correct", "label": "Glioma"})
    assert bad.status_code == 422
    assert "valid labels: Glioblastoma, Meningioma, Normal" in bad.json()["detail"]
    error_row = client.post(f"/review/{ids[4]}", json={"action": "accept"})
    assert error_row.status_code == 409 and "error row" in error_row.json()["detail"]
    assert client.post(f"/review/{ids[1]}", json={"action": "delete"}).status_code == 422
    # The token's identity is recorded, whatever the body claims.
    ok = client.post(f"/review/{ids[1]}", json={"action": "accept", "reviewer": "mallory"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["item"]["status"] == "accepted"
    again = client.post(f"/review/{ids[1]}", json={"action": "correct", "label": "Normal"})
    detail = again.json()
    assert detail["item"]["reviewed_label"] == "Normal"
    assert [(d["decision"], d["reviewer"], d["superseded"]) for d in detail["history"]] == [
        ("accepted", "api-token", True), ("corrected", "api-token", False)]
    assert client.get(f"/review/{ids[1]}").json() == detail
    flagged = client.post(f"/review/{ids[0]}", json={"action": "flag"}).json()
    assert flagged["item"]["flagged"] and flagged["item"]["status"] == "pending"
    pending = client.get("/review", params={"job": job_id}).json()["items"]
    assert ids[0] in [i["item_id"] for i in pending] and ids[1] not in [
        i["item_id"] for i in pending]
    corrected = client.get("/review", params={"status": "corrected"}).json()["items"]
    assert [i["item_id"] for i in corrected] == [ids[1]]


def test_explanations_are_served_as_artifact_urls_not_paths(
    client: TestClient, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id, ids = _job(sessions)
    cam = str(tmp_path / "state" / "jobs" / str(job_id) / "cam" / "c.png")
    with sessions() as s, write(s):
        row = s.get(PredictionRow, ids[2])
        assert row is not None
        row.explanation = cam
        artifact_id = repository.record_artifact(s, job_id=job_id, kind="explanation",
                                                 path=cam).id
    item = client.get(f"/review/{ids[2]}").json()["item"]
    assert item["explanation_url"] == f"/artifacts/{artifact_id}"
    assert cam not in client.get("/review").text


def test_without_token_the_body_names_the_reviewer(tmp_path: Path, postgres_url: str) -> None:
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    try:
        with make_session_factory(engine)() as s:
            _, ids = add_classify_job(s, standard_preds())
        with TestClient(create_app(_settings(tmp_path, postgres_url))) as c:
            named = c.post(f"/review/{ids[2]}", json={"action": "accept", "reviewer": "ann"})
            assert named.status_code == 200, named.text
            anon = c.post(f"/review/{ids[2]}", json={"action": "correct", "label": "Normal"})
            history = anon.json()["history"]
        assert [(d["reviewer"], d["label"]) for d in history] == [
            ("ann", "Meningioma"), ("anonymous", "Normal")]
    finally:
        engine.dispose()
