"""worker.beat: the retraining schedule built from Settings, on the app beat runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.schedules import crontab

from scheduler.dispatch import CPU_QUEUE, RETRAIN_TASK
from tests.worker.conftest import make_settings
from worker.app import create_celery_app
from worker.beat import RETRAIN_ENTRY, InvalidCronError, beat_schedule, parse_cron


def test_beat_schedule(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url="sqlite://", broker_url=None)
    assert beat_schedule(settings) == {}
    on = settings.model_copy(update={"retrain_cron": "30 3 * * 0", "retrain_data_dir": tmp_path})
    schedule = beat_schedule(on)
    (entry,) = schedule.values()
    assert entry["task"] == RETRAIN_TASK
    assert entry["options"]["queue"] == CPU_QUEUE
    assert entry["schedule"] == crontab(minute="30", hour="3", day_of_week="0")


@pytest.mark.parametrize("expr", ["* * *", "61 * * * *", "x y z w v"])
def test_parse_cron_rejects(expr: str) -> None:
    with pytest.raises(InvalidCronError):
        parse_cron(expr)


def test_the_worker_app_carries_the_schedule_of_its_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url="sqlite://", broker_url=None)
    assert create_celery_app(settings).conf.beat_schedule == {}
    on = settings.model_copy(update={"retrain_cron": "0 4 1 * *", "retrain_data_dir": tmp_path})
    entry = create_celery_app(on).conf.beat_schedule[RETRAIN_ENTRY]
    assert entry["schedule"] == crontab(minute="0", hour="4", day_of_month="1")
    assert entry["task"] == RETRAIN_TASK
