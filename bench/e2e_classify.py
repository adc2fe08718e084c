"""Images/s of a classify job end to end next to ``python -m core.predict`` on the same files.

    python -m bench.e2e_classify --n 2000 --arch efficientnet_b0 --image-size 224
    python -m bench.e2e_classify --n 2000 --arch resnet18 --image-size 128

One run, same image files (``--n`` MRI-like 512 px JPEGs from ``bench.common.make_images``),
same randomly initialised checkpoint for both sides:

* ``mriq classify e2e``: a fresh PostgreSQL database (migrated, dropped afterwards), the
  benchmarks' Redis database (``--redis-db``, default 11, emptied before and after), one
  ``python -m worker --pool solo`` process, the checkpoint registered as a model version, a
  32-image warm-up job (the worker loads and caches the model), then
  ``mriq classify <folder> --wait --model ID --json``. Rate from the job's ``created_at`` to
  its ``finished_at`` (the last chunk's commit) in the database; the CLI's wall time too.
* ``python -m core.predict``: the whole command (spawn to exit, writing a CSV), and the same
  command on the 32 warm-up images, whose difference removes the start-up (interpreter, torch
  import, checkpoint load) to give a steady-state rate.

Not a test. The machine may be shared: the load average is printed before and after each
phase, and ``--repeats`` interleaves the two sides (the best run of each counts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    child_env,
    machine_description,
    make_checkpoint,
    make_images,
    phase,
    reexec_with_allocator,
    workspace,
)
from bench.services import (
    ServiceArgs,
    add_service_args,
    fresh_database,
    mriq_command,
    mriq_env,
    owned_redis_db,
    postgres_problem,
    redis_problem,
    running_worker,
)

WARMUP = 32
BATCH = 32


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e_classify", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--n", type=int, default=2000, help="images (%(default)s)")
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=512, help="JPEG side (%(default)s)")
    parser.add_argument("--chunk-size", type=int, default=512, help="MRIQ_CHUNK_SIZE")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each side")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--no-reexec", action="store_true",
                        help="do not re-exec with the worker's allocator setting")
    add_service_args(parser)
    return parser.parse_args(argv)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_classify(
    env: dict[str, str], inputs: Sequence[str], model_id: int
) -> tuple[dict[str, Any], float]:
    cmd = [*mriq_command(), "classify", *inputs, "--wait", "--model", str(model_id), "--json"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"mriq classify exit {proc.returncode}: {proc.stderr[-800:]}")
    snap: dict[str, Any] = json.loads(proc.stdout)
    return snap, seconds


def run_predict(checkpoint: Path, inputs: Sequence[str], out: Path, device: str) -> float:
    # As a user runs it: plain environment (no allocator tuning), default thread count.
    cmd = [sys.executable, "-m", "core.predict", "--checkpoint", str(checkpoint), "--out",
           str(out), "--no-progress", "--device", device, "--batch-size", str(BATCH), *inputs]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=7200)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"core.predict exit {proc.returncode}: {proc.stderr[-800:]}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if not args.no_reexec:
        # The worker re-execs itself with this allocator setting; give the parent the same.
        reexec_with_allocator("bench.e2e_classify", raw)
    svc = ServiceArgs.from_args(args)
    problem = postgres_problem(svc) or redis_problem(svc)
    if problem:
        log(f"skipped: {problem}")
        return 2

    from sqlalchemy import func, select

    from scheduler import repository
    from scheduler.database import make_engine, make_session_factory
    from scheduler.schema import PredictionRow
    from scheduler.settings import Settings

    results: dict[str, Any] = {
        "machine": machine_description(args.device),
        "arch": args.arch,
        "image_size": args.image_size,
        "n": args.n,
        "chunk_size": args.chunk_size,
        "loads": [],
        "e2e": [],
        "e2e_cli": [],
        "predict_whole": [],
        "predict_steady": [],
    }
    results["loads"].append(("start", load()))
    with workspace(args.workdir, keep=args.keep) as workdir:
        folder = workdir / "images"
        with phase(f"{args.n} images"):
            paths = make_images(folder, args.n, size=args.source_size)
        with phase("checkpoint"):
            model = make_checkpoint(workdir / "model.pt", arch=args.arch,
                                    image_size=args.image_size)
        warm = [str(p) for p in paths[:WARMUP]]
        data_dir = workdir / "mriq-data"
        with fresh_database(svc) as db_url, owned_redis_db(svc) as broker_url:
            engine = make_engine(db_url)
            sessions = make_session_factory(engine)
            with sessions() as s, s.begin():
                model_id = int(repository.register_model_version(
                    s, training_job_id=None, arch=args.arch, label_mode="15",
                    classes=list(model.classes), checkpoint_path=str(model.path),
                    checkpoint_sha256=model.sha256, metrics={},
                ).id)
            settings = Settings(data_dir=data_dir, database_url=db_url, broker_url=broker_url,
                                data_roots=(workdir,), chunk_size=args.chunk_size)
            env = mriq_env(data_dir=data_dir, database_url=db_url, broker_url=broker_url,
                           roots=workdir, chunk_size=args.chunk_size, device=args.device)
            try:
                with running_worker(env, workdir / "worker.log", settings):
                    with phase("warm-up job"):
                        run_classify(env, warm, model_id)
                    for rep in range(args.repeats):
                        results["loads"].append((f"before e2e {rep}", load()))
                        with phase(f"e2e {rep}"):
                            snap, cli_s = run_classify(env, [str(folder)], model_id)
                        with sessions() as s:
                            job = repository.get_job(s, int(snap["id"]))
                            n_rows = repository.count_predictions(s, job.id)
                            errors = repository.count_prediction_errors(s, job.id)
                            last = s.scalar(select(func.max(PredictionRow.created_at))
                                            .where(PredictionRow.job_id == job.id))
                            assert job.finished_at is not None
                            end = max(job.finished_at, last) if last else job.finished_at
                            db_s = (end - job.created_at).total_seconds()
                        if snap["status"] != "succeeded" or n_rows != args.n or errors:
                            raise RuntimeError(f"job {job.id}: {snap['status']}, {n_rows} rows, "
                                               f"{errors} errors")
                        results["e2e"].append(db_s)
                        results["e2e_cli"].append(cli_s)
                        log(f"  e2e: {args.n / db_s:.1f} img/s (db {db_s:.2f} s, "
                            f"CLI {cli_s:.2f} s), {load()}")
                        results["loads"].append((f"before core.predict {rep}", load()))
                        with phase(f"core.predict {rep}"):
                            whole = run_predict(model.path, [str(folder)], workdir / "p.csv",
                                                args.device)
                            small = run_predict(model.path, warm, workdir / "w.csv",
                                                args.device)
                        lines = sum(1 for _ in (workdir / "p.csv").open(encoding="utf-8")) - 1
                        if lines != args.n:
                            raise RuntimeError(f"core.predict wrote {lines} rows")
                        steady = max(whole - small, 1e-9)
                        results["predict_whole"].append(whole)
                        results["predict_steady"].append(steady)
                        log(f"  core.predict: {args.n / whole:.1f} img/s whole command "
                            f"({whole:.2f} s), {(args.n - WARMUP) / steady:.1f} img/s "
                            f"without start-up, {load()}")
            finally:
                engine.dispose()
    results["loads"].append(("end", load()))

    best = {k: min(results[k]) for k in ("e2e", "e2e_cli", "predict_whole", "predict_steady")}
    e2e_rate = args.n / best["e2e"]
    table = [
        ("mriq classify e2e (job created -> last row, DB)", e2e_rate),
        ("mriq classify --wait (CLI wall)", args.n / best["e2e_cli"]),
        ("python -m core.predict (whole command)", args.n / best["predict_whole"]),
        ("python -m core.predict (minus start-up)", (args.n - WARMUP) / best["predict_steady"]),
    ]
    m = results["machine"]
    print(f"\n{args.arch} at {args.image_size} px, {args.n} x {args.source_size} px JPEGs, "
          f"chunk {args.chunk_size}, {m.get('cpu')} x{m.get('cpus')}, torch {m.get('torch')}, "
          f"device {args.device}")
    print(f"{'row':52} {'img/s':>9} {'e2e/row':>8}")
    for name, rate in table:
        print(f"{name:52} {rate:9.1f} {e2e_rate / rate:8.2f}")
    print("load averages (1/5/15 min): " + "; ".join(f"{k}: {v}" for k, v in results["loads"]))
    if args.json_out:
        args.json_out.write_text(json.dumps(results | {"rows": table}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
