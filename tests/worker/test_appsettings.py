"""worker.appsettings: the settings a worker app carries and the job folder from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from tests.worker.conftest import make_settings
from worker.app import create_celery_app
from worker.appsettings import job_dir, settings_of


def test_settings_of_returns_what_the_app_was_built_with(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url="sqlite://", broker_url=None)
    assert settings_of(create_celery_app(settings)) is settings
    with pytest.raises(RuntimeError, match="create_celery_app"):
        settings_of(Celery("bare"))


def test_job_dir_is_under_the_settings_jobs_dir(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url="sqlite://", broker_url=None)
    assert job_dir(settings, 7) == (tmp_path / "data").resolve() / "jobs" / "7"
