"""Database sessions of a worker process: one session factory per (process, URL), and
:func:`with_session`, a transaction that rides out a database outage.

Keyed by process id: a prefork child must never reuse the parent's connections (two
processes on one socket corrupt the protocol); the parent's pool is simply not used, not
disposed, because closing inherited sockets would close the parent's too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from scheduler.database import make_engine, make_session_factory, run_in_transaction

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from scheduler.settings import Settings

T = TypeVar("T")

#: DB transactions are retried on connection errors with exponential backoff capped at
#: DB_RETRY_MAX_DELAY_S, for ``settings.db_outage_limit`` seconds (a restart takes seconds,
#: a failover or maintenance minutes). Best-effort callers pass a small ``attempts`` instead.
DB_RETRY_BASE_DELAY_S = 0.5
DB_RETRY_MAX_DELAY_S = 15.0

_lock = threading.Lock()
_factories: dict[tuple[int, str], sessionmaker[Session]] = {}


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """This process's session factory for ``settings.resolved_database_url`` (made once)."""
    import os

    url = settings.resolved_database_url
    key = (os.getpid(), url)
    factory = _factories.get(key)
    if factory is not None:
        return factory
    with _lock:
        factory = _factories.get(key)
        if factory is None:
            factory = make_session_factory(make_engine(url))
            _factories[key] = factory
    return factory


def with_session(
    settings: Settings,
    fn: Callable[[Session], T],
    *,
    attempts: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``fn`` in one transaction, re-running it on connection errors with backoff.

    A database outage mid-job must not fail the job, so the whole transaction is retried
    (``scheduler.database.run_in_transaction``: lost/refused connections, locked SQLite) for
    up to ``settings.db_outage_limit`` seconds, the task waiting meanwhile; with ``attempts``
    (a heartbeat, a best-effort note) only that many times. ``fn`` must be safe to run again:
    repository writes are idempotent by contract, and a commit whose acknowledgement was lost
    may have happened. Return plain values (ids, tuples) where you can; ORM objects come back
    detached.
    """
    return run_in_transaction(
        session_factory(settings),
        fn,
        attempts=attempts,
        give_up_after=None if attempts is not None else settings.db_outage_limit,
        base_delay=DB_RETRY_BASE_DELAY_S,
        max_delay=DB_RETRY_MAX_DELAY_S,
        sleep=sleep,
    )
