"""``python -m worker``: run an mriq Celery worker.

    python -m worker [--queues gpu,cpu] [--concurrency N] [--pool threads|solo|prefork]
                     [--loglevel INFO] [--hostname NAME] [--beat]
                     [--data-dir DIR] [--database-url URL] [--broker-url URL]
                     [--heartbeat-interval S] [--dead-after S] [--stale-after S]
                     [--recovery-interval S]

Settings come from ``scheduler.settings.load_settings()`` (``MRIQ_*`` environment), with the
``--data-dir/--database-url/--broker-url`` flags as overrides, so ``mriq worker`` can spawn
this with explicit values.

Pool: ``threads`` with concurrency 1 by default. Tasks run in a pool thread while the main
thread keeps consuming control messages, so ``inspect ping`` (``Dispatcher.workers_alive``),
revokes and Flower keep working during an hours-long training; with ``solo`` the task runs
on the consumer's thread and the worker is deaf until it returns. Prefetch is 1 per
concurrency slot either way, so an idle worker is never starved by a busy one.

Recovery: every worker sweeps for chunks/jobs whose worker died at start-up and every
``--recovery-interval`` seconds and re-sends them: chunks its own previous incarnation (same
``--hostname``) held at once, chunks of a worker that no longer answers ping after
``--dead-after``, others after ``--stale-after``; see ``worker/recovery.py``. Give each
worker a stable, unique ``--hostname`` (compose: the container's) for the first rule.

Before anything else the process re-execs itself once with glibc's allocator tuned
(``MALLOC_MMAP_MAX_``/``MALLOC_TRIM_THRESHOLD_``, read only at process start; see
``worker/runtime.py``) unless they are already set or ``--no-reexec`` is given.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scheduler.dispatch import CPU_QUEUE, GPU_QUEUE

if TYPE_CHECKING:
    from scheduler.settings import Settings
    from worker.recovery import RecoveryConfig

POOLS = ("solo", "threads", "prefork")
#: Marks the re-exec'd child so a failed tuning never loops.
_REEXEC_MARK = "MRIQ_WORKER_REEXECED"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--queues",
        default=f"{GPU_QUEUE},{CPU_QUEUE}",
        help="comma-separated queues to consume (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="tasks run at once (default: %(default)s)"
    )
    parser.add_argument(
        "--pool",
        choices=POOLS,
        default="threads",
        help="execution pool (default: %(default)s, which keeps answering ping/revoke/inspect "
        "while a long task runs; solo blocks the consumer for the whole task; prefork forks "
        "children after start-up)",
    )
    parser.add_argument("--loglevel", default="INFO", help="(default: %(default)s)")
    parser.add_argument(
        "--hostname", default=None, help="worker node name (default: mriq-<pid>@<host>)"
    )
    parser.add_argument(
        "--beat", action="store_true", help="also run the periodic retraining schedule"
    )
    parser.add_argument("--data-dir", default=None, help="override settings.data_dir")
    parser.add_argument("--database-url", default=None, help="override settings.database_url")
    parser.add_argument("--broker-url", default=None, help="override settings.broker_url")
    parser.add_argument(
        "--no-reexec", action="store_true", help="do not re-exec with the allocator tuned"
    )
    from worker.recovery import DEFAULT_RECOVERY

    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=DEFAULT_RECOVERY.heartbeat_s,
        help="seconds between liveness stamps of a running task (default: %(default)s)",
    )
    parser.add_argument(
        "--dead-after",
        type=float,
        default=DEFAULT_RECOVERY.dead_after_s,
        help="a running chunk whose worker does not answer ping and has not stamped it for "
        "this long is re-sent (default: %(default)s; see worker/recovery.py)",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=DEFAULT_RECOVERY.stale_after_s,
        help="a running chunk/job without a heartbeat for this long is re-sent "
        "(default: %(default)s; see worker/recovery.py)",
    )
    parser.add_argument(
        "--recovery-interval",
        type=float,
        default=DEFAULT_RECOVERY.interval_s,
        help="seconds between recovery sweeps, 0 to disable (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        args.recovery = _recovery_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    if args.pool == "solo" and args.concurrency != 1:
        parser.error("--pool solo runs one task at a time; use threads or prefork for more")
    queues = [q.strip() for q in str(args.queues).split(",") if q.strip()]
    if not queues:
        parser.error("--queues needs at least one queue")
    args.queues = ",".join(queues)
    return args


def _recovery_config(args: argparse.Namespace) -> RecoveryConfig:
    from worker.recovery import RecoveryConfig

    return RecoveryConfig(
        heartbeat_s=float(args.heartbeat_interval),
        stale_after_s=float(args.stale_after),
        dead_after_s=float(args.dead_after),
        interval_s=float(args.recovery_interval),
    )


def _maybe_reexec(argv: Sequence[str]) -> None:
    from worker.runtime import ALLOCATOR_ENV

    env = os.environ
    if env.get(_REEXEC_MARK) or all(k in env for k in ALLOCATOR_ENV):
        return
    new_env = dict(env)
    for key, value in ALLOCATOR_ENV.items():
        new_env.setdefault(key, value)
    new_env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    # execve keeps the pid, so whoever spawned us (mriq worker, a test) still owns the process.
    os.execve(sys.executable, [sys.executable, "-m", "worker", *argv], new_env)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.data_dir is not None:
        out["data_dir"] = args.data_dir
    if args.database_url is not None:
        out["database_url"] = args.database_url
    if args.broker_url is not None:
        out["broker_url"] = args.broker_url
    return out


def _database_ready(url: str) -> bool:
    """A worker on an unmigrated database would fail on its first task; stop now and say why."""
    from scheduler.database import DatabaseNotMigratedError, ensure_migrated, make_engine

    engine = make_engine(url)
    try:
        ensure_migrated(engine)
    except DatabaseNotMigratedError as exc:
        print(f"mriq worker: {exc}", file=sys.stderr)
        return False
    finally:
        engine.dispose()
    return True


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if not args.no_reexec:
        _maybe_reexec(raw)

    from scheduler.settings import load_settings
    from worker.app import create_celery_app

    settings = load_settings(**_overrides(args))
    if not _database_ready(settings.resolved_database_url):
        return 2
    app = create_celery_app(settings)
    app.conf.mriq_recovery = args.recovery
    hostname = args.hostname or f"mriq-{os.getpid()}@{socket.gethostname()}"
    worker_argv = [
        "worker",
        f"--queues={args.queues}",
        f"--concurrency={args.concurrency}",
        f"--pool={args.pool}",
        f"--loglevel={args.loglevel}",
        f"--hostname={hostname}",
        # One message at a time per process (also set in the config; explicit here because
        # the CLI flag wins over config in some Celery versions).
        "--prefetch-multiplier=1",
        # Gossip/mingle chatter is useless for us and slow on the filesystem broker.
        "--without-gossip",
        "--without-mingle",
    ]
    if args.beat:
        worker_argv.append("--beat")
        worker_argv.append(f"--schedule={_beat_schedule_file(settings)}")
    if args.pool == "prefork":
        # The parent must not create torch thread pools before forking (see runtime.py):
        # nothing here imports torch, and children set their threads in worker_process_init.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    app.worker_main(argv=worker_argv)
    return 0


def _beat_schedule_file(settings: Settings) -> str:
    folder = settings.data_dir / "beat"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "schedule")


if __name__ == "__main__":
    sys.exit(main())
