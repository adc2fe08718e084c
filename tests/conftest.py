"""Shared database fixtures: real SQLite files and real PostgreSQL databases, never mocks.

- ``sqlite_url``: a SQLite file in the test's tmp folder.
- ``postgres_url``: a fresh, uniquely named database on 127.0.0.1:5432 (created with
  ``CREATE DATABASE``, dropped afterwards). Nothing is skipped: if PostgreSQL is down the test
  errors (start it with ``scripts/services.sh``).
- ``db_url``: parametrized over both (test ids ``[sqlite]`` / ``[postgresql]``).
- ``engine`` / ``session_factory`` / ``session``: on ``db_url``, migrated with ``upgrade()``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from scheduler.database import make_engine, make_session_factory, upgrade

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DB = "test"


def _pg_admin() -> psycopg.Connection:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_ADMIN_DB, autocommit=True
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mriq.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    name = f"mriq_test_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _pg_admin() as conn:
            # FORCE: a test that leaked a connection must not leak the database too.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    fixture = {"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param]
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as session:
        yield session


_SERVICE_FIXTURES = frozenset({"postgres_url", "redis_broker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that reach the real PostgreSQL/Redis through a fixture are ``services`` tests
    even when only one parametrization (``db_url[postgresql]``) needs the server."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("db_url") == "postgresql"
        if on_postgres or _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
