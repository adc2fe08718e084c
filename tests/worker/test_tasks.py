"""worker.tasks: every task registered under the name the scheduler sends, with its limits."""

from __future__ import annotations

from pathlib import Path

from scheduler.dispatch import (
    CLASSIFY_CHUNK_TASK,
    EXPLAIN_TASK,
    EXPORT_TASK,
    TASK_QUEUE_OF,
    TRAIN_TASK,
)
from tests.worker.conftest import make_settings
from worker.app import create_celery_app
from worker.tasks.classify import retry_countdown


def test_tasks_are_registered_by_name_with_their_limits(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url="sqlite://", broker_url=None)
    settings = settings.model_copy(update={"chunk_time_limit": 123, "train_time_limit": 456})
    app = create_celery_app(settings)
    names = {n for n in app.tasks if n.startswith("mriq.")}
    # Every task the scheduler sends (and routes) is registered, and nothing else.
    assert names == set(TASK_QUEUE_OF)
    # The on-demand explanation goes where the classify chunks go (the model's device).
    routes = app.conf.task_routes
    assert routes[EXPLAIN_TASK] == routes[CLASSIFY_CHUNK_TASK]
    assert app.tasks[EXPLAIN_TASK].max_retries == 0
    assert routes[EXPORT_TASK] == routes[TRAIN_TASK] and app.tasks[EXPORT_TASK].max_retries == 0
    chunk = app.tasks[CLASSIFY_CHUNK_TASK]
    assert chunk.time_limit == 123 and chunk.max_retries is None and chunk.acks_late
    assert app.tasks[TRAIN_TASK].time_limit == 456
    assert app.tasks[TRAIN_TASK].max_retries == 0
    # Registered on this app only: another app's settings are not mixed in.
    plain = create_celery_app(make_settings(tmp_path, database_url="sqlite://", broker_url=None))
    assert plain.tasks[CLASSIFY_CHUNK_TASK].time_limit != 123


def test_retry_backoff_doubles_up_to_its_cap() -> None:
    assert [retry_countdown(r) for r in range(3)] == [2.0, 4.0, 8.0]
    assert retry_countdown(30) == 120.0
