"""mriq's Celery tasks: thin, idempotent wrappers that call ``core`` and record via ``scheduler``.

One module per job kind: ``classify`` (``mriq.classify_chunk``), ``train`` (``mriq.train``),
``evaluate`` (``mriq.evaluate``), ``explain`` (``mriq.explain``, one prediction's Grad-CAM
on demand), ``export`` (``mriq.export``, ONNX/TorchScript), ``finalize`` (``mriq.finalize``),
``periodic`` (``mriq.retrain``, ``mriq.broker_janitor``); ``common`` holds what they share.

Every task takes ids only and re-reads its state from SQL, so a redelivered or duplicated
message is harmless: ``claim_chunk`` returns only items without a prediction, predictions are
inserted with ON CONFLICT DO NOTHING, terminal jobs are left alone, training resumes from
``last.pt``. ``core`` (and so torch) is imported inside the task bodies only, which keeps a
prefork parent free of torch thread pools (see ``worker/runtime.py``).

Tasks are registered per app by :func:`register` (not ``shared_task``), so the settings each
task uses are the ones its app was built with (``worker.appsettings.settings_of``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from scheduler.dispatch import (
    BROKER_JANITOR_TASK,
    CLASSIFY_CHUNK_TASK,
    EVALUATE_TASK,
    EXPLAIN_TASK,
    EXPORT_TASK,
    FINALIZE_TASK,
    RETRAIN_TASK,
    TRAIN_TASK,
)
from worker.appsettings import settings_of
from worker.tasks.classify import classify_chunk, on_chunk_failure
from worker.tasks.common import logged
from worker.tasks.evaluate import evaluate_job
from worker.tasks.explain import explain_item
from worker.tasks.export import export_job
from worker.tasks.finalize import finalize_job
from worker.tasks.periodic import broker_janitor, retrain
from worker.tasks.train import train_job

__all__ = ["register"]


def register(app: Celery) -> None:
    """Register mriq's tasks on ``app`` under the names the scheduler sends."""
    settings = settings_of(app)

    def limit(value: int | None) -> int | None:
        # Hard limits are enforced by the prefork pool only (solo/threads cannot kill a
        # running task); visibility_timeout is validated to exceed all of them.
        return int(value) if value else None

    # shared=False: a shared task would be added to every app finalized later in this
    # process (tests build several apps with different settings).
    common: dict[str, Any] = {
        "bind": True,
        "shared": False,
        "acks_late": True,
        "reject_on_worker_lost": True,
    }
    app.task(
        name=CLASSIFY_CHUNK_TASK,
        max_retries=None,
        time_limit=limit(settings.chunk_time_limit),
        on_failure=on_chunk_failure,
        **common,
    )(logged(classify_chunk))
    app.task(
        name=TRAIN_TASK, max_retries=0, time_limit=limit(settings.train_time_limit), **common
    )(logged(train_job))
    app.task(
        name=EVALUATE_TASK, max_retries=0, time_limit=limit(settings.evaluate_time_limit), **common
    )(logged(evaluate_job))
    # No retries: a request that fails is made again by whoever asked (mriq explain).
    app.task(
        name=EXPLAIN_TASK, max_retries=0, time_limit=limit(settings.chunk_time_limit), **common
    )(logged(explain_item))
    app.task(
        name=EXPORT_TASK, max_retries=0, time_limit=limit(settings.evaluate_time_limit), **common
    )(logged(export_job))
    app.task(name=FINALIZE_TASK, max_retries=0, **common)(logged(finalize_job))
    app.task(name=RETRAIN_TASK, max_retries=0, **common)(logged(retrain))
    app.task(name=BROKER_JANITOR_TASK, max_retries=0, **common)(logged(broker_janitor))
