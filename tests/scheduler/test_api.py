"""The HTTP API on a real SQLite database and the embedded filesystem broker (no worker).

Covers auth (401 + WWW-Authenticate), confinement (403, nothing stored), limits (413),
validation (422), unknown ids (404), paging, the CSV export and the torch-free import.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.api import create_app
from scheduler.database import DatabaseNotMigratedError, make_engine, make_session_factory, upgrade
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind, JobStatus
from scheduler.settings import Settings

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def _settings(tmp_path: Path, root: Path, url: str, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "state", database_url=url, data_roots=(root,),
                    chunk_size=2, max_paths_per_job=5, **kw)


@pytest.fixture
def settings(tmp_path: Path, root: Path, sqlite_url: str) -> Settings:
    upgrade(sqlite_url)
    return _settings(tmp_path, root, sqlite_url, api_token=TOKEN)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=AUTH) as c:
        yield c


def _model(sessions: sessionmaker[Session], *, promote: bool = True) -> int:
    with sessions() as s, s.begin():
        train = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d"})
        version = repository.register_model_version(
            s, training_job_id=train.id, arch="resnet18", label_mode="15",
            classes=["Glioblastoma", "Normal"], checkpoint_path="/m/best.pt",
            checkpoint_sha256="c" * 64, metrics={"accuracy": 0.7},
        )
        if promote:
            repository.promote_model_version(s, version.id)
        return int(version.id)


def _images(root: Path, n: int, folder: str = "imgs") -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"{i:02d}.png").write_bytes(b"x")
    return d


def _job_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return len(repository.list_jobs(s, kind=JobKind.CLASSIFY, limit=1000))


# ----------------------------------------------------------------------------- process


def test_api_and_cli_never_import_torch() -> None:
    code = "import scheduler.api, scheduler.cli, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unmigrated_database_stops_app(tmp_path: Path, root: Path) -> None:
    settings = _settings(tmp_path, root, f"sqlite:///{tmp_path / 'fresh.db'}")
    with pytest.raises(DatabaseNotMigratedError, match="mriq db upgrade"):
        create_app(settings)


# ----------------------------------------------------------------------------- auth


def test_auth_required_when_token_set(settings: Settings) -> None:
    with TestClient(create_app(settings)) as anon:
        for method, url in (("get", "/jobs"), ("get", "/models"), ("post", "/jobs/classify"),
                            ("get", "/jobs/1/predictions"), ("post", "/models/rollback")):
            response = anon.request(method, url, json={})
            assert response.status_code == 401, url
            assert response.headers["www-authenticate"].startswith("Bearer")
        wrong = anon.get("/jobs", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        basic = anon.get("/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert basic.status_code == 401
        assert anon.get("/jobs", headers=AUTH).status_code == 200
        # Health and the docs stay open (load balancers, humans reading the schema).
        assert anon.get("/health").status_code == 200
        assert anon.get("/openapi.json").status_code == 200


def test_no_auth_when_token_unset(tmp_path: Path, root: Path, sqlite_url: str) -> None:
    upgrade(sqlite_url)
    with TestClient(create_app(_settings(tmp_path, root, sqlite_url))) as anon:
        assert anon.get("/jobs").status_code == 200


# ----------------------------------------------------------------------------- submission


def test_classify_submit_get_and_paging(
    client: TestClient, root: Path, sessions: sessionmaker[Session]
) -> None:
    model_id = _model(sessions)
    folder = _images(root, 3)
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
    _model(sessions)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "a.png").write_bytes(b"x")
    (secret / "list.txt").write_text(str(root / "x.png"))
    cases = [
        [str(secret / "a.png")],
        [str(root / ".." / "secret" / "a.png")],
        [str(secret / "*.png")],
        [f"@{secret / 'list.txt'}"],
        [str(_images(root, 1)), str(secret)],
    ]
    for inputs in cases:
        response = client.post("/jobs/classify", json={"inputs": inputs})
        assert response.status_code == 403, (inputs, response.text)
        assert "outside the allowed data roots" in response.json()["detail"]
    (root / "data").mkdir()
    assert client.post("/jobs/train", json={"data": str(secret)}).status_code == 403
    assert client.post("/jobs/evaluate",
                       json={"model_version_id": 1, "data": str(secret)}).status_code == 403
    assert _job_count(sessions) == 0
    with sessions() as s:
        assert all(j.kind == JobKind.TRAIN for j in repository.list_jobs(s))


def test_too_many_inputs_is_413(
    client: TestClient, root: Path, sessions: sessionmaker[Session], settings: Settings
) -> None:
    _model(sessions)
    # More entries than max_paths_per_job (5): refused before any expansion.
    response = client.post("/jobs/classify", json={"inputs": [str(root / "a.png")] * 6})
    assert response.status_code == 413
    # A folder expanding beyond the limit.
    response = client.post("/jobs/classify", json={"inputs": [str(_images(root, 6))]})
    assert response.status_code == 413
    assert "at most 5" in response.json()["detail"]
    # A body far beyond the byte budget is refused before it is parsed.
    huge = "x" * (70 * 1024 + 5 * 1024)
    response = client.post("/jobs/classify", content=huge,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert _job_count(sessions) == 0


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
    model_id = _model(sessions, promote=False)
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
    _model(sessions)
    job_id = client.post("/jobs/classify", json={"inputs": [str(_images(root, 2))]}).json()["id"]
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"


# ----------------------------------------------------------------------------- results


def test_predictions_paging_and_csv(
    client: TestClient, root: Path, sessions: sessionmaker[Session]
) -> None:
    _model(sessions)
    job_id = client.post("/jobs/classify", json={"inputs": [str(_images(root, 5))]}).json()["id"]
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
    model_id = _model(sessions)  # its checkpoint_path is /m/best.pt
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


# ----------------------------------------------------------------------------- models, health


def test_models_promote_rollback(client: TestClient, sessions: sessionmaker[Session]) -> None:
    assert client.post("/models/rollback").status_code == 409
    first = _model(sessions, promote=False)
    second = _model(sessions, promote=False)
    assert [m["id"] for m in client.get("/models").json()] == [second, first]
    assert client.post(f"/models/{first}/promote").json()["stage"] == "production"
    assert client.post(f"/models/{second}/promote").json()["stage"] == "production"
    assert client.get(f"/models/{first}").json()["stage"] == "archived"
    restored = client.post("/models/rollback")
    assert restored.status_code == 200 and restored.json()["id"] == first
    assert client.post("/models/rollback").status_code in (200, 409)


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": True, "broker": True}


@pytest.mark.services
def test_health_reports_unreachable_broker_and_redis_ok(
    tmp_path: Path, root: Path, sqlite_url: str
) -> None:
    upgrade(sqlite_url)
    down = _settings(tmp_path, root, sqlite_url, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(down)) as c:
        response = c.get("/health")
        assert response.status_code == 503
        assert response.json() == {"status": "degraded", "database": True, "broker": False}
    up = _settings(tmp_path, root, sqlite_url, broker_url="redis://127.0.0.1:6379/15")
    with TestClient(create_app(up)) as c:
        assert c.get("/health").json()["broker"] is True


@pytest.mark.services
def test_classify_on_postgresql(tmp_path: Path, root: Path, postgres_url: str) -> None:
    upgrade(postgres_url)
    settings = _settings(tmp_path, root, postgres_url)
    engine = make_engine(postgres_url)
    try:
        _model(make_session_factory(engine))
        with TestClient(create_app(settings)) as c:
            folder = _images(root, 3)
            job_id = c.post("/jobs/classify", json={"inputs": [str(folder)]}).json()["id"]
            assert c.get(f"/jobs/{job_id}").json()["progress_total"] == 3
            # Out-of-range ids and NUL bytes must not reach PostgreSQL (they would be 500s).
            assert c.get(f"/jobs/{2**31}").status_code == 422
            assert c.post("/jobs/classify", json={"inputs": ["\u0000"]}).status_code == 422
    finally:
        engine.dispose()


@pytest.mark.services
def test_pool_exhausted_is_503_with_retry_after(
    tmp_path: Path, root: Path, postgres_url: str
) -> None:
    """Every pooled connection held by requests stuck behind a table lock: the next request
    waits settings.api_db_pool_timeout, then gets 503 + Retry-After (not a 500, not an
    unbounded wait); the stuck ones complete once the lock goes."""
    import threading

    from sqlalchemy import text

    upgrade(postgres_url)
    settings = _settings(tmp_path, root, postgres_url, api_db_pool_size=1,
                         api_db_pool_timeout=0.5)
    locker = make_engine(postgres_url)
    results: dict[str, Any] = {}
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as c:
            assert c.get("/jobs").status_code == 200
            lock = locker.connect()
            transaction = lock.begin()
            lock.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))

            def get(name: str, url: str) -> None:
                results[name] = c.get(url)

            # pool_size 1 + overflow 1: two requests take both connections and wait.
            stuck = [threading.Thread(target=get, args=(f"stuck{i}", "/jobs")) for i in (0, 1)]
            for thread in stuck:
                thread.start()

            def waiting_on_lock() -> int:
                with locker.connect() as conn:
                    return int(conn.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )).scalar_one())

            deadline = time.monotonic() + 60
            while waiting_on_lock() < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert waiting_on_lock() == 2
            third = threading.Thread(target=get, args=("third", "/jobs/1"))
            third.start()
            third.join(timeout=60)  # liveness bound: the old pool waited behind the lock
            answered = not third.is_alive()
            transaction.commit()
            lock.close()
            for thread in [*stuck, third]:
                thread.join(timeout=60)
        assert answered, "the request found no connection and did not get an answer"
        response = results["third"]
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert "database busy" in response.json()["detail"]
        assert [results[f"stuck{i}"].status_code for i in (0, 1)] == [200, 200]
    finally:
        locker.dispose()


def test_model_out_has_calibration_fields(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    legacy = _model(sessions, promote=False)
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
