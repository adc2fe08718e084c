"""The HTTP API under load: 50 clients submit small classify jobs and poll for 5 minutes.

    .venv/bin/python -m bench.api_load [--clients 50] [--duration 300] [--smoke]

A real ``mriq api`` process (uvicorn, bearer token on) on loopback, a real worker
(``python -m worker --pool solo``) on a private ``redis-server`` (free port) and a fresh
PostgreSQL database; the clients are locust users (``bench/api_load_users.py``) in a second
process. Each client submits a job of ``--per-job`` tiny PNGs now and then and mostly reads
its recent jobs' pages and predictions. Bounded in clients and time; afterwards the worker
drains the queue (at most ``--drain-timeout`` s) and every job the API accepted is checked.

Reported: requests per endpoint with p50/p99/max latency (exact, from every response);
the reads' p50/p99 (goal: p99 < 500 ms); server errors (5xx: goal 0); jobs lost (accepted
but not succeeded with one row per input: goal 0); 503s for an exhausted pool (goal 0)
and the most connections the API had open/active (sampled from ``pg_stat_activity``,
against its pool's bound of 2 x ``api_db_pool_size``); the API's RSS. Exits 1 on a server
error or a lost job. Not a test (minutes of CPU); ``--smoke`` (3 clients, 10 s) is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Measurement,
    Ratio,
    Report,
    machine_description,
    rss_mb,
    stop_process,
    workspace,
)
from bench.services import (
    ServiceArgs,
    add_service_args,
    fresh_database,
    missing_modules,
    mriq_env,
    postgres_problem,
    running_worker,
)

TOKEN = "api-load-bench-token"
APP_NAME = "mriq-api-bench"
READS = ("GET /jobs/{id}", "GET /jobs/{id}/predictions", "GET /jobs")
P99_GOAL_MS = 500.0
START_TIMEOUT_S = 90.0
SMOKE = {"clients": 3, "duration": 10, "spawn_rate": 3.0, "images": 8, "drain_timeout": 120.0}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.api_load",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="locust users (%(default)s)")
    parser.add_argument("--duration", type=int, default=300, help="seconds (%(default)s)")
    parser.add_argument("--spawn-rate", type=float, default=10.0,
                        help="clients started per second (%(default)s)")
    parser.add_argument("--wait", default="1,3",
                        help="seconds between one client's requests, min,max (%(default)s)")
    parser.add_argument("--per-job", type=int, default=3, help="images per job (%(default)s)")
    parser.add_argument("--images", type=int, default=64,
                        help="distinct 32 px PNGs the jobs draw from (%(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=600.0,
                        help="seconds the worker gets to finish the queue (%(default)s)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="3 clients for 10 s: only checks the script works")
    add_service_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.clients < 1 or args.duration < 1 or args.per_job < 1 or args.images < 1:
        parser.error("--clients, --duration, --per-job and --images must be >= 1")
    return args


# --------------------------------------------------------------------------------------
# processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(
    cmd: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def _private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of this run on a free port (never the shared one); its URL."""
    import redis

    port = _free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--dir", str(workdir)]
    with _process(cmd, {}, workdir / "redis.log"):
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=port, socket_timeout=1).ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


def _wait_for_api(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mriq api exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"mriq api not healthy after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.3)


class ApiSampler:
    """Samples the API's database connections (pg_stat_activity) and RSS every 0.5 s."""

    def __init__(self, database_url: str, pid: int) -> None:
        from sqlalchemy.engine import make_url

        self.url = make_url(database_url)
        self.pid = pid
        self.open_max = 0
        self.active_max = 0
        self.rss: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        url = self.url
        with psycopg.connect(host=url.host, port=url.port or 5432, user=url.username,
                             dbname=url.database, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE state = 'active') "
                    "FROM pg_stat_activity WHERE application_name = %s", (APP_NAME,)
                ).fetchone()
                if row is not None:
                    self.open_max = max(self.open_max, int(row[0]))
                    self.active_max = max(self.active_max, int(row[1]))
                rss = rss_mb(self.pid)
                if rss is not None:
                    self.rss.append(rss)
                self._stop.wait(0.5)

    def __enter__(self) -> ApiSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------------------
