"""Worker memory over a long classify job: RSS at the start and at the end must match.

    .venv/bin/python -m bench.worker_rss [--n 20000] [--arch resnet18] [--image-size 32] [--smoke]

Runs a real ``python -m worker`` (threads pool, concurrency 1: tasks run in the worker's
own process, so its RSS is the one that matters) on a private ``redis-server`` (free port)
and a fresh database on the local PostgreSQL (``--database-url`` to use another, e.g. a
SQLite file), submits one classify job of ``--n`` tiny PNGs in chunks of ``--chunk-size``
(default: the worker's ``MRIQ_CHUNK_SIZE`` default) and samples the worker's VmRSS from /proc
every 0.5 s. "start" is the RSS once the first chunk is done (model loaded, first batches
through: the steady state), "end" is the RSS after the last chunk.
Prints both, the peak, and RSS at every 10% of progress. Not a test (minutes of CPU).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
#: --smoke: enough images for three chunks, so "start" (first chunk done) and "end" differ.
SMOKE_N, SMOKE_SIZE, SMOKE_CHUNK = 48, 32, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _write_images(folder: Path, n: int, size: int) -> list[Path]:
    # Noise PNGs, not bench.common.make_images' synthetic JPEGs: the RSS run wants many
    # distinct tiny files. tests/faults/conftest.py writes the same kind for its jobs; a
    # benchmark never imports the tests, and the fault fixtures should not hang on a
    # benchmark script's private helper, so these five lines stand twice.
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:06d}.png"
        Image.fromarray((rng.random((size, size)) * 255).astype("uint8"), mode="L").save(path)
        paths.append(path)
    return paths


def _default_chunk_size() -> int:
    from scheduler.settings import Settings

    return int(Settings.model_fields["chunk_size"].default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=_default_chunk_size(),
        help="items per chunk (default: MRIQ_CHUNK_SIZE's default, %(default)s)",
    )
    parser.add_argument("--database-url", default=None)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run that only checks the script works ({SMOKE_N} images of "
        f"{SMOKE_SIZE} px, chunks of {SMOKE_CHUNK}); its numbers mean nothing",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.image_size, args.chunk_size = SMOKE_N, SMOKE_SIZE, SMOKE_CHUNK
        args.arch = "resnet18"
    if args.n < 1 or args.chunk_size < 1 or args.image_size < 8:
        parser.error("--n and --chunk-size must be >= 1, --image-size >= 8")

    import psycopg

    from scheduler import repository
    from scheduler.database import make_engine, make_session_factory, upgrade
    from scheduler.dispatch import Dispatcher
    from scheduler.schema import JobKind, JobStatus
    from scheduler.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="mriq-rss-"))
    admin_db = None
    url = args.database_url
    if url is None:
        admin_db = f"mriq_rss_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(
            host="127.0.0.1", user="postgres", dbname="test", autocommit=True
        ) as c:
            c.execute(f'CREATE DATABASE "{admin_db}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{admin_db}"
    port = _free_port()
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    worker = None
    try:
        t0 = time.monotonic()
        paths = _write_images(tmp / "images", args.n, args.image_size)
        sha = make_checkpoint(
            tmp / "model.pt", arch=args.arch, image_size=args.image_size, crop="none"
        ).sha256
        print(f"wrote {len(paths)} images in {time.monotonic() - t0:.0f}s", flush=True)
        upgrade(url)
        factory = make_session_factory(make_engine(url))
        settings = Settings(
            data_dir=tmp / "data",
            database_url=url,
            broker_url=f"redis://127.0.0.1:{port}/0",
            data_roots=(tmp,),
            chunk_size=args.chunk_size,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}
        env.update(
            MRIQ_DATA_DIR=str(settings.data_dir),
            MRIQ_DATABASE_URL=url,
            MRIQ_BROKER_URL=str(settings.broker_url),
            MRIQ_DEFAULT_DEVICE="cpu",
            MRIQ_DATA_ROOTS=str(tmp),
            PYTHONPATH=str(REPO),
        )
        log = (tmp / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "--hostname", f"rss-{port}@localhost"],
            env=env,
            cwd=str(tmp),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        with factory.begin() as session:
            version = repository.register_model_version(
                session,
                training_job_id=None,
                arch=args.arch,
                label_mode="15",
                classes=[],
                checkpoint_path=str(tmp / "model.pt"),
                checkpoint_sha256=sha,
                metrics={},
            )
            job = repository.create_job(
                session,
                kind=JobKind.CLASSIFY,
                params={"top_k": 3, "batch_size": 32},
                model_version_id=version.id,
            )
            job_id = int(job.id)
            repository.add_job_items(
                session, job_id, [str(p) for p in paths], chunk_size=args.chunk_size
            )
            n_chunks = len(repository.list_chunks(session, job_id))
        dispatcher = Dispatcher(settings)
        dispatcher.classify_chunks(job_id, range(n_chunks))
        dispatcher.close()
        print(
            f"job {job_id}: {args.n} images, {n_chunks} chunks; worker pid {worker.pid}", flush=True
        )

        start_rss: float | None = None
        peak = 0.0
        marks: dict[int, float] = {}
        t_start = time.monotonic()
        while True:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited: {(tmp / 'worker.log').read_text()[-3000:]}")
            rss = _rss_mb(worker.pid)
            peak = max(peak, rss)
            with factory() as session:
                job = repository.get_job(session, job_id)
                done, status = job.progress_done, JobStatus(job.status)
            if start_rss is None and done >= args.chunk_size:
                start_rss = rss
                print(f"start (first chunk done, {done} rows): RSS {rss:.1f} MB", flush=True)
            decile = 10 * done // max(1, args.n)
            if decile not in marks:
                marks[decile] = rss
                print(f"  {10 * decile:3d}%  {done:6d} rows  RSS {rss:7.1f} MB", flush=True)
            if status.is_terminal:
                break
            time.sleep(0.5)
        end_rss = _rss_mb(worker.pid)
        seconds = time.monotonic() - t_start
        print(f"job {status} in {seconds:.0f}s ({args.n / seconds:.0f} images/s)")
        if start_rss is None:  # the job ended before a whole chunk was counted
            start_rss = end_rss
        print(
            f"RSS start {start_rss:.1f} MB, end {end_rss:.1f} MB, peak {peak:.1f} MB, "
            f"growth {end_rss - start_rss:+.1f} MB"
        )
        return 0 if status == JobStatus.SUCCEEDED else 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=30)
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        if admin_db is not None:
            with psycopg.connect(
                host="127.0.0.1", user="postgres", dbname="test", autocommit=True
            ) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{admin_db}" WITH (FORCE)')
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
