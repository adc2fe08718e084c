"""The settings a worker Celery app carries (``app.conf.mriq_settings``) and the job folder
derived from them.

Its own module so that task modules and bootsteps read them without importing
``worker.app``, which imports them (that was an import cycle).
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from scheduler.settings import Settings


def attach_settings(app: Celery, settings: Settings) -> None:
    """Give ``app`` the settings its tasks use (never the environment)."""
    app.conf.mriq_settings = settings


def settings_of(app: Celery) -> Settings:
    """The settings a worker app was built with."""
    settings = getattr(app.conf, "mriq_settings", None)
    if not isinstance(settings, Settings):
        raise RuntimeError("Celery app has no mriq_settings; build it with create_celery_app()")
    return settings


def job_dir(settings: Settings, job_id: int) -> Path:
    """The folder of a job's files (checkpoints, reports, heartbeat, chunk state)."""
    return settings.jobs_dir / str(job_id)