# the run


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def _setup(workdir: Path, url: str, args: argparse.Namespace) -> tuple[Path, int]:
    """Images, a tiny checkpoint registered as a model version; (inputs file, model id)."""
    from bench.common import make_checkpoint
    from bench.worker_rss import _write_images
    from scheduler import repository
    from scheduler.database import make_engine, make_session_factory

    paths = _write_images(workdir / "images", args.images, 32)
    model = make_checkpoint(workdir / "model.pt", arch="resnet18", image_size=32, crop="none")
    engine = make_engine(url)
    try:
        with make_session_factory(engine).begin() as session:
            version = repository.register_model_version(
                session, training_job_id=None, arch=model.arch, label_mode="15",
                classes=list(model.classes), checkpoint_path=str(model.path),
                checkpoint_sha256=model.sha256, metrics={},
            )
            model_id = int(version.id)
    finally:
        engine.dispose()
    inputs = workdir / "inputs.txt"
    inputs.write_text("".join(f"{p}\n" for p in paths))
    return inputs, model_id


def _run_locust(args: argparse.Namespace, env: dict[str, str], api_url: str, workdir: Path,
                inputs: Path, model_id: int) -> dict[str, Any]:
    out = workdir / "locust-results.json"
    env = {**env, "API_LOAD_TOKEN": TOKEN, "API_LOAD_INPUTS": str(inputs),
           "API_LOAD_MODEL_ID": str(model_id), "API_LOAD_PER_JOB": str(args.per_job),
           "API_LOAD_WAIT": args.wait, "API_LOAD_OUT": str(out)}
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "api_load_users.py"),
           "--headless", "--users", str(args.clients), "--spawn-rate", str(args.spawn_rate),
           "--run-time", f"{args.duration}s", "--host", api_url, "--only-summary",
           "--stop-timeout", "10", "--exit-code-on-error", "0", "--loglevel", "WARNING"]
    log_path = workdir / "locust.log"
    with _process(cmd, env, log_path) as proc:
        try:
            proc.wait(timeout=args.duration + 120)
        except subprocess.TimeoutExpired:
            raise RuntimeError("locust did not stop in time") from None
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"locust exited {proc.returncode}: {log_path.read_text()[-2000:]}")
    return dict(json.loads(out.read_text()))


def _drain_and_check(url: str, accepted: list[int], timeout: float) -> dict[str, Any]:
    """Wait for the queue to empty, then check every accepted job."""
    from sqlalchemy import func, select

    from scheduler.database import make_engine
    from scheduler.schema import Job, JobItem, JobStatus, PredictionRow

    engine = make_engine(url)
    open_states = [JobStatus.QUEUED, JobStatus.RUNNING]
    start = time.monotonic()
    try:
        with engine.connect() as conn:
            while conn.execute(select(func.count()).select_from(Job)
                               .where(Job.status.in_(open_states))).scalar_one():
                conn.rollback()
                if time.monotonic() - start > timeout:
                    break
                time.sleep(1.0)
            drain_s = time.monotonic() - start
            jobs = {int(i): (str(s), int(t)) for i, s, t in conn.execute(
                select(Job.id, Job.status, Job.progress_total))}
            rows = {int(j): int(n) for j, n in conn.execute(
                select(PredictionRow.job_id, func.count()).group_by(PredictionRow.job_id))}
            items = {int(j): int(n) for j, n in conn.execute(
                select(JobItem.job_id, func.count()).group_by(JobItem.job_id))}
    finally:
        engine.dispose()
    lost = [j for j in accepted if j not in jobs or jobs[j][0] != JobStatus.SUCCEEDED
            or rows.get(j, 0) != items.get(j, -1)]
    return {"drain_s": drain_s, "lost": lost, "in_db": len(jobs),
            "unacknowledged": len(set(jobs) - set(accepted)),
            "statuses": {s: sum(1 for v in jobs.values() if v[0] == s)
                         for s in {v[0] for v in jobs.values()}}}


