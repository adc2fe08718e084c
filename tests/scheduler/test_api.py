"""The app as a whole (:func:`scheduler.api.create_app`) on a real SQLite database and the
embedded filesystem broker (no worker): no torch, the schema check, auth (401 +
WWW-Authenticate), PostgreSQL wiring and its pool (503 + Retry-After). The routes'
behaviour is tested per router in ``tests/scheduler/endpoints/``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scheduler.api import create_app
from scheduler.database import DatabaseNotMigratedError, make_engine, make_session_factory, upgrade
from scheduler.settings import Settings
from tests.scheduler.api_factories import (
    AUTH,
    add_model,
    api_settings,
    make_images,
)

# ----------------------------------------------------------------------------- process


def test_api_and_cli_never_import_torch() -> None:
    code = "import scheduler.api, scheduler.cli, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unmigrated_database_stops_app(tmp_path: Path, root: Path) -> None:
    settings = api_settings(tmp_path, root, f"sqlite:///{tmp_path / 'fresh.db'}")
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
    with TestClient(create_app(api_settings(tmp_path, root, sqlite_url))) as anon:
        assert anon.get("/jobs").status_code == 200


@pytest.mark.services
def test_classify_on_postgresql(tmp_path: Path, root: Path, postgres_url: str) -> None:
    upgrade(postgres_url)
    settings = api_settings(tmp_path, root, postgres_url)
    engine = make_engine(postgres_url)
    try:
        add_model(make_session_factory(engine))
        with TestClient(create_app(settings)) as c:
            folder = make_images(root, 3)
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
    settings = api_settings(tmp_path, root, postgres_url, api_db_pool_size=1,
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
