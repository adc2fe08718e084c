"""Celery beat schedule: periodic retraining from ``settings.retrain_cron`` (off by default).

Beat only *sends* ``mriq.retrain`` (to the cpu queue); the task itself decides whether to
submit a training job (see ``worker.tasks.periodic.retrain``). Run it embedded with
``python -m worker --beat`` or separately with ``celery -A worker.app beat``; exactly one
beat per deployment, or the retraining is triggered once per beat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.schedules import ParseException, crontab

from scheduler.dispatch import CPU_QUEUE, RETRAIN_TASK

if TYPE_CHECKING:
    from scheduler.settings import Settings

RETRAIN_ENTRY = "mriq-retrain"


class InvalidCronError(ValueError):
    """``retrain_cron`` is not a five-field crontab expression."""


def parse_cron(expr: str) -> crontab:
    """``"m h dom mon dow"`` -> :class:`celery.schedules.crontab` (UTC, like the app)."""
    fields = expr.split()
    if len(fields) != 5:
        raise InvalidCronError(
            f"retrain_cron {expr!r}: expected 5 fields 'minute hour day-of-month month "
            f"day-of-week', got {len(fields)}"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except (ValueError, ParseException) as exc:
        raise InvalidCronError(f"retrain_cron {expr!r}: {exc}") from None


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat schedule for ``settings``: empty when ``retrain_cron`` is unset."""
    expr = settings.retrain_cron
    if expr is None or not expr.strip():
        return {}
    return {
        RETRAIN_ENTRY: {
            "task": RETRAIN_TASK,
            "schedule": parse_cron(expr),
            "options": {"queue": CPU_QUEUE},
        }
    }
