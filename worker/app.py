"""The consuming Celery app: :func:`scheduler.dispatch.make_celery` plus mriq's task code.

``celery -A worker.app worker|flower|inspect ...`` needs a module-level ``app``; it is built on
first attribute access (PEP 562 ``__getattr__``) from ``load_settings()``, so importing this
module reads no environment. Tasks get their settings from ``worker.appsettings.settings_of``
(``app.conf.mriq_settings``), never from the environment, which lets tests and
``python -m worker`` pass explicit settings.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from celery import Celery

from scheduler.dispatch import make_celery
from worker.appsettings import attach_settings

if TYPE_CHECKING:
    from scheduler.settings import Settings

#: Seconds a freshly forked prefork child may take to start (Celery's default is 4).
PROC_ALIVE_TIMEOUT_S = 120.0

_lock = threading.Lock()
_app: Celery | None = None


def create_celery_app(settings: Settings) -> Celery:
    """A worker-side app: routes/acks identical to the producer's, tasks registered."""
    app = make_celery(settings, main="mriq")
    attach_settings(app, settings)
    # A prefork child imports torch and the inference stack in worker_process_init (see
    # worker/runtime.py); on a busy host that takes longer than Celery's default 4 s, after
    # which the parent kills the child and forks another one, forever.
    app.conf.worker_proc_alive_timeout = PROC_ALIVE_TIMEOUT_S
    app.conf.include = ["worker.tasks"]
    # The periodic retraining schedule (off unless settings.retrain_cron is set); only used
    # when beat runs (``python -m worker --beat`` or ``celery -A worker.app beat``).
    from worker.beat import beat_schedule

    app.conf.beat_schedule = dict(beat_schedule(settings))
    # Tasks are registered on *this* app (no shared_task), so several apps with different
    # settings can coexist in one process (tests); the bootsteps set up threads/allocator
    # state and, on the embedded broker, the janitor that deletes consumed message files.
    from worker import runtime, tasks

    tasks.register(app)
    runtime.install_bootsteps(app)
    return app


def __getattr__(name: str) -> Any:
    # PEP 562: ``worker.app.app`` (what ``celery -A worker.app`` looks up) is created here
    # on first use; reading settings at import time would break "no env reads at import".
    global _app
    if name in ("app", "celery"):
        with _lock:
            if _app is None:
                from scheduler.settings import load_settings

                _app = create_celery_app(load_settings())
            return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
