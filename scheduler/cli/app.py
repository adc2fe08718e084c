"""The Typer tree of ``mriq``: the root app and its groups, the root callback that reads the
settings, the :class:`Runtime` handed to every command, and the mapping of known errors to a
one-line message and an exit status (1 runtime, 2 refused input) without a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from scheduler import submission
from scheduler.cli.render import stderr_console
from scheduler.cli.review import review_app
from scheduler.paths import InvalidPathError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from scheduler.dispatch import Dispatcher
    from scheduler.settings import Settings


class CliError(Exception):
    """A failure with a message for the user; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def error_exit_code(exc: BaseException) -> tuple[int, str] | None:
    """Map known exceptions to (exit code, message); None for unknown ones."""
    from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, submission.SubmissionError | InvalidPathError):
        return 2, str(exc)
    name = type(exc).__name__
    if name in ("DatabaseNotMigratedError", "NotFoundError", "NoRollbackTargetError") or isinstance(
        exc, submission.DispatchError
    ):
        return 1, str(exc)
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        # The server is down, unreachable or refusing: say so, in the driver's own words
        # (psycopg names the host and port), on one line.
        cause = getattr(exc, "orig", None) or exc
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        return 1, f"database unavailable: {lines[0] if lines else type(cause).__name__}"
    if isinstance(exc, SQLAlchemyError):
        return 1, f"database error: {exc.__class__.__name__}: {str(exc).splitlines()[0]}"
    if isinstance(exc, ValueError | OSError):
        return 1, str(exc)
    return None


class _Group(TyperGroup):
    """Root group that turns known exceptions into a message and an exit status."""

    # ``ctx`` is typer's vendored click Context (a private module), hence Any.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            # Typer's own usage errors/exits (Exit and Abort are RuntimeErrors in typer 0.29,
            # so they must be let through before the generic handler below).
            raise
        except KeyboardInterrupt:
            stderr_console().print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:
            mapped = error_exit_code(exc)
            if mapped is None:
                # Still no traceback for users; the type name helps a bug report.
                mapped = (1, f"unexpected {type(exc).__name__}: {exc}")
            code, message = mapped
            # soft_wrap: keep the message on one line so it can be grepped from logs.
            stderr_console().print(
                f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code) from None


app = typer.Typer(
    name="mriq",
    cls=_Group,
    help="Train, evaluate and serve CNN classifiers for brain MRI slices as batch jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# The groups live here, not in their command modules, so --help lists them in this order
# whatever order those modules are imported in.
jobs_app = typer.Typer(help="List, inspect, wait for and cancel jobs.", no_args_is_help=True)
models_app = typer.Typer(help="List model versions, promote one to production, roll back.",
                         no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(review_app, name="review")


@dataclass
class Runtime:
    """Settings -> engine, sessions, dispatcher, each created on first use."""

    settings: Settings
    _engine: Engine | None = field(default=None, init=False)
    _sessions: sessionmaker[Session] | None = field(default=None, init=False)
    _dispatcher: Dispatcher | None = field(default=None, init=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from scheduler.database import make_engine

            self._engine = make_engine(self.settings.resolved_database_url)
        return self._engine

    def sessions(self) -> sessionmaker[Session]:
        """The session factory, after checking the schema is at the latest revision."""
        if self._sessions is None:
            from scheduler.database import ensure_migrated, make_session_factory

            ensure_migrated(self.engine)
            self._sessions = make_session_factory(self.engine)
        return self._sessions

    def check_migrated(self) -> None:
        self.sessions()

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            from scheduler.dispatch import Dispatcher

            self._dispatcher = Dispatcher(self.settings)
        return self._dispatcher

    def close(self) -> None:
        if self._dispatcher is not None:
            with contextlib.suppress(Exception):
                self._dispatcher.close()
        if self._engine is not None:
            self._engine.dispose()


def runtime(ctx: typer.Context) -> Runtime:
    """The :class:`Runtime` the root callback put on the context."""
    obj = ctx.find_root().obj
    assert isinstance(obj, Runtime), "root callback did not run"
    return obj


@app.callback()
def _root(ctx: typer.Context) -> None:
    """Settings come from MRIQ_* environment variables (see docs); defaults need no server:
    SQLite and a filesystem broker under ./mriq-data."""
    from pydantic import ValidationError

    from scheduler.settings import load_settings

    try:
        settings = load_settings()
    except ValidationError as exc:
        raise CliError(f"invalid MRIQ_* settings: {exc}", code=2) from None
    _configure_logging(settings.log_level)
    rt = Runtime(settings)
    ctx.obj = rt
    ctx.call_on_close(rt.close)


def _configure_logging(level: str) -> None:
    """Library logs (SQLAlchemy, Celery, ...) to stderr at MRIQ_LOG_LEVEL; stdout stays for
    tables and JSON. Settings are never logged (secrets are SecretStr, URLs masked in repr)."""
    root = logging.getLogger()
    if not root.handlers:  # an embedding process (tests, uvicorn) configured its own
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    if logging.getLevelName(level.upper()) != logging.DEBUG:
        # Alembic narrates every plugin and migration step at INFO, and kombu warns that the
        # filesystem transport has no hostname (it needs none): noise around the CLI's own
        # output unless someone asked for DEBUG.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``mriq``)."""
    app(args=list(argv) if argv is not None else None, prog_name="mriq")
