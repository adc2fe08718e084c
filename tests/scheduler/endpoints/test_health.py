"""scheduler.endpoints.health: database and broker reachability.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from scheduler.api import create_app
from scheduler.database import upgrade
from tests.scheduler.api_factories import (
    api_settings,
)


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": True, "broker": True}


@pytest.mark.services
def test_health_reports_unreachable_broker_and_redis_ok(
    tmp_path: Path, root: Path, sqlite_url: str
) -> None:
    upgrade(sqlite_url)
    down = api_settings(tmp_path, root, sqlite_url, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(down)) as c:
        response = c.get("/health")
        assert response.status_code == 503
        assert response.json() == {"status": "degraded", "database": True, "broker": False}
    up = api_settings(tmp_path, root, sqlite_url, broker_url="redis://127.0.0.1:6379/15")
    with TestClient(create_app(up)) as c:
        assert c.get("/health").json()["broker"] is True
