"""Engines, sessions, migrations and write retries for the control-plane database.

- :func:`make_engine` applies the per-database settings mriq relies on (SQLite: WAL, foreign
  keys, busy timeout, ``BEGIN IMMEDIATE`` transactions; PostgreSQL: psycopg 3, pre-ping).
- :func:`upgrade` runs the Alembic migrations shipped inside the package; no ``alembic.ini`` or
  particular working directory is needed (:func:`alembic_config` builds the config in code).
- :func:`ensure_migrated` is called by every entry point before it touches the tables.
- :func:`run_in_transaction` / :func:`retrying` re-run a whole transaction when the connection
  is lost (e.g. PostgreSQL restarted mid-job); repository writes are idempotent, so a retry
  after a commit whose acknowledgement was lost is harmless.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "MIGRATIONS_DIR",
    "READ_ONLY",
    "DatabaseNotMigratedError",
    "alembic_config",
    "current_revision",
    "ensure_migrated",
    "head_revision",
    "is_retryable",
    "make_engine",
    "make_session_factory",
    "mask_url",
    "normalize_url",
    "retrying",
    "run_in_transaction",
    "upgrade",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The Alembic script directory shipped inside the package.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Milliseconds a SQLite connection waits for another writer before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000

#: Execution options for a long *read-only* transaction, e.g. streaming a CSV export:
#: ``session.connection(execution_options=READ_ONLY)`` before the first query. On SQLite the
#: transaction then starts DEFERRED and never holds the write lock (workers keep writing);
#: other databases ignore the option.
READ_ONLY: dict[str, Any] = {"sqlite_begin": "DEFERRED"}


class DatabaseNotMigratedError(RuntimeError):
    """The database schema is missing or older/newer than this code's migrations."""

    def __init__(self, url: str, current: str | None, head: str) -> None:
        self.url = url
        self.current = current
        self.head = head
        super().__init__(
            f"database at {url} is not migrated (at {current or 'no revision'}, need {head}): "
            "run `mriq db upgrade`"
        )


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; a bare ``postgresql://`` (or ``postgres://``) gets psycopg 3,
    which is the driver mriq installs (SQLAlchemy's default would be psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def mask_url(url: str | URL) -> str:
    """The URL as a string with its password replaced by ``***`` (safe for messages/logs)."""
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine with mriq's settings for SQLite or PostgreSQL.

    SQLite: the file's folder is created; WAL (readers never block the writer),
    ``foreign_keys=ON`` (off by default in SQLite), a busy timeout, ``check_same_thread=False``
    (the API hands connections between threads) and ``BEGIN IMMEDIATE`` for every transaction:
    a transaction that reads and then writes would otherwise fail with "database is locked"
    when another writer got in between, instead of waiting its turn. (So keep sessions short;
    a long read-only stream should use :data:`READ_ONLY`.)
    PostgreSQL: ``pool_pre_ping`` so connections broken by a server restart are replaced.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_file(parsed)
        if path is not None:
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine, wal=path is not None)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **kwargs)


def _install_sqlite_hooks(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would BEGIN lazily, only
        # before DML) so the "begin" hook below decides how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL is durable against application crashes, and much faster.
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if mode not in ("IMMEDIATE", "DEFERRED"):
            raise ValueError(f"sqlite_begin must be IMMEDIATE or DEFERRED, got {mode!r}")
        connection.exec_driver_sql(f"BEGIN {mode}")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (``expire_on_commit=False``), so the
    API/CLI can serialise rows returned by the repository after the transaction ended."""
    return sessionmaker(bind=engine, expire_on_commit=False)


# --------------------------------------------------------------------------- migrations


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolates "%", which URL-encoded passwords contain.
        rendered = normalize_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships a revision
        raise RuntimeError(f"no Alembic revisions found in {MIGRATIONS_DIR}")
    return head


def upgrade(url: str | URL | Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (default: the latest). Safe to run repeatedly."""
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            # env.py uses this connection instead of creating its own engine.
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        if not isinstance(url, Engine):
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_migrated(engine: Engine) -> None:
    """Raise :class:`DatabaseNotMigratedError` unless the database is at the head revision."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        raise DatabaseNotMigratedError(mask_url(engine.url), current, head)


# --------------------------------------------------------------------------- retries


def is_retryable(exc: BaseException) -> bool:
    """True for errors where re-running the whole transaction can succeed: a lost or refused
    connection (PostgreSQL restart, network blip) or a locked SQLite database. Integrity and
    programming errors are not retried."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        return True
    # Bulk paths that use the driver directly (COPY in scheduler.repository) see psycopg's
    # own exceptions, not SQLAlchemy's wrappers: a lost connection or a full disk there is
    # just as transient.
    try:
        import psycopg
    except ImportError:  # pragma: no cover (psycopg is a dependency)
        return False
    return isinstance(exc, psycopg.OperationalError)


def retrying(
    fn: Callable[[], T],
    *,
    attempts: int | None = 6,
    base_delay: float = 0.5,
    max_delay: float = 15.0,
    give_up_after: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] | None = None,
) -> T:
    """Call ``fn()``; on a retryable database error call it again with exponential backoff
    (jittered; 0.5 s, 1 s, 2 s, ... capped at ``max_delay``), at most ``attempts`` times and,
    with ``give_up_after``, for at most that many seconds after the first failure (then
    ``attempts=None`` means no count limit: the outage's duration is what bounds it).

    ``fn`` must run a *whole* transaction (open a session, do the writes, commit), because a
    transaction interrupted by a lost connection is gone; see :func:`run_in_transaction`.
    """
    if attempts is None and give_up_after is None:
        raise ValueError("retrying needs attempts or give_up_after")
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    now_of = clock or time.monotonic
    first_failure: float | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            now = now_of()
            first_failure = now if first_failure is None else first_failure
            delay = min(max_delay, base_delay * 2 ** min(attempt - 1, 30))
            delay *= random.uniform(0.8, 1.2)
            out_of_attempts = attempts is not None and attempt >= attempts
            out_of_time = give_up_after is not None and now - first_failure >= give_up_after
            if out_of_attempts or out_of_time:
                raise
            if give_up_after is not None:
                # Never sleep past the deadline: the last try comes right at it.
                delay = max(0.0, min(delay, first_failure + give_up_after - now))
            limit = f"of {attempts}" if attempts is not None else f"within {give_up_after:.0f}s"
            # The first line says why (refused, shutting down, disk full); the SQL and its
            # parameters, on the lines after it, stay out of the log.
            first_line = (str(exc).splitlines() or [""])[0][:300]
            log.warning(
                "database error (attempt %d %s), retrying in %.1fs: %s: %s",
                attempt,
                limit,
                delay,
                exc.__class__.__name__,
                first_line,
            )
            sleep(delay)


def run_in_transaction(
    session_factory: sessionmaker[Session],
    fn: Callable[[Session], T],
    *,
    attempts: int | None = 6,
    base_delay: float = 0.5,
    max_delay: float = 15.0,
    give_up_after: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``fn(session)`` in its own committed transaction, retrying lost connections.

    The retry bounds are :func:`retrying`'s: ``attempts`` and/or ``give_up_after`` seconds
    (the worker's ``worker.sessions.with_session`` passes its ``db_outage_limit`` there).

    Example::

        added = run_in_transaction(sf, lambda s: repository.record_predictions(s, job_id, recs))

    Returned ORM objects are detached but keep their loaded attributes.
    """

    def once() -> T:
        with session_factory() as session, session.begin():
            return fn(session)

    return retrying(
        once,
        attempts=attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        give_up_after=give_up_after,
        sleep=sleep,
    )
