"""``python -m bench.web_render``: server render time of the dashboard's lists at size.

    python -m bench.web_render [--jobs 10000] [--predictions 100000] [--repeats 20]
                               [--backend sqlite|postgresql|both] [--quick] [--json-out FILE]

Bulk-inserts ``--jobs`` jobs and one classify job with ``--predictions`` prediction rows
(through ``scheduler.repository``: ``add_job_items`` and ``record_predictions``, as a real
job gets them), then renders through the app's ASGI stack (FastAPI's test client, no
network) the jobs page (first and a deep keyset page) and the big job's page (first page,
sorted by confidence, filtered by label, a deep page by cursor). Each page is requested
``--repeats`` times after one warm-up; the median and p95 are reported. Target: p95 <
300 ms for every page. Thumbnails are separate requests and not part of a page's time.

PostgreSQL runs in a fresh database (created, dropped with ``FORCE``); when it cannot be
reached its rows are ``skipped`` with the reason. ``--quick`` (alias ``--smoke``) runs
1,000 jobs and 5,000 predictions with 3 repeats, for the smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import phase, workspace
from bench.services import (
    ServiceArgs,
    add_service_args,
    fresh_database,
    postgres_problem,
)

TARGET_MS = 300.0
LABELS = ("Astrocitoma", "Glioblastoma", "Meningioma", "NORMAL", "Schwannoma")
BATCH = 5000


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.web_render",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="(%(default)s)")
    parser.add_argument("--predictions", type=int, default=100_000, help="(%(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="(%(default)s)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--quick", "--smoke", action="store_true", dest="quick",
                        help="1,000 jobs, 5,000 predictions, 3 repeats")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    add_service_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.predictions, args.repeats = 1000, 5000, 3
    return args


def _fill(url: str, n_jobs: int, n_predictions: int) -> dict[str, Any]:
    """The rows of one run; returns the big job's id and a mid-list job id."""
    from sqlalchemy import insert

    from scheduler import repository
    from scheduler.database import make_engine, make_session_factory
    from scheduler.repository import PredictionRecord
    from scheduler.schema import Job, JobKind, JobStatus, utcnow

    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as s, s.begin():
            version = repository.register_model_version(
                s, training_job_id=None, arch="resnet18", label_mode="15",
                classes=list(LABELS), checkpoint_path="/m/best.pt",
                checkpoint_sha256="c" * 64, metrics={})
            now = utcnow()
            kinds = (JobKind.CLASSIFY, JobKind.TRAIN, JobKind.EVALUATE)
            statuses = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.PARTIAL)
            rows = [{"kind": kinds[i % 3], "status": statuses[i % 3], "params": {},
                     "progress_done": 10, "progress_total": 10, "cancel_requested": False,
                     "created_at": now, "started_at": now, "finished_at": now}
                    for i in range(n_jobs)]
            for start in range(0, len(rows), BATCH):
                s.execute(insert(Job), rows[start:start + BATCH])
            big = repository.create_job(s, kind=JobKind.CLASSIFY, params={"top_k": 3},
                                        model_version_id=version.id)
            paths = [f"/data/inbox/{i // 1000:03d}/img_{i:06d}.png" for i in range(n_predictions)]
            repository.add_job_items(s, big.id, paths, chunk_size=512)
            big_id, mid_id = int(big.id), max(1, n_jobs // 2)
        for start in range(0, n_predictions, BATCH):
            records = [
                PredictionRecord(
                    item_index=i, path=paths[i], file_sha256=None,
                    label=None if i % 97 == 0 else LABELS[i % len(LABELS)],
                    confidence=None if i % 97 == 0 else (i * 7919 % 1000) / 1000,
                    top_k=() if i % 97 == 0 else ((LABELS[i % 5], 0.6), (LABELS[(i + 1) % 5], 0.2),
                                                   (LABELS[(i + 2) % 5], 0.1)),
                    error="unreadable" if i % 97 == 0 else None)
                for i in range(start, min(start + BATCH, n_predictions))
            ]
            with sessions() as s, s.begin():
                repository.record_predictions(s, big_id, records)
        with sessions() as s, s.begin():
            for chunk in repository.list_chunks(s, big_id):
                repository.complete_chunk(s, big_id, chunk.chunk_index)
    finally:
        engine.dispose()
    return {"big": big_id, "mid": mid_id}


def _pages(ids: dict[str, Any]) -> dict[str, str]:
    big = ids["big"]
    return {
        "jobs page": "/ui/",
        "jobs page, deep keyset": f"/ui/?before={ids['mid']}",
        "jobs page, status filter": "/ui/?status=failed",
        "job page": f"/ui/jobs/{big}",
        "job page, sorted by confidence": f"/ui/jobs/{big}?sort=confidence_desc",
        "job page, label + confidence filter":
            f"/ui/jobs/{big}?label=Meningioma&min_confidence=0.5",
        "job page, deep cursor": f"/ui/jobs/{big}?after={ids['deep_after']}",
    }


def _measure(url: str, data_dir: Path, ids: dict[str, Any], repeats: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from scheduler.api import create_app
    from scheduler.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=url, data_roots=(data_dir,))
    results: dict[str, Any] = {}
    with TestClient(create_app(settings)) as client:
        for name, path in _pages(ids).items():
            response = client.get(path)  # warm-up (templates compiled, caches filled)
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                client.get(path)
                times.append((time.perf_counter() - start) * 1000)
            times.sort()
            p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
            results[name] = {"median_ms": statistics.median(times), "p95_ms": p95,
                             "bytes": len(response.content)}
    return results


@contextmanager
def _database(backend: str, svc: ServiceArgs, work: Path) -> Iterator[str]:
    if backend == "sqlite":
        from scheduler.database import upgrade

        url = f"sqlite:///{work / 'web.db'}"
        upgrade(url)
        yield url
    else:
        with fresh_database(svc) as url:
            yield url


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with _database(backend, ServiceArgs.from_args(args), work) as url:
        with phase(f"{backend}: {args.jobs:,} jobs + {args.predictions:,} predictions"):
            ids = _fill(url, args.jobs, args.predictions)
        ids["deep_after"] = str(int(args.predictions * 0.9))
        with phase(f"{backend}: rendering"):
            return _measure(url, work / f"data-{backend}", ids, args.repeats)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    report: dict[str, Any] = {"jobs": args.jobs, "predictions": args.predictions,
                              "repeats": args.repeats, "pages": {}, "ratios": {}}
    lines = [f"== web_render: {args.jobs:,} jobs, a job with {args.predictions:,} predictions, "
             f"{args.repeats} repeats ==", f"{'page':<48} {'median ms':>10} {'p95 ms':>8}"]
    with workspace(args.workdir, keep=args.keep) as work:
        for backend in backends:
            problem = postgres_problem(ServiceArgs.from_args(args)) \
                if backend == "postgresql" else None
            if problem:
                lines.append(f"{backend}: skipped: {problem}")
                report["ratios"][f"{backend} worst p95 / {TARGET_MS:g} ms"] = None
                continue
            pages = run_backend(backend, args, work)
            report["pages"][backend] = pages
            for name, r in pages.items():
                lines.append(f"{backend + ' ' + name:<48} {r['median_ms']:>10.1f} "
                             f"{r['p95_ms']:>8.1f}")
            worst = max(r["p95_ms"] for r in pages.values())
            report["ratios"][f"{backend} worst p95 / {TARGET_MS:g} ms"] = worst / TARGET_MS
    for name, value in report["ratios"].items():
        shown = "skipped" if value is None else f"{value:.3f}x"
        lines.append(f"ratio {name}: {shown}  (target < 1)")
    print("\n".join(lines))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