def _report(report: Report, args: argparse.Namespace, results: dict[str, Any],
            check: dict[str, Any], sampler: ApiSampler, pool_size: int) -> None:
    times: dict[str, list[float]] = results["times_ms"]
    statuses: dict[str, dict[str, int]] = results["statuses"]
    total = sum(len(v) for v in times.values())
    server_errors = sum(n for counts in statuses.values() for code, n in counts.items()
                        if code.isdigit() and int(code) >= 500)
    transport_errors = sum(n for counts in statuses.values() for code, n in counts.items()
                           if not code.isdigit())
    for name in sorted(times):
        values = times[name]
        report.add(Measurement(
            name, len(values), float(args.duration), unit="req",
            note=f"p50 {_percentile(values, 0.5):.0f} ms, p99 {_percentile(values, 0.99):.0f}"
                 f" ms, max {max(values):.0f} ms; {statuses.get(name, {})}",
        ))
    reads = [t for name in READS for t in times.get(name, [])]
    p50, p99 = _percentile(reads, 0.5), _percentile(reads, 0.99)
    report.notes.append(f"reads ({len(reads)} requests): p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    report.add_ratio(Ratio(f"reads p99 / {P99_GOAL_MS:.0f} ms", p99 / P99_GOAL_MS, "< 1.0"))
    report.add_ratio(Ratio("server errors (5xx) / requests", server_errors / max(1, total),
                           "0", percent=True))
    accepted = len(results["submitted"])
    report.add_ratio(Ratio("jobs lost / accepted", len(check["lost"]) / max(1, accepted),
                           "0", percent=True))
    busy = int(results["unavailable"].get("database busy:", 0))
    report.add_ratio(Ratio("pool-exhausted 503s / requests", busy / max(1, total), "0",
                           percent=True))
    report.notes.append(
        f"{total} requests, {server_errors} server errors, {transport_errors} transport "
        f"errors, 503s by reason {results['unavailable'] or '{}'}"
    )
    report.notes.append(
        f"jobs: {accepted} accepted, {len(check['lost'])} lost {check['lost'][:10]}, "
        f"{check['in_db']} in the database ({check['unacknowledged']} never acknowledged to "
        f"a client), statuses {check['statuses']}; queue drained {check['drain_s']:.0f} s "
        "after the load stopped"
    )
    report.notes.append(
        f"API database connections: at most {sampler.open_max} open, {sampler.active_max} "
        f"active at a sample (pool bound {2 * pool_size})"
    )
    if sampler.rss:
        report.notes.append(f"API RSS start {sampler.rss[0]:.0f} MiB, peak "
                            f"{max(sampler.rss):.0f}, end {sampler.rss[-1]:.0f}")
    if server_errors or check["lost"]:
        report.failed.append("api load")


def run(args: argparse.Namespace, report: Report) -> None:
    from scheduler.settings import Settings

    svc = ServiceArgs.from_args(args)
    pool_size = int(Settings.model_fields["api_db_pool_size"].default)
    with workspace(args.workdir, keep=args.keep) as workdir, fresh_database(svc) as url, \
            _private_redis(workdir) as broker:
        inputs, model_id = _setup(workdir, url, args)
        env = mriq_env(data_dir=workdir / "data", database_url=url, broker_url=broker,
                       roots=workdir, chunk_size=512, device="cpu")
        settings = Settings(data_dir=workdir / "data", database_url=url, broker_url=broker,
                            data_roots=(workdir,))
        port = _free_port()
        api_url = f"http://127.0.0.1:{port}"
        # The API's connections carry a name, so pg_stat_activity tells them from the worker's.
        api_db = url + ("&" if "?" in url else "?") + f"application_name={APP_NAME}"
        api_env = {**env, "MRIQ_API_TOKEN": TOKEN, "MRIQ_DATABASE_URL": api_db}
        api_cmd = [sys.executable, "-m", "scheduler", "api", "--port", str(port)]
        with running_worker(env, workdir / "worker.log", settings), \
                _process(api_cmd, api_env, workdir / "api.log") as api:
            _wait_for_api(api_url, api, workdir / "api.log")
            with ApiSampler(url, api.pid) as sampler:
                print(f"load: {args.clients} clients for {args.duration} s on {api_url}",
                      file=sys.stderr, flush=True)
                results = _run_locust(args, env, api_url, workdir, inputs, model_id)
            check = _drain_and_check(url, list(results["submitted"]), args.drain_timeout)
            if api.poll() is not None:
                report.fail("api", f"mriq api exited {api.returncode}")
        _report(report, args, results, check, sampler, pool_size)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    context: dict[str, Any] = {"clients": args.clients, "duration_s": args.duration,
                               "per_job": args.per_job, "wait_s": args.wait,
                               "smoke": args.smoke}
    context |= machine_description(None)
    report = Report(title="mriq HTTP API under load", context=context)
    svc = ServiceArgs.from_args(args)
    reason = missing_modules("locust", "httpx", "psycopg") or postgres_problem(svc)
    if reason:
        report.fail("api load", reason)
    else:
        try:
            run(args, report)
        except Exception as exc:
            report.fail("api load", f"{type(exc).__name__}: {str(exc)[-600:]}")
    if args.smoke:
        report.notes.append("smoke run: 3 clients for 10 s, the numbers mean nothing")
    report.finish(args.json_out)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
