"""The whole job system end to end on real services: PostgreSQL, Redis, a worker, Flower, API.

One stack per module (a fresh PostgreSQL database, Redis database 12, one ``mriq worker``
process), driven only through the ``mriq`` CLI and the HTTP API as an operator would:

    mriq db upgrade -> mriq worker -> python -m core.synth -> mriq train --wait
    -> mriq models list / promote -> mriq classify DIR --wait (500 images + broken files)
    -> mriq results --format csv (== SQL rows; == GET /jobs/{id}/predictions?format=csv)
    -> mriq evaluate --wait -> mriq jobs cancel (a running job) -> mriq flower (basic auth)

The steps are module-scoped fixtures, so each test can also run on its own (``-k``) and
pulls in only the steps it needs. Assertions read the database through SQLAlchemy.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.database import make_engine, make_session_factory
from scheduler.dispatch import Dispatcher
from scheduler.schema import (
    ChunkStatus,
    EpochMetric,
    EvaluationReport,
    Job,
    JobChunk,
    JobItem,
    JobStatus,
    ModelStage,
    PredictionRow,
)
from scheduler.settings import Settings
from tests.e2e.conftest import (
    Cli,
    Service,
    Services,
    clean_env,
    free_port,
    mriq_argv,
    synthesise,
    wait_until,
    write_inbox,
)

pytestmark = [pytest.mark.e2e, pytest.mark.services]

N_GOOD = 500
IMAGE_SIZE = 32
CHUNK_SIZE = 64
FLOWER_AUTH = ("e2e", "flower-secret")
API_TOKEN = "e2e-api-token"
EMBEDDED_NOTE = "started an embedded worker"


@dataclass
class Stack:
    root: Path
    data_dir: Path
    settings: Settings
    cli: Cli
    sessions: sessionmaker[Session]
    worker: Service
    hostname: str
    services: Services
    train_data: Path
    #: A train job submitted and cancelled before the worker started.
    cancelled_early: int

    def session(self) -> Session:
        return self.sessions()


def _wait_for_ping(settings: Settings, worker: Service, hostname: str) -> None:
    dispatcher = Dispatcher(settings)
    try:

        def answered() -> bool:
            assert worker.alive(), f"worker exited with {worker.proc.returncode}:\n{worker.log()}"
            return hostname in dispatcher.ping(timeout=1.0)

        wait_until(answered, timeout=90, interval=0.5, what=f"worker {hostname} to answer ping")
    finally:
        dispatcher.close()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    e2e_postgres_url: str,
    e2e_redis_url: str,
    services: Services,
) -> Iterator[Stack]:
    """A migrated database and one running ``mriq worker``, all set up through the CLI."""
    root = tmp_path_factory.mktemp("e2e-services")
    data_dir = root / "data"
    env = clean_env({
        "MRIQ_DATABASE_URL": e2e_postgres_url,
        "MRIQ_BROKER_URL": e2e_redis_url,
        "MRIQ_DATA_DIR": str(data_dir),
        "MRIQ_DATA_ROOTS": str(root),
        "MRIQ_CHUNK_SIZE": str(CHUNK_SIZE),
        "MRIQ_DEFAULT_DEVICE": "cpu",
        "MRIQ_API_TOKEN": API_TOKEN,
        "MRIQ_FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
    })
    settings = Settings(
        data_dir=data_dir,
        database_url=e2e_postgres_url,
        broker_url=e2e_redis_url,
        data_roots=(root,),
        chunk_size=CHUNK_SIZE,
    )
    cli = Cli(env=env, cwd=root)

    # An unmigrated database is refused with a pointer to the fix, then migrated.
    refused = cli.run("jobs", "list", expect=1)
    assert "mriq db upgrade" in refused.stderr, refused.describe()
    cli.run("db", "upgrade")
    assert cli.run("jobs", "list", "--json").json() == []

    # Before any worker exists: a waiting client on a shared broker must not start a worker
    # of its own, and a queued job can be cancelled at once.
    train_data = synthesise(root / "train-data", per_folder=2, seed=0)
    early = cli.run(*_train_args(train_data), "--json").json()["id"]
    waited = cli.run("jobs", "wait", str(early), "--timeout", "3", expect=1)
    assert "still queued" in waited.stderr, waited.describe()
    assert EMBEDDED_NOTE not in waited.stderr, waited.describe()
    assert "no worker answered a ping" in waited.stderr, waited.describe()
    assert cli.run("jobs", "cancel", str(early), "--json").json()["status"] == "cancelled"

    hostname = f"e2e-{uuid.uuid4().hex[:8]}@localhost"
    worker = services.start("worker", mriq_argv("worker", "--hostname", hostname), env, root)
    _wait_for_ping(settings, worker, hostname)

    engine: Engine = make_engine(e2e_postgres_url)
    try:
        yield Stack(root, data_dir, settings, cli, make_session_factory(engine), worker,
                    hostname, services, train_data, int(early))
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------
# steps (module-scoped: each runs once, for whichever tests need it)


@dataclass(frozen=True)
class Trained:
    job: dict[str, Any]
    model_id: int
    data: Path


def _train_args(data: Path) -> list[str]:
    return ["train", "--data", str(data), "--arch", "resnet18", "--image-size", str(IMAGE_SIZE),
            "--epochs", "1", "--weights", "none", "--batch-size", "16"]


@pytest.fixture(scope="module")
def trained(stack: Stack) -> Trained:
    data = stack.train_data
    result = stack.cli.run(*_train_args(data), "--wait", "--json")
    assert EMBEDDED_NOTE not in result.stderr, result.describe()
    job = result.json()
    assert job["status"] == "succeeded", result.describe()
    with stack.session() as s:
        versions = [m for m in repository.list_model_versions(s)
                    if m.training_job_id == job["id"]]
    assert len(versions) == 1, f"train job {job['id']} registered {len(versions)} versions"
    return Trained(job=job, model_id=int(versions[0].id), data=data)


@pytest.fixture(scope="module")
def production_model(stack: Stack, trained: Trained) -> int:
    doc = stack.cli.run("models", "promote", str(trained.model_id), "--json").json()
    assert doc["id"] == trained.model_id
    assert doc["stage"] == "production"
    return trained.model_id


@dataclass(frozen=True)
class Inbox:
    folder: Path
    good: list[Path]
    broken: list[Path]

    @property
    def files(self) -> set[str]:
        return {str(p) for p in (*self.good, *self.broken)}


@pytest.fixture(scope="module")
def inbox(stack: Stack) -> Inbox:
    folder = stack.root / "inbox"
    good, broken = write_inbox(folder, N_GOOD, seed=1)
    return Inbox(folder, good, broken)


@dataclass(frozen=True)
class Classified:
    job: dict[str, Any]
    stderr: str


@pytest.fixture(scope="module")
def classified(stack: Stack, production_model: int, inbox: Inbox) -> Classified:
    result = stack.cli.run("classify", str(inbox.folder), "--wait", "--json")
    return Classified(job=result.json(), stderr=result.stderr)


# --------------------------------------------------------------------------------------
# tests


def test_train_records_metrics_model_version_and_artifacts(stack: Stack, trained: Trained) -> None:
    job_id = trained.job["id"]
    assert trained.job["kind"] == "train"
    assert trained.job["progress_done"] == trained.job["progress_total"] == 1
    with stack.session() as s:
        job = repository.get_job(s, job_id)
        assert job.status is JobStatus.SUCCEEDED
        assert job.started_at is not None and job.finished_at is not None
        assert job.params["arch"] == "resnet18" and job.params["image_size"] == IMAGE_SIZE
        epochs = s.scalars(select(EpochMetric).where(EpochMetric.job_id == job_id)).all()
        assert len(epochs) == 1
        assert all(math.isfinite(e.train_loss or math.nan) for e in epochs)
        version = repository.get_model_version(s, trained.model_id)
        assert version.arch == "resnet18" and version.label_mode == "15"
        assert len(version.classes) == 15
        assert version.stage in (ModelStage.CANDIDATE, ModelStage.PRODUCTION)
        checkpoint = Path(version.checkpoint_path)
        assert checkpoint.is_file()
        assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == version.checkpoint_sha256
        # The test split's report is the train job's evaluation.
        evaluation = repository.get_evaluation(s, job_id)
        assert evaluation.model_version_id == trained.model_id
        assert 0.0 <= (evaluation.accuracy or 0.0) <= 1.0
        artifacts = {a.kind: Path(a.path) for a in repository.list_artifacts(s, job_id)}
    assert artifacts, "the train job recorded no artifacts"
    for kind, path in artifacts.items():
        assert path.is_file(), f"artifact {kind} missing: {path}"

    listed = stack.cli.run("models", "list", "--json").json()
    mine = [m for m in listed if m["id"] == trained.model_id]
    assert len(mine) == 1
    model = mine[0]
    assert model["training_job_id"] == job_id
    assert model["arch"] == "resnet18"
    assert model["checkpoint_sha256"] == version.checkpoint_sha256
    assert model["metrics"], "model version has no metrics"
    numbers = [v for v in model["metrics"].values() if isinstance(v, int | float)]
    assert numbers and all(math.isfinite(v) for v in numbers), model["metrics"]

    shown = stack.cli.run("jobs", "show", str(job_id), "--json").json()
    assert shown["status"] == "succeeded"
    assert len(shown["epochs"]) == 1
    assert shown["evaluation"]["accuracy"] == pytest.approx(evaluation.accuracy)


def test_a_job_cancelled_while_queued_never_runs(stack: Stack, trained: Trained) -> None:
    # By now the worker has consumed the early job's message (it ran the later train job).
    with stack.session() as s:
        job = repository.get_job(s, stack.cancelled_early)
        assert job.status is JobStatus.CANCELLED
        assert job.started_at is None and job.finished_at is not None
        assert not repository.list_epoch_metrics(s, job.id)
        assert all(m.training_job_id != job.id for m in repository.list_model_versions(s))
    assert not (stack.settings.jobs_dir / str(stack.cancelled_early)).exists()


def test_promote_makes_the_model_production(stack: Stack, production_model: int) -> None:
    with stack.session() as s:
        production = repository.get_production_model(s)
        assert production is not None and production.id == production_model
        assert production.promoted_at is not None
    listed = stack.cli.run("models", "list", "--json").json()
    stages = {m["id"]: m["stage"] for m in listed}
    assert stages[production_model] == "production"
    assert list(stages.values()).count("production") == 1


def test_classify_records_one_row_per_file(
    stack: Stack, production_model: int, inbox: Inbox, classified: Classified
) -> None:
    total = N_GOOD + len(inbox.broken)
    job = classified.job
    assert EMBEDDED_NOTE not in classified.stderr, classified.stderr
    assert job["status"] == "succeeded", job
    assert job["kind"] == "classify"
    assert job["model_version_id"] == production_model
    assert (job["progress_done"], job["progress_total"]) == (total, total)

    with stack.session() as s:
        db_job = s.get(Job, job["id"])
        assert db_job is not None and db_job.status is JobStatus.SUCCEEDED
        assert (db_job.progress_done, db_job.progress_total) == (total, total)
        items = {index: path for index, path in s.execute(
            select(JobItem.item_index, JobItem.path).where(JobItem.job_id == job["id"])
        )}
        rows = s.scalars(
            select(PredictionRow).where(PredictionRow.job_id == job["id"])
            .order_by(PredictionRow.item_index)
        ).all()
        chunks = s.scalars(select(JobChunk).where(JobChunk.job_id == job["id"])).all()
        classes = set(repository.get_model_version(s, production_model).classes)

    # Every input file is an item, and every item has exactly one row.
    assert set(items.values()) == inbox.files
    assert sorted(items) == list(range(total))
    assert [r.item_index for r in rows] == list(range(total))
    assert {r.item_index: r.path for r in rows} == items
    assert len(chunks) == math.ceil(total / CHUNK_SIZE)
    assert {c.status for c in chunks} == {ChunkStatus.SUCCEEDED}

    broken = {str(p) for p in inbox.broken}
    for row in rows:
        # A row is a prediction or an error, never both or neither.
        assert (row.label is None) != (row.error is None), row.path
        if row.path in broken:
            assert row.error is not None, f"{row.path}: broken file got label {row.label}"
            assert row.confidence is None and not row.top_k
            assert row.error.strip(), row.path
            if row.path.endswith("broken_empty.png"):
                assert "empty" in row.error, row.error
            continue
        assert row.error is None, f"{row.path}: {row.error}"
        assert row.label in classes
        assert row.confidence is not None and 0.0 < row.confidence <= 1.0
        assert len(row.top_k) == 3
        labels = [pair[0] for pair in row.top_k]
        probs = [pair[1] for pair in row.top_k]
        assert labels[0] == row.label and probs[0] == pytest.approx(row.confidence)
        assert probs == sorted(probs, reverse=True) and set(labels) <= classes
        assert row.file_sha256 == hashlib.sha256(Path(row.path).read_bytes()).hexdigest()
    assert sum(r.error is not None for r in rows) == len(inbox.broken)


def _db_predictions(stack: Stack, job_id: int) -> list[PredictionRow]:
    with stack.session() as s:
        return list(s.scalars(
            select(PredictionRow).where(PredictionRow.job_id == job_id)
            .order_by(PredictionRow.item_index)
        ).all())


def _assert_csv_matches_rows(text: str, rows: list[PredictionRow]) -> None:
    reader = csv.DictReader(text.splitlines())
    assert reader.fieldnames == ["item_index", "path", "label", "confidence", "top_k", "error",
                                 "explanation"]
    exported = list(reader)
    assert len(exported) == len(rows)
    for line, row in zip(exported, rows, strict=True):
        assert int(line["item_index"]) == row.item_index
        assert line["path"] == row.path
        assert (line["label"] or None) == row.label
        if row.confidence is None:
            assert line["confidence"] == ""
        else:
            assert float(line["confidence"]) == row.confidence  # exact: written with repr
        assert json.loads(line["top_k"]) == [list(p) for p in (row.top_k or [])]
        assert (line["error"] or None) == row.error


def test_results_csv_export_equals_database_rows(
    stack: Stack, classified: Classified, tmp_path: Path
) -> None:
    job_id = classified.job["id"]
    out = tmp_path / "f.csv"
    stack.cli.run("results", str(job_id), "--format", "csv", "--out", str(out))
    rows = _db_predictions(stack, job_id)
    _assert_csv_matches_rows(out.read_text(encoding="utf-8"), rows)

    # The JSON export carries the same rows.
    exported = stack.cli.run("results", str(job_id), "--format", "json").json()
    assert [(p["item_index"], p["path"], p["label"], p["confidence"], p["error"])
            for p in exported] == [
        (r.item_index, r.path, r.label, r.confidence, r.error) for r in rows]


def test_http_api_serves_the_same_job_and_csv(
    stack: Stack, classified: Classified, tmp_path: Path
) -> None:
    port = free_port()
    api = stack.services.start(
        "api", mriq_argv("api", "--port", str(port)), stack.cli.env, stack.root
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    job_id = classified.job["id"]
    try:
        with httpx.Client(base_url=base, timeout=30) as client:

            def healthy() -> bool:
                assert api.alive(), api.log()
                try:
                    return client.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, timeout=60, what="the API to answer /health")
            assert client.get(f"/jobs/{job_id}").status_code == 401
            job = client.get(f"/jobs/{job_id}", headers=headers).json()
            assert job["status"] == "succeeded"
            assert job["progress_done"] == job["progress_total"] == classified.job["progress_total"]
            page = client.get(f"/jobs/{job_id}/predictions", headers=headers,
                              params={"limit": 10}).json()
            assert page["total"] == classified.job["progress_total"]
            response = client.get(f"/jobs/{job_id}/predictions", headers=headers,
                                  params={"format": "csv"})
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/csv")
        cli_csv = tmp_path / "cli.csv"
        stack.cli.run("results", str(job_id), "--format", "csv", "--out", str(cli_csv))
        assert response.text == cli_csv.read_text(encoding="utf-8")
        _assert_csv_matches_rows(response.text, _db_predictions(stack, job_id))
    finally:
        api.stop()


def test_evaluate_records_a_report(stack: Stack, production_model: int) -> None:
    data = synthesise(stack.root / "eval-data", per_folder=1, seed=7)
    n_files = sum(1 for p in data.rglob("*") if p.is_file() and p.suffix != "")
    result = stack.cli.run(
        "evaluate", "--model", str(production_model), "--data", str(data), "--wait", "--json"
    )
    assert EMBEDDED_NOTE not in result.stderr, result.describe()
    job = result.json()
    assert job["status"] == "succeeded" and job["kind"] == "evaluate", job
    with stack.session() as s:
        reports = s.scalars(
            select(EvaluationReport).where(EvaluationReport.job_id == job["id"])
        ).all()
        assert len(reports) == 1
        report = reports[0]
        assert report.model_version_id == production_model
        assert report.dataset is not None and Path(report.dataset) == data
        artifacts = repository.list_artifacts(s, job["id"])
    assert report.accuracy is not None and 0.0 <= report.accuracy <= 1.0
    assert report.macro_f1 is not None and 0.0 <= report.macro_f1 <= 1.0
    body = report.report
    assert body["n"] == n_files == 44
    assert body["accuracy"] == pytest.approx(report.accuracy)
    assert sum(map(sum, body["confusion_matrix"])) == body["n"]
    assert len(body["classes"]) == 15
    assert artifacts and all(Path(a.path).is_file() for a in artifacts)
    shown = stack.cli.run("jobs", "show", str(job["id"]), "--json").json()
    assert shown["evaluation"]["accuracy"] == pytest.approx(report.accuracy)


def test_cancel_a_running_classify_job(stack: Stack, production_model: int, inbox: Inbox) -> None:
    # Small chunks (many tasks) over the inbox listed four times: long enough to catch running.
    chunk = 4
    submitted = stack.cli.run(
        "classify", *([str(inbox.folder)] * 4), "--json", env={"MRIQ_CHUNK_SIZE": str(chunk)}
    ).json()
    job_id = int(submitted["id"])
    total = 4 * (N_GOOD + len(inbox.broken))

    def recorded() -> int:
        with stack.session() as s:
            job = repository.get_job(s, job_id)
            assert job.status in (JobStatus.QUEUED, JobStatus.RUNNING), (
                f"job finished ({job.status}) before it could be cancelled"
            )
            return repository.count_predictions(s, job_id) >= 3 * chunk

    wait_until(recorded, timeout=120, interval=0.1, what="the classify job to record rows")
    before = {r.item_index: (r.path, r.label, r.confidence, r.error)
              for r in _db_predictions(stack, job_id)}
    cancelled = stack.cli.run("jobs", "cancel", str(job_id), "--json").json()
    assert cancelled["id"] == job_id

    waited = stack.cli.run("jobs", "wait", str(job_id), "--timeout", "120", "--json", expect=1)
    job = waited.json()
    assert job["status"] == "cancelled", waited.describe()
    assert job["cancel_requested"] is True

    with stack.session() as s:
        after = {r.item_index: (r.path, r.label, r.confidence, r.error)
                 for r in _db_predictions(stack, job_id)}
        count = s.scalar(
            select(func.count()).select_from(PredictionRow).where(PredictionRow.job_id == job_id)
        )
        chunks = repository.list_chunks(s, job_id)
        db_job = repository.get_job(s, job_id)
    # Rows recorded before the cancel are kept unchanged; the job did not process everything.
    assert before.items() <= after.items()
    assert count == len(after) < total
    assert db_job.progress_total == total and db_job.progress_done == count
    assert db_job.finished_at is not None
    statuses = {c.status for c in chunks}
    assert ChunkStatus.CANCELLED in statuses
    assert not statuses & {ChunkStatus.PENDING, ChunkStatus.RUNNING}, statuses
    # The worker is still healthy afterwards.
    assert stack.worker.alive(), stack.worker.log()


def test_flower_lists_the_worker_with_basic_auth(stack: Stack) -> None:
    port = free_port()
    flower = stack.services.start(
        "flower", mriq_argv("flower", "--port", str(port)), stack.cli.env, stack.root
    )
    url = f"http://127.0.0.1:{port}/api/workers"
    try:
        with httpx.Client(timeout=15) as client:

            def listed() -> bool:
                assert flower.alive(), f"flower exited:\n{flower.log()}"
                try:
                    response = client.get(url, auth=FLOWER_AUTH, params={"refresh": "true"})
                except httpx.TransportError:
                    return False
                return response.status_code == 200 and stack.hostname in response.json()

            wait_until(listed, timeout=60, interval=1.0,
                       what=f"Flower to list {stack.hostname}")
            assert client.get(url).status_code == 401
            assert client.get(url, auth=(FLOWER_AUTH[0], "wrong")).status_code == 401
    finally:
        flower.stop()
