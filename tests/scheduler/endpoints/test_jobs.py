"""scheduler.endpoints.jobs: submission (confinement 403, limits 413, validation 422),
unknown ids (404), paging, cancel; on a real SQLite database and the embedded
filesystem broker (no worker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import JobKind
from scheduler.settings import Settings
from tests.scheduler.api_factories import (
    add_model,
    classify_job_count,
    make_images,
)

# ----------------------------------------------------------------------------- submission


def test_classify_submit_get_and_paging(
    client: TestClient, root: Path, sessions: sessionmaker[Session]
) -> None:
    model_id = add_model(sessions)
    folder = make_images(root, 3)
    response = client.post("/jobs/classify", json={"inputs": [str(folder)], "top_k": 2})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = client.get(f"/jobs/{job_id}").json()
    assert job["kind"] == "classify" and job["status"] == "queued"
    assert job["progress_total"] == 3 and job["model_version_id"] == model_id
    assert job["submitter"] == "api"

    ids = [client.post("/jobs/classify", json={"inputs": [str(folder)]}).json()["id"]
           for _ in range(3)]
    page = client.get("/jobs", params={"kind": "classify", "limit": 2}).json()
    assert [j["id"] for j in page["items"]] == [ids[2], ids[1]]
    assert page["next_offset"] == 2
    page2 = client.get("/jobs", params={"kind": "classify", "limit": 2, "offset": 2}).json()
    assert [j["id"] for j in page2["items"]] == [ids[0], job_id]
    queued = client.get("/jobs", params={"status": "succeeded"}).json()
    assert queued["items"] == [] and queued["next_offset"] is None


def test_paths_outside_roots_are_403_and_nothing_stored(
    client: TestClient, root: Path, tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    add_model(sessions)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "a.png").write_bytes(b"x")
    (secret / "list.txt").write_text(str(root / "x.png"))
    cases = [
        [str(secret / "a.png")],
        [str(root / ".." / "secret" / "a.png")],
        [str(secret / "*.png")],
        [f"@{secret / 'list.txt'}"],
        [str(make_images(root, 1)), str(secret)],
    ]
    for inputs in cases:
        response = client.post("/jobs/classify", json={"inputs": inputs})
        assert response.status_code == 403, (inputs, response.text)
        assert "outside the allowed data roots" in response.json()["detail"]
    (root / "data").mkdir()
    assert client.post("/jobs/train", json={"data": str(secret)}).status_code == 403
    assert client.post("/jobs/evaluate",
                       json={"model_version_id": 1, "data": str(secret)}).status_code == 403
    assert classify_job_count(sessions) == 0
    with sessions() as s:
        assert all(j.kind == JobKind.TRAIN for j in repository.list_jobs(s))


def test_too_many_inputs_is_413(
    client: TestClient, root: Path, sessions: sessionmaker[Session], settings: Settings
) -> None:
    add_model(sessions)
    # More entries than max_paths_per_job (5): refused before any expansion.
    response = client.post("/jobs/classify", json={"inputs": [str(root / "a.png")] * 6})
    assert response.status_code == 413
    # A folder expanding beyond the limit.
    response = client.post("/jobs/classify", json={"inputs": [str(make_images(root, 6))]})
    assert response.status_code == 413
    assert "at most 5" in response.json()["detail"]
    # A body far beyond the byte budget is refused before it is parsed.
    huge = "x" * (70 * 1024 + 5 * 1024)
    response = client.post("/jobs/classify", content=huge,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert classify_job_count(sessions) == 0


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/jobs/classify", {}),
        ("/jobs/classify", {"inputs": []}),
        ("/jobs/classify", {"inputs": "not-a-list"}),
        ("/jobs/classify", {"inputs": ["a\u0000b.png"]}),
        ("/jobs/classify", {"inputs": ["x" * 5000]}),
        ("/jobs/classify", {"inputs": ["a.png"], "top_k": 0}),
        ("/jobs/classify", {"inputs": ["a.png"], "model_version_id": 2**40}),
        ("/jobs/classify", {"inputs": ["a.png"], "extra": 1}),
        ("/jobs/train", {"data": "d", "arch": "vgg"}),
        ("/jobs/train", {"data": "d", "epochs": 0}),
        ("/jobs/train", {"data": "d", "labels": "12"}),
        ("/jobs/train", {"data": "d", "device": "tpu"}),
        ("/jobs/evaluate", {"data": "d"}),
    ],
)
def test_malformed_bodies_are_422(client: TestClient, url: str, body: dict[str, Any]) -> None:
    response = client.post(url, json=body)
    assert response.status_code == 422, response.text


def test_malformed_json_and_query_are_422(client: TestClient) -> None:
    response = client.post("/jobs/classify", content=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert client.get("/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/jobs", params={"status": "bogus"}).status_code == 422
    assert client.get("/jobs/abc").status_code == 422
    assert client.get(f"/jobs/{2**63}").status_code == 422
    assert client.get("/jobs/1/predictions", params={"format": "xml"}).status_code == 422


def test_train_and_evaluate_refusals(
    client: TestClient, root: Path, sessions: sessionmaker[Session]
) -> None:
    (root / "data").mkdir()
    response = client.post("/jobs/train", json={"data": str(root / "missing")})
    assert response.status_code == 422 and "not a directory" in response.json()["detail"]
    response = client.post("/jobs/train", json={"data": str(root / "data"), "warm_start": True})
    assert response.status_code == 422 and "no production model" in response.json()["detail"]
    response = client.post("/jobs/train",
                           json={"data": str(root / "data"), "arch": "resnet18", "epochs": 1})
    assert response.status_code == 201
    assert client.get(f"/jobs/{response.json()['id']}").json()["params"]["arch"] == "resnet18"
    response = client.post("/jobs/evaluate",
                           json={"model_version_id": 999, "data": str(root / "data")})
    assert response.status_code == 404
    response = client.post("/jobs/classify", json={"inputs": [str(root / "data")]})
    assert response.status_code == 409  # no production model yet
    model_id = add_model(sessions, promote=False)
    response = client.post("/jobs/evaluate",
                           json={"model_version_id": model_id, "data": str(root / "data")})
    assert response.status_code == 201


def test_unknown_ids_are_404(client: TestClient) -> None:
    for method, url in (("get", "/jobs/12345"), ("post", "/jobs/12345/cancel"),
                        ("get", "/jobs/12345/predictions"),
                        ("get", "/jobs/12345/predictions?format=csv"),
                        ("get", "/jobs/12345/metrics"), ("get", "/jobs/12345/artifacts"),
                        ("get", "/artifacts/12345"), ("get", "/models/12345"),
                        ("post", "/models/12345/promote")):
        response = client.request(method, url)
        assert response.status_code == 404, url
        assert "not found" in response.json()["detail"]


def test_cancel(client: TestClient, root: Path, sessions: sessionmaker[Session]) -> None:
    add_model(sessions)
    inputs = [str(make_images(root, 2))]
    job_id = client.post("/jobs/classify", json={"inputs": inputs}).json()["id"]
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"


def test_classify_review_options_reach_the_job_and_bad_ones_are_422(
    client: TestClient, root: Path, sessions: sessionmaker[Session]
) -> None:
    add_model(sessions)
    folder = make_images(root, 1)
    response = client.post("/jobs/classify", json={"inputs": [str(folder)],
                                                   "review_below": 0.3, "explain": "all"})
    assert response.status_code == 201, response.text
    job = client.get(f"/jobs/{response.json()['id']}").json()
    assert job["review_below"] == 0.3 and job["params"]["explain"] == "all"
    default = client.get(
        f"/jobs/{client.post('/jobs/classify', json={'inputs': [str(folder)]}).json()['id']}"
    ).json()
    assert default["review_below"] == 0.6 and default["params"]["explain"] == "none"
    for body, name in [({"review_below": 1.2}, "review_below"),
                       ({"review_below": "low"}, "review_below"),
                       ({"explain": "some"}, "explain")]:
        bad = client.post("/jobs/classify", json={"inputs": [str(folder)], **body})
        assert bad.status_code == 422, (body, bad.text)
        assert bad.json()["detail"][0]["loc"] == ["body", name]
    assert classify_job_count(sessions) == 2


def test_train_with_reviews_from_a_classify_job(
    client: TestClient, root: Path, sessions: sessionmaker[Session]
) -> None:
    add_model(sessions)
    (root / "data").mkdir()
    classify_id = client.post("/jobs/classify",
                              json={"inputs": [str(make_images(root, 1))]}).json()["id"]
    created = client.post("/jobs/train", json={"data": str(root / "data"),
                                               "reviews_from": classify_id})
    assert created.status_code == 201, created.text
    params = client.get(f"/jobs/{created.json()['id']}").json()["params"]
    assert params["with_reviews"] is True and params["reviews_from"] == classify_id
    missing = client.post("/jobs/train", json={"data": str(root / "data"), "reviews_from": 999})
    assert missing.status_code == 422
    assert missing.json()["detail"] == "reviews_from: there is no job 999"
    bad = client.post("/jobs/train", json={"data": str(root / "data"), "with_reviews": "maybe"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "with_reviews"]
