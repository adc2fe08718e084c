"""scheduler.endpoints.deps: the process's shared objects behind the routers' dependencies.

Real SQLite database and the embedded filesystem broker (no worker, no network).
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient

from scheduler.api import create_app
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.dispatch import Dispatcher
from scheduler.endpoints.deps import ApiState
from scheduler.settings import Settings


def _settings(tmp_path: Path, sqlite_url: str) -> Settings:
    upgrade(sqlite_url)
    return Settings(data_dir=tmp_path / "state", database_url=sqlite_url, data_roots=(tmp_path,))


def test_concurrent_requests_share_one_dispatcher(tmp_path: Path, sqlite_url: str) -> None:
    settings = _settings(tmp_path, sqlite_url)
    engine = make_engine(sqlite_url)
    state = ApiState(settings=settings, engine=engine, sessions=make_session_factory(engine))
    got: list[Dispatcher] = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        got.append(state.dispatcher())

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(got) == 8
        assert all(d is got[0] for d in got), "each racing request built its own Celery app"
        assert isinstance(got[0], Dispatcher)
    finally:
        state.close()


def test_app_state_holds_the_settings_it_was_built_with(tmp_path: Path, sqlite_url: str) -> None:
    settings = _settings(tmp_path, sqlite_url)
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/openapi.json").status_code == 200
        state = app.state.mriq
        assert isinstance(state, ApiState)
        assert state.settings is settings
        first = state.dispatcher()
        # A route taking DispatcherDep (cancel) runs against the same state: unknown job 404.
        assert client.post("/jobs/1/cancel").status_code == 404
        assert state.dispatcher() is first
