"""The bad-input corpus (tests/badinput.py) as one classify job through the real stack.

Submitted with ``scheduler.submission.submit_classify`` and run by a real ``python -m worker``
process: every input gets exactly one row (a prediction, or an error naming the reason), the
worker survives, the job ends ``succeeded``. Embedded filesystem broker + SQLite always;
Redis + PostgreSQL (which rejects the surrogates Python uses for non-UTF-8 file names) with
the ``services`` mark.

Also: the symlink out of the data root is refused at submission (nothing stored); the
10,000-line list is accepted at submission level (items stored = lines, missing and non-UTF-8
lines included); train jobs on an empty folder / a single-class data set fail with the
reason before any epoch, a data set with bad files trains (they are skipped with warnings).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler import export, pathtext, repository, submission
from scheduler.dispatch import TRAIN_TASK, Dispatcher
from scheduler.paths import PathOutsideRootsError
from scheduler.schema import JobKind, JobStatus
from scheduler.settings import Settings
from tests.badinput import (
    BadInput,
    make_corpus,
    make_dataset_with_bad_files,
    make_empty_folder,
    make_list_file,
    make_single_class_dataset,
    non_utf8_name,
)
from tests.worker.conftest import (
    StartWorker,
    TinyModel,
    migrated_factory,
    register_tiny_model,
    wait_until,
    write_images,
)

# What the scheduler makes of corpus kinds whose job outcome differs from core's.
JOB_OUTCOME: dict[str, tuple[str, str | None]] = {
    # A folder input is expanded to the images inside it (here one valid PNG).
    "directory_named_jpg": ("prediction", None),
}
LIST_LINES = 300
LIST_MISSING_EVERY = 97


def _settings(tmp_path: Path, root: Path, url: str, broker: str | None, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=url, broker_url=broker,
                    data_roots=(root,), chunk_size=64, task_max_retries=1, **kw)


def _register(factory: sessionmaker[Session], model: TinyModel) -> int:
    with factory.begin() as session:
        train = repository.create_job(session, kind=JobKind.TRAIN, params={"data": "/d"})
        version = register_tiny_model(session, model, training_job_id=train.id)
        return int(version.id)


def _count_jobs(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return len(repository.list_jobs(session, kind=JobKind.CLASSIFY, limit=1000))


@pytest.fixture
def dispatcher_for() -> Iterator[Any]:
    made: list[Dispatcher] = []

    def make(settings: Settings) -> Dispatcher:
        made.append(Dispatcher(settings))
        return made[-1]

    yield make
    for d in made:
        d.close()


def _run_corpus_job(
    tmp_path: Path, url: str, broker: str | None, tiny_model: TinyModel,
    start_worker: StartWorker, dispatcher_for: Any,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    corpus = make_corpus(root / "corpus", outside_root=outside)
    list_path, n_missing = make_list_file(root / "list", n=LIST_LINES,
                                          missing_every=LIST_MISSING_EVERY)
    settings = _settings(tmp_path, root, url, broker)
    factory = migrated_factory(url)
    model_id = _register(factory, tiny_model)
    dispatcher = dispatcher_for(settings)

    # The symlink out of the data root: refused at submission, nothing stored or read.
    link = next(e for e in corpus if e.kind == "symlink_outside_root")
    with pytest.raises(PathOutsideRootsError):
        submission.submit_classify(factory, dispatcher, settings, [str(link.path)],
                                   model_version_id=model_id)
    assert _count_jobs(factory) == 0

    entries = [e for e in corpus if e.kind != "symlink_outside_root"]
    inputs = [str(e.path) for e in entries] + [f"@{list_path}"]
    job_id = submission.submit_classify(factory, dispatcher, settings, inputs,
                                        model_version_id=model_id, top_k=2)
    total = len(entries) + LIST_LINES
    with factory() as session:
        assert repository.get_job(session, job_id).progress_total == total

    worker = start_worker(settings)

    def finished() -> bool:
        with factory() as session:
            return repository.get_job(session, job_id).is_terminal

    wait_until(finished, timeout=240, what=f"classify job {job_id}\n{worker.log()}")
    assert worker.proc.poll() is None, worker.log()  # the worker survived every input
    with factory() as session:
        job = repository.get_job(session, job_id)
        rows = list(repository.iter_predictions(session, job_id))
    assert job.status == JobStatus.SUCCEEDED, (job.status, job.error, worker.log()[-3000:])
    assert [r.item_index for r in rows] == list(range(total))  # exactly one row per input

    outcomes: dict[str, str] = {}
    for entry, row in zip(entries, rows[: len(entries)], strict=True):
        outcomes[entry.kind] = _check_row(entry, row)
    assert len(outcomes) == len(entries)
    print("\n".join(f"{kind:36} {outcome}" for kind, outcome in outcomes.items()))
    _check_special_rows(entries, rows, outcomes)
    _check_list_rows(rows[len(entries):], n_missing)
    _check_csv(factory, job_id, rows)


def _check_row(entry: BadInput, row: Any) -> str:
    expect, reason = JOB_OUTCOME.get(entry.kind, (entry.expect, entry.reason_contains))
    if expect == "prediction":
        assert row.error is None and row.label is not None, (entry.kind, row.error)
        assert row.confidence is not None and len(row.top_k) == 2, entry.kind
        return "prediction"
    assert row.label is None and row.error, (entry.kind, row.label)
    assert reason is not None and reason in row.error.lower(), (entry.kind, row.error)
    return f"error: {row.error}"


def _check_special_rows(entries: list[BadInput], rows: list[Any], outcomes: dict[str, str]) -> None:
    index = {e.kind: i for i, e in enumerate(entries)}
    # The same path twice: two rows, same file, same answer.
    first, again = rows[index["good_png"]], rows[index["same_path_twice"]]
    assert first.path == again.path and first.item_index != again.item_index
    assert (first.label, first.file_sha256) == (again.label, again.file_sha256)
    assert first.file_sha256 is not None
    # Non-UTF-8 name: stored as valid text (\xNN escapes) that maps back to the real file.
    odd = rows[index["non_utf8_file_name"]]
    assert odd.path.endswith("scan_caf\\xe9_\\xff.png"), odd.path
    real = pathtext.filesystem_path(odd.path)
    assert os.fsencode(real).endswith(os.fsencode(non_utf8_name())) and os.path.isfile(real)
    assert odd.file_sha256 is not None and odd.error is None
    # The FIFO got an error row without anyone blocking on it (and no hash).
    assert rows[index["fifo_named_jpg"]].file_sha256 is None


def _check_list_rows(rows: list[Any], n_missing: int) -> None:
    errors = [r for r in rows if r.error]
    assert len(rows) == LIST_LINES and len(errors) == n_missing == LIST_LINES // LIST_MISSING_EVERY
    assert all("missing_" in r.path and "not found" in r.error.lower() for r in errors)
    odd = [r for r in rows if "\\xe9" in r.path]
    assert odd and all(r.error is None and r.label for r in odd)


def _check_csv(factory: sessionmaker[Session], job_id: int, rows: list[Any]) -> None:
    # The CSV export (shared by the CLI and the API) shows the same stored text.
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(export.PREDICTION_COLUMNS)
    with factory() as session:
        for row in repository.iter_predictions(session, job_id):
            writer.writerow(export.prediction_csv_row(row))
    exported = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [r["path"] for r in exported] == [r.path for r in rows]
    assert buffer.getvalue().encode("utf-8")  # valid UTF-8 throughout


def test_corpus_job_on_sqlite_and_filesystem_broker(
    tmp_path: Path, sqlite_url: str, tiny_model: TinyModel, start_worker: StartWorker,
    dispatcher_for: Any,
) -> None:
    _run_corpus_job(tmp_path, sqlite_url, None, tiny_model, start_worker, dispatcher_for)


@pytest.mark.services
def test_corpus_job_on_postgresql_and_redis(
    tmp_path: Path, postgres_url: str, redis_broker: str, tiny_model: TinyModel,
    start_worker: StartWorker, dispatcher_for: Any,
) -> None:
    _run_corpus_job(tmp_path, postgres_url, redis_broker, tiny_model, start_worker,
                    dispatcher_for)


def _wait_rows(factory: sessionmaker[Session], job_id: int, worker: Any) -> tuple[Any, list[Any]]:
    def finished() -> bool:
        with factory() as session:
            return repository.get_job(session, job_id).is_terminal

    wait_until(finished, timeout=240, what=f"classify job {job_id}\n{worker.log()}")
    with factory() as session:
        job = repository.get_job(session, job_id)
        return job, list(repository.iter_predictions(session, job_id))


def test_files_swapped_after_submission_are_refused_when_read(
    tmp_path: Path, sqlite_url: str, tiny_model: TinyModel, start_worker: StartWorker,
    dispatcher_for: Any,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    images = write_images(root / "inbox", 6)
    secret = write_images(outside, 1, seed=7)[0]  # a decodable image: a lure worth reading
    settings = _settings(tmp_path, root, sqlite_url, None)
    factory = migrated_factory(sqlite_url)
    model_id = _register(factory, tiny_model)
    dispatcher = dispatcher_for(settings)
    job_id = submission.submit_classify(factory, dispatcher, settings, [str(root / "inbox")],
                                        model_version_id=model_id)
    # Between submission (which checked every path) and the run (no worker yet): one file
    # becomes a link to a file outside the roots, another a FIFO.
    to_link, to_fifo = images[1], images[4]
    to_link.unlink()
    to_link.symlink_to(secret)
    to_fifo.unlink()
    os.mkfifo(to_fifo)
    worker = start_worker(settings)
    job, rows = _wait_rows(factory, job_id, worker)
    assert job.status == JobStatus.SUCCEEDED, (job.status, job.error, worker.log()[-3000:])
    assert [r.path for r in rows] == [str(p) for p in images]  # one row per item, in order
    by_path = {r.path: r for r in rows}
    linked, fifo = by_path[str(to_link)], by_path[str(to_fifo)]
    assert (linked.label, linked.file_sha256) == (None, None)
    assert linked.error == "leads outside the data roots", linked.error
    assert (fifo.label, fifo.file_sha256) == (None, None)
    assert fifo.error == "not a regular file (FIFO)", fifo.error
    for path in (p for p in images if p not in (to_link, to_fifo)):
        row = by_path[str(path)]
        assert row.error is None and row.label and row.file_sha256, (path, row.error)

    # A bulk folder holding one stray link that leads outside: accepted (not refused whole),
    # the link is an item under its own path and its row an error naming no target.
    stray = root / "inbox" / "img_002b.png"
    stray.symlink_to(secret)
    to_fifo.unlink()
    bulk_id = submission.submit_classify(factory, dispatcher, settings, [str(root / "inbox")],
                                         model_version_id=model_id)
    job, rows = _wait_rows(factory, bulk_id, worker)
    assert job.status == JobStatus.SUCCEEDED, (job.status, job.error, worker.log()[-3000:])
    errors = {r.path: r.error for r in rows if r.error}
    assert errors == {str(to_link): "leads outside the data roots",
                      str(stray): "leads outside the data roots"}
    assert len(rows) == 6 and all(r.file_sha256 for r in rows if not r.error)
    assert not any(str(outside) in (r.error or "") + r.path for r in rows)
    factory.kw["bind"].dispose()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
)
def test_ten_thousand_line_list_is_accepted_at_submission(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, tiny_model: TinyModel,
    dispatcher_for: Any,
) -> None:
    url = request.getfixturevalue(f"{backend}_url" if backend == "sqlite" else "postgres_url")
    root = tmp_path / "root"
    list_path, n_missing = make_list_file(root / "list")
    settings = _settings(tmp_path, root, url, None, max_paths_per_job=10_000)
    factory = migrated_factory(url)
    model_id = _register(factory, tiny_model)
    job_id = submission.submit_classify(factory, dispatcher_for(settings), settings,
                                        [f"@{list_path}"], model_version_id=model_id)
    with factory() as session:
        items = [p for _, p in repository.iter_job_items(session, job_id)]
        assert repository.get_job(session, job_id).progress_total == 10_000
    assert len(items) == 10_000
    assert sum("missing_" in p for p in items) == n_missing
    odd = [p for p in items if "\\xe9" in p]
    assert odd and all(os.path.isfile(pathtext.filesystem_path(p)) for p in odd)
    # One more line than allowed is refused whole, nothing stored.
    small = _settings(tmp_path, root, url, None, max_paths_per_job=9_999)
    with pytest.raises(submission.TooManyInputsError):
        submission.submit_classify(factory, dispatcher_for(small), small, [f"@{list_path}"],
                                   model_version_id=model_id)
    assert _count_jobs(factory) == 1
    factory.kw["bind"].dispose()


def test_train_on_bad_datasets(tmp_path: Path, sqlite_url: str, dispatcher_for: Any) -> None:
    from worker.app import create_celery_app

    root = tmp_path / "root"
    settings = _settings(tmp_path, root, sqlite_url, None, default_device="cpu")
    factory = migrated_factory(sqlite_url)
    options = {"arch": "resnet18", "epochs": 1, "image_size": 32, "batch_size": 4,
               "weights": "none", "device": "cpu"}
    dispatcher = dispatcher_for(settings)
    datasets = {
        "empty": make_empty_folder(root),
        "single_class": make_single_class_dataset(root),
        "bad_files": make_dataset_with_bad_files(root),
    }
    # A file is not a data set: refused at submission.
    (root / "file.png").write_bytes(b"x")
    with pytest.raises(submission.InvalidOptionsError, match="not a directory"):
        submission.submit_train(factory, dispatcher, settings, str(root / "file.png"), options)
    jobs = {name: submission.submit_train(factory, dispatcher, settings, str(path), options)
            for name, path in datasets.items()}
    app = create_celery_app(settings)
    results = {}
    for name, job_id in jobs.items():
        results[name] = app.tasks[TRAIN_TASK].apply(args=[job_id]).result
    with factory() as session:
        got = {name: repository.get_job(session, job_id) for name, job_id in jobs.items()}
        epochs = {name: repository.list_epoch_metrics(session, job_id)
                  for name, job_id in jobs.items()}
    empty, single, bad = got["empty"], got["single_class"], got["bad_files"]
    assert empty.status == JobStatus.FAILED and epochs["empty"] == []
    assert empty.error and single.error
    assert str(datasets["empty"]) in empty.error and "no images found" in empty.error
    assert single.status == JobStatus.FAILED and epochs["single_class"] == []
    assert "at least 2 classes" in single.error and "Glioblastoma" in single.error
    # Bad files (a FIFO, an empty file, text named .png) cost warnings, not the run.
    assert bad.status == JobStatus.SUCCEEDED, (bad.error, results["bad_files"])
    assert [m.epoch for m in epochs["bad_files"]] == [1]
    factory.kw["bind"].dispose()
