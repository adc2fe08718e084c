"""``mriq worker|api|flower`` and ``mriq db upgrade``: run the services of a deployment.

``worker`` and ``flower`` replace this process (exec) so signals from a supervisor reach the
service itself; ``api`` runs uvicorn in-process.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import typer
from rich.markup import escape

from scheduler.cli.app import CliError, app, db_app, runtime
from scheduler.cli.render import stderr_console

# Replaced in tests: exec'ing would replace the test process.
# list, not Sequence: execve takes a tuple or a list of str, not any sequence.
replace_process: Callable[[str, list[str], dict[str, str]], NoReturn] = os.execve


@app.command()
def worker(
    ctx: typer.Context,
    queues: str = typer.Option("gpu,cpu", help="Comma-separated queues to consume."),
    concurrency: int = typer.Option(1, min=1, max=64, help="Tasks run at once."),
    pool: str | None = typer.Option(
        None, help="solo, threads or prefork (default: threads, which keeps answering "
        "ping, revoke and Flower while a long task runs)."
    ),
    hostname: str | None = typer.Option(
        None, help="Worker node name, e.g. gpu@%h (default: mriq-<pid>@<host>)."
    ),
) -> None:
    """Run a worker (replaces this process with `python -m worker`)."""
    rt = runtime(ctx)
    rt.check_migrated()
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise CliError("--queues: give at least one queue (gpu, cpu)", code=2)
    if pool is None:
        # threads, as `python -m worker` defaults to: with solo the task runs on the
        # consumer's thread, so a busy worker misses pings (and `--wait` clients, Flower and
        # revokes see no worker) until the task returns.
        pool = "threads"
    if pool not in ("solo", "threads", "prefork"):
        raise CliError(f"--pool: {pool!r} is not one of solo, threads, prefork", code=2)
    if pool == "solo" and concurrency != 1:
        raise CliError("--pool solo runs one task at a time; use threads or prefork", code=2)
    argv = [sys.executable, "-m", "worker", "--queues", ",".join(names),
            "--concurrency", str(concurrency), "--pool", pool]
    if hostname:
        argv += ["--hostname", hostname]
    rt.close()
    sys.stdout.flush()
    sys.stderr.flush()
    replace_process(sys.executable, argv, dict(os.environ))


@app.command()
def api(
    ctx: typer.Context,
    host: str | None = typer.Option(
        None, help="Interface to bind (default settings.api_host; 0.0.0.0 in containers)."
    ),
    port: int | None = typer.Option(
        None, min=1, max=65535, help="Port (default settings.api_port)."
    ),
    insecure: bool = typer.Option(
        False, "--insecure",
        help="Serve on a non-loopback address without MRIQ_API_TOKEN (anyone who can reach "
        "the port can submit jobs and read results).",
    ),
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    rt = runtime(ctx)
    settings = rt.settings
    bind = host or settings.api_host
    if settings.api_token is None and not is_loopback(bind):
        if not insecure:
            raise CliError(
                f"refusing to serve on {bind} without a token: set MRIQ_API_TOKEN (or "
                "MRIQ_API_TOKEN_FILE), bind to 127.0.0.1, or pass --insecure", code=2
            )
        stderr_console().print(f"[yellow]warning:[/] serving on {escape(bind)} without a token "
                               "(--insecure): anyone who reaches the port controls the jobs",
                               highlight=False)
    import uvicorn

    from scheduler.api import create_app

    rt.check_migrated()
    uvicorn.run(
        create_app(settings),
        host=bind,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
    )


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost); any
    other name or address (0.0.0.0, ::, a hostname) may be reachable from outside."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@app.command()
def flower(
    ctx: typer.Context,
    port: int = typer.Option(5555, min=1, max=65535),
    address: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 in containers)."),
) -> None:
    """Run the Flower monitoring UI (`celery -A worker.app flower`).

    Basic auth comes from MRIQ_FLOWER_BASIC_AUTH (user:password[,user2:password2]). Without it
    the UI and API are open (FLOWER_UNAUTHENTICATED_API is then set, as Flower 2 requires).
    Flower's /metrics and /healthcheck stay unauthenticated either way.
    """
    rt = runtime(ctx)
    env = dict(os.environ)
    secret = rt.settings.flower_basic_auth
    auth = secret.get_secret_value() if secret is not None else ""
    if auth:
        # Via the environment, not argv: argv is visible to every user in `ps`.
        env["FLOWER_BASIC_AUTH"] = auth
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
    else:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
        stderr_console().print(
            "[yellow]warning:[/] MRIQ_FLOWER_BASIC_AUTH is not set: Flower runs without "
            "authentication"
        )
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "flower",
            f"--port={port}", f"--address={address}"]
    rt.close()
    sys.stdout.flush()
    sys.stderr.flush()
    replace_process(sys.executable, argv, env)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the database schema to the latest revision."""
    from scheduler.database import upgrade

    rt = runtime(ctx)
    upgrade(rt.settings.resolved_database_url)
    stderr_console().print(
        f"database {_redacted(rt.settings.resolved_database_url)} is up to date", highlight=False
    )
