"""``python -m bench.sql_insert``: prediction rows into PostgreSQL, and submitting a big job.

    python -m bench.sql_insert [--rows 50000] [--batch-sizes 500,2000,5000]
                               [--submit-paths 100000] [--json-out FILE] [--smoke]

1. Inserts: ``scheduler.repository.record_predictions`` (one transaction per batch, as the
   worker commits per batch) against a plain psycopg ``executemany`` of the same rows with
   the same batch size and commits. Target: >= 20,000 rows/s.
2. Submission: ``scheduler.submission.submit_classify`` of an ``@list.txt`` with 100,000
   paths, with a ``Dispatcher`` on the filesystem broker, in a child process that reports its
   wall time and peak RSS. A second, 10x smaller submission shows whether memory grows with
   the list. Target: < 5 s, memory independent of the list length.

Each run works in a fresh PostgreSQL database, created and dropped with ``FORCE``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    SMOKE_NOTE,
    Measurement,
    Ratio,
    Report,
    Stopwatch,
    child_env,
    phase,
    rss_mb,
    workspace,
)
from bench.services import ServiceArgs, add_service_args

LABELS = ("Astrocitoma", "Glioblastoma", "Meningioma", "NORMAL", "Schwannoma")
SUBMIT = "submit_classify {n:,} paths"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sql_insert", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=50_000,
        help="prediction rows per insert method and batch size (%(default)s)",
    )
    parser.add_argument("--batch-sizes", default="500,2000,5000", help="(%(default)s)")
    parser.add_argument(
        "--submit-paths",
        type=int,
        default=100_000,
        help="paths in the big submission (%(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="settings.chunk_size for the submission (%(default)s)",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny run that only checks the script works"
    )
    parser.add_argument("--child-submit", type=Path, default=None, help=argparse.SUPPRESS)
    add_service_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows = 600
        args.batch_sizes = "100,300"
        args.submit_paths = 2_000
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.rows < 1:
        parser.error("--rows and --batch-sizes must be positive")
    return args


# --------------------------------------------------------------------------------------
# rows


def make_records(n: int) -> list[Any]:
    """Worker-shaped prediction records (1 in 50 an error row, like unreadable files)."""
    from scheduler.repository import PredictionRecord

    records = []
    for i in range(n):
        if i % 50 == 49:
            records.append(
                PredictionRecord(
                    i,
                    f"/data/mri/slice_{i:07d}.jpg",
                    None,
                    None,
                    None,
                    (),
                    "corrupt image: broken JPEG data",
                )
            )
            continue
        top = tuple((LABELS[(i + k) % len(LABELS)], round(0.7 / (k + 1), 6)) for k in range(3))
        records.append(
            PredictionRecord(
                i, f"/data/mri/slice_{i:07d}.jpg", f"{i:064x}", top[0][0], top[0][1], top, None
            )
        )
    return records


def _batches(rows: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _new_job(sessions: Any) -> int:
    from scheduler import repository
    from scheduler.schema import JobKind

    with sessions() as s, s.begin():
        return int(repository.create_job(s, kind=JobKind.CLASSIFY, params={"bench": True}).id)


def time_record_predictions(sessions: Any, records: Sequence[Any], batch: int) -> float:
    from scheduler import repository

    job_id = _new_job(sessions)
    with Stopwatch() as sw:
        for chunk in _batches(records, batch):
            with sessions() as s, s.begin():
                repository.record_predictions(s, job_id, chunk)
    return sw.seconds


def time_executemany(dsn: str, sessions: Any, records: Sequence[Any], batch: int) -> float:
    """The plain way: psycopg ``executemany`` of INSERTs, one commit per batch."""
    import psycopg
    from psycopg.types.json import Json

    from scheduler.schema import utcnow

    job_id = _new_job(sessions)
    sql = (
        "INSERT INTO predictions (job_id, item_index, path, file_sha256, label, confidence, "
        "top_k, error, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )
    with psycopg.connect(dsn) as conn, Stopwatch() as sw:
        for chunk in _batches(records, batch):
            now = utcnow()
            rows = [
                (
                    job_id,
                    r.item_index,
                    r.path,
                    r.file_sha256,
                    r.label,
                    r.confidence,
                    Json([[lbl, p] for lbl, p in r.top_k]),
                    r.error,
                    now,
                )
                for r in chunk
            ]
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, rows)
    return sw.seconds


def run_inserts(report: Report, args: argparse.Namespace, svc: ServiceArgs) -> None:
    from bench.services import fresh_database
    from scheduler.database import make_engine, make_session_factory

    records = make_records(args.rows)
    with fresh_database(svc) as url:
        engine = make_engine(url)
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        try:
            sessions = make_session_factory(engine)
            time_record_predictions(sessions, records[: min(200, len(records))], 100)  # warm-up
            best: tuple[float, int] | None = None
            for batch in args.batch_sizes:
                with phase(f"inserts, batch {batch}"):
                    ours = time_record_predictions(sessions, records, batch)
                    plain = time_executemany(dsn, sessions, records, batch)
                mine = report.add(
                    Measurement(f"record_predictions batch {batch}", len(records), ours, unit="row")
                )
                report.add(
                    Measurement(
                        f"executemany batch {batch}",
                        len(records),
                        plain,
                        unit="row",
                        note="baseline",
                    )
                )
                report.ratio(
                    f"record_predictions/executemany batch {batch}",
                    mine.name,
                    f"executemany batch {batch}",
                )
                if best is None or mine.rate > best[0]:
                    best = (mine.rate, batch)
            if best is not None:
                report.add_ratio(
                    Ratio(
                        f"record_predictions best rows/s / 20,000 (batch {best[1]})",
                        best[0] / 20_000,
                        ">= 1.0",
                    )
                )
        finally:
            engine.dispose()


# --------------------------------------------------------------------------------------
# submission


def child_submit(spec_path: Path) -> int:
    """Child mode: one submission; prints wall seconds and RSS before/peak as JSON."""
    spec = json.loads(spec_path.read_text())
    from scheduler import repository
    from scheduler.database import make_engine, make_session_factory
    from scheduler.dispatch import Dispatcher
    from scheduler.settings import Settings
    from scheduler.submission import submit_classify

    settings = Settings(
        data_dir=Path(spec["data_dir"]),
        database_url=spec["database_url"],
        broker_url=None,
        data_roots=(Path(spec["root"]),),
        chunk_size=spec["chunk_size"],
        max_paths_per_job=spec["n"],
    )
    engine = make_engine(spec["database_url"])
    sessions = make_session_factory(engine)
    dispatcher = Dispatcher(settings)
    with sessions() as s:  # imports and first connection paid before the clock starts
        repository.get_model_version(s, spec["model_id"])
    idle_rss = rss_mb() or 0.0
    with Stopwatch() as sw:
        job_id = submit_classify(
            sessions, dispatcher, settings, [f"@{spec['list']}"], model_version_id=spec["model_id"]
        )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with sessions() as s:
        items = repository.get_job(s, job_id).progress_total
    engine.dispose()
    print(
        json.dumps(
            {
                "seconds": sw.seconds,
                "idle_rss_mb": idle_rss,
                "peak_rss_mb": peak_kib / 1024.0,
                "items": items,
            }
        )
    )
    return 0


def _submit_once(
    workdir: Path, url: str, model_id: int, n: int, chunk_size: int, tag: str
) -> dict[str, Any]:
    files = workdir / "files"
    list_path = workdir / f"list-{tag}.txt"
    with list_path.open("w", encoding="utf-8") as fh:
        # Files need not exist: missing ones are still items (they become error rows).
        for i in range(n):
            fh.write(f"{files}/sub{i // 1000:03d}/slice_{i:07d}.jpg\n")
    spec = workdir / f"submit-{tag}.json"
    spec.write_text(
        json.dumps(
            {
                "data_dir": str(workdir / f"data-{tag}"),
                "database_url": url,
                "root": str(workdir),
                "chunk_size": chunk_size,
                "n": n,
                "list": str(list_path),
                "model_id": model_id,
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sql_insert", "--child-submit", str(spec)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"submission child exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["items"] != n:
        raise RuntimeError(f"job has {result['items']} items, expected {n}")
    return result


def run_submission(
    report: Report, args: argparse.Namespace, svc: ServiceArgs, workdir: Path
) -> None:
    from bench.services import fresh_database
    from scheduler import repository
    from scheduler.database import make_engine, make_session_factory

    big = args.submit_paths
    small = max(1, big // 10)
    with fresh_database(svc) as url:
        engine = make_engine(url)
        try:
            with make_session_factory(engine)() as s, s.begin():
                # The one registration call (tests/worker/test_ledger.py makes the same
                # keyword call): the logic lives in repository.register_model_version.
                model_id = int(
                    repository.register_model_version(
                        s,
                        training_job_id=None,
                        arch="efficientnet_b0",
                        label_mode="15",
                        classes=["a", "b"],
                        checkpoint_path="/nonexistent/model.pt",
                        checkpoint_sha256="0" * 64,
                        metrics={},
                    ).id
                )
        finally:
            engine.dispose()
        results = {}
        for n, tag in ((small, "small"), (big, "big")):
            with phase(f"submit {n} paths"):
                results[n] = _submit_once(workdir, url, model_id, n, args.chunk_size, tag)
            r = results[n]
            report.add(
                Measurement(
                    SUBMIT.format(n=n),
                    n,
                    r["seconds"],
                    unit="path",
                    note=f"RSS idle {r['idle_rss_mb']:.0f} MiB, peak "
                    f"{r['peak_rss_mb']:.0f} MiB (filesystem broker)",
                )
            )
    seconds = results[big]["seconds"]
    report.add_ratio(Ratio(f"submit {big:,} paths seconds / 5 s", seconds / 5.0, "< 1.0"))
    grow_small = results[small]["peak_rss_mb"] - results[small]["idle_rss_mb"]
    grow_big = results[big]["peak_rss_mb"] - results[big]["idle_rss_mb"]
    report.add_ratio(
        Ratio(
            f"submit RSS growth {big:,} / {small:,} paths",
            (grow_big + 1.0) / (grow_small + 1.0),
            "~1.0 (memory independent of the list; +1 MiB smoothing)",
        )
    )
    report.notes.append(
        f"submission RSS growth over idle: {small:,} paths {grow_small:.1f} "
        f"MiB, {big:,} paths {grow_big:.1f} MiB"
    )


# --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    from bench.common import machine_description
    from bench.services import missing_modules, postgres_problem

    svc = ServiceArgs.from_args(args)
    context: dict[str, Any] = {
        "rows": args.rows,
        "submit_paths": args.submit_paths,
        "smoke": args.smoke,
    }
    context |= machine_description(None)
    report = Report(title="mriq SQL benchmark (PostgreSQL)", context=context)
    reason = missing_modules(
        "scheduler.repository", "scheduler.database", "psycopg"
    ) or postgres_problem(svc)
    if reason:
        report.skip("record_predictions", reason)
        report.add_ratio(Ratio("record_predictions/executemany", None, skipped=reason))
    else:
        try:
            run_inserts(report, args, svc)
        except Exception as exc:
            report.skip("record_predictions", f"{type(exc).__name__}: {str(exc)[-400:]}")
            report.add_ratio(Ratio("record_predictions/executemany", None, skipped=str(exc)))
    reason = reason or missing_modules("scheduler.submission", "scheduler.dispatch", "celery")
    if reason:
        report.skip("submit_classify", reason)
        report.add_ratio(Ratio("submit seconds / 5 s", None, skipped=reason))
    else:
        with workspace(args.workdir, keep=args.keep) as workdir:
            try:
                run_submission(report, args, svc, workdir)
            except Exception as exc:
                report.skip("submit_classify", f"{type(exc).__name__}: {str(exc)[-400:]}")
                report.add_ratio(Ratio("submit seconds / 5 s", None, skipped=str(exc)[-200:]))
    if args.smoke:
        report.notes.append(SMOKE_NOTE)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.child_submit is not None:
        return child_submit(args.child_submit)
    report = run(args)
    report.finish(args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
