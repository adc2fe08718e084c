"""Fixtures of the CLI tests: a real SQLite database and the embedded filesystem broker.

No worker runs here: ``--wait`` is exercised on jobs that are already finished, so no
embedded worker is started.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler.database import make_engine, make_session_factory, upgrade


@pytest.fixture
def env(
    tmp_path: Path, root: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    # Run from tmp so no ./.env of the developer leaks into the settings.
    monkeypatch.chdir(tmp_path)
    return {
        "MRIQ_DATA_DIR": str(tmp_path / "state"),
        "MRIQ_DATABASE_URL": sqlite_url,
        "MRIQ_DATA_ROOTS": str(root),
        "MRIQ_CHUNK_SIZE": "2",
    }


@pytest.fixture
def sessions(env: dict[str, str]) -> Iterator[sessionmaker[Session]]:
    upgrade(env["MRIQ_DATABASE_URL"])
    engine = make_engine(env["MRIQ_DATABASE_URL"])
    yield make_session_factory(engine)
    engine.dispose()


#: The CLI tests' own Redis database (worker tests use 13, end-to-end tests 12).
REDIS_DB = 11


@pytest.fixture
def redis_broker() -> Iterator[str]:
    """A real Redis broker URL (``MRIQ_TEST_REDIS_PORT``), its database emptied around."""
    import os

    import redis

    port = int(os.environ.get("MRIQ_TEST_REDIS_PORT", "6379"))
    client = redis.Redis(host="127.0.0.1", port=port, db=REDIS_DB)
    client.flushdb()
    try:
        yield f"redis://127.0.0.1:{port}/{REDIS_DB}"
    finally:
        client.flushdb()
        client.close()
