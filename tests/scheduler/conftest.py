"""Fixtures of the scheduler tests: the data root and a folder outside it; for the API tests
(``test_api.py``, ``endpoints/``) a migrated SQLite database, settings with a token, a session
factory and an authenticated client of the real app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from scheduler.api import create_app
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.settings import Settings
from tests.scheduler.api_factories import AUTH, TOKEN, api_settings, touch_file


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The only data root of every scheduler test; files outside it must be refused."""
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the root with one image in it: what confinement must refuse."""
    o = tmp_path / "outside"
    o.mkdir()
    touch_file(o / "secret.png")
    return o


@pytest.fixture
def settings(tmp_path: Path, root: Path, sqlite_url: str) -> Settings:
    upgrade(sqlite_url)
    return api_settings(tmp_path, root, sqlite_url, api_token=TOKEN)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=AUTH) as c:
        yield c
