"""Submission: input expansion, confinement, limits, and the stored job + dispatched tasks.

Real SQLite (and PostgreSQL for the services-marked test) and a real Dispatcher on the
embedded filesystem broker in tmp: no worker is needed, the sent task messages are counted as
files in the broker's queue folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from scheduler import expansion, repository, submission
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.dispatch import Dispatcher
from scheduler.paths import PathOutsideRootsError
from scheduler.schema import Job, JobChunk, JobItem, JobKind, JobStatus
from scheduler.settings import Settings
from tests.scheduler.api_factories import touch_file


def _settings(tmp_path: Path, root: Path, url: str, **kw: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "state",
        database_url=url,
        data_roots=(root,),
        **kw,
    )


@pytest.fixture
def settings(tmp_path: Path, root: Path, sqlite_url: str) -> Settings:
    return _settings(tmp_path, root, sqlite_url, chunk_size=2, max_paths_per_job=10)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def dispatcher(settings: Settings) -> Iterator[Dispatcher]:
    d = Dispatcher(settings)
    yield d
    d.close()


def _queued(settings: Settings, queue: str) -> int:
    folder = Path(settings.data_dir) / "broker" / "queue"
    return len(list(folder.glob(f"*.{queue}.msg"))) if folder.exists() else 0


def _model(sessions: sessionmaker[Session], *, promote: bool = True) -> int:
    with sessions() as s, s.begin():
        train = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/x"})
        version = repository.register_model_version(
            s, training_job_id=train.id, arch="resnet18", label_mode="15",
            classes=["Normal", "Glioblastoma"], checkpoint_path="/x/best.pt",
            checkpoint_sha256="0" * 64, metrics={"accuracy": 0.5},
        )
        if promote:
            repository.promote_model_version(s, version.id)
        return int(version.id)


def _counts(sessions: sessionmaker[Session]) -> tuple[int, int, int]:
    with sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(Job).where(Job.kind == JobKind.CLASSIFY)),
            s.scalar(select(func.count()).select_from(JobItem)),
            s.scalar(select(func.count()).select_from(JobChunk)),
        )  # type: ignore[return-value]


def test_glob_is_lazy_and_stops_at_the_limit(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    for d in range(6):
        for i in range(4):
            touch_file(root / f"d{d}" / f"img_{i}.png")
    expanded = expansion.expand_inputs([str(root / "**" / "*.png")], [root])
    first = next(expanded)
    assert first == str(root / "d0" / "img_0.png")
    # Nothing beyond the first folder was listed yet: folders removed now are never seen
    # (the old code had sorted every match of the whole tree before yielding one).
    import shutil

    for d in range(1, 6):
        shutil.rmtree(root / f"d{d}")
    assert list(expanded) == [str(root / "d0" / f"img_{i}.png") for i in range(1, 4)]
    # More matches than settings.max_paths_per_job (10): refused, nothing stored.
    for d in range(6):
        for i in range(4):
            touch_file(root / f"d{d}" / f"img_{i}.png")
    model_id = _model(sessions)
    with pytest.raises(submission.TooManyInputsError, match="at most 10"):
        submission.submit_classify(
            sessions, dispatcher, settings, [str(root / "**" / "*.png")],
            model_version_id=model_id,
        )
    # One folder holding more images than a job may take is refused while it is read.
    for i in range(30):
        touch_file(root / "flat" / f"f_{i:02d}.png")
    with pytest.raises(submission.TooManyInputsError):
        submission.submit_classify(
            sessions, dispatcher, settings, [str(root / "flat")], model_version_id=model_id
        )
    assert _counts(sessions)[0] == 0


def test_submit_classify_stores_items_chunks_and_dispatches(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    model_id = _model(sessions)
    a = touch_file(root / "a.png")
    touch_file(root / "sub" / "b.png")
    inputs = [str(a), str(root / "sub"), str(root / "missing.png"), str(a), str(root / "sub")]
    job_id = submission.submit_classify(
        sessions, dispatcher, settings, inputs, submitter="me", top_k=2
    )
    with sessions() as s:
        job = repository.get_job(s, job_id)
        assert job.kind == JobKind.CLASSIFY
        assert job.status == JobStatus.QUEUED
        assert job.model_version_id == model_id  # the production model by default
        assert job.submitter == "me"
        assert job.params["top_k"] == 2
        assert job.progress_total == 5
        items = list(repository.iter_job_items(s, job_id))
        chunks = repository.list_chunks(s, job_id)
    b = str(root / "sub" / "b.png")
    # Duplicates stay separate items; the missing file is an item (it becomes an error row).
    assert items == list(enumerate([str(a), b, str(root / "missing.png"), str(a), b]))
    assert [(c.start_index, c.stop_index) for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    assert _queued(settings, "gpu") == len(chunks)


def test_submit_classify_explicit_model_and_unknown_model(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    model_id = _model(sessions, promote=False)
    touch_file(root / "a.png")
    job_id = submission.submit_classify(
        sessions, dispatcher, settings, [str(root / "a.png")], model_version_id=model_id
    )
    with sessions() as s:
        assert repository.get_job(s, job_id).model_version_id == model_id
    with pytest.raises(repository.NotFoundError):
        submission.submit_classify(
            sessions, dispatcher, settings, [str(root / "a.png")], model_version_id=999
        )


def test_submit_classify_without_production_model(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    _model(sessions, promote=False)
    with pytest.raises(submission.NoProductionModelError, match="promote"):
        submission.submit_classify(sessions, dispatcher, settings, [str(root / "a.png")])
    assert _counts(sessions) == (0, 0, 0)


def test_refused_outside_roots_stores_nothing(
    root: Path,
    outside: Path,
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
) -> None:
    _model(sessions)
    touch_file(root / "a.png")
    with pytest.raises(PathOutsideRootsError):
        submission.submit_classify(
            sessions, dispatcher, settings, [str(root / "a.png"), str(outside / "secret.png")]
        )
    assert _counts(sessions) == (0, 0, 0)
    assert _queued(settings, "gpu") == 0


def test_too_many_inputs_stores_nothing(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    _model(sessions)
    for i in range(11):  # max_paths_per_job is 10
        touch_file(root / "many" / f"{i:02d}.png")
    with pytest.raises(submission.TooManyInputsError, match="at most 10"):
        submission.submit_classify(sessions, dispatcher, settings, [str(root / "many")])
    assert _counts(sessions) == (0, 0, 0)
    # Exactly at the limit is fine.
    (root / "many" / "10.png").unlink()
    submission.submit_classify(sessions, dispatcher, settings, [str(root / "many")])
    assert _counts(sessions) == (1, 10, 5)


def test_no_inputs_refused(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    _model(sessions)
    (root / "empty").mkdir()
    with pytest.raises(submission.NoInputsError):
        submission.submit_classify(sessions, dispatcher, settings, [str(root / "empty")])
    assert _counts(sessions) == (0, 0, 0)


# ----------------------------------------------------------------------------- train / evaluate


def test_submit_train_validates_and_stores_params(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    data = root / "data"
    data.mkdir()
    job_id = submission.submit_train(
        sessions, dispatcher, settings, data,
        {"arch": "resnet18", "epochs": 2, "image_size": 64, "labels": 44, "seed": 3},
        submitter="t",
    )
    with sessions() as s:
        job = repository.get_job(s, job_id)
    assert job.kind == JobKind.TRAIN
    assert job.params["data"] == str(data)
    assert job.params["arch"] == "resnet18"
    assert job.params["labels"] == "44"
    assert job.params["epochs"] == 2
    assert job.params["device"] == settings.default_device
    assert job.params["warm_start"] is False
    assert _queued(settings, "gpu") == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"arch": "vgg16"}, "arch"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"image_size": 8}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"labels": "12"}, "labels"),
        ({"finetune": "yes"}, "finetune"),
        ({"device": "tpu"}, "device"),
        ({"weights": "/nope/w.pt"}, "outside"),
        ({"optimizer": "sgd"}, "unknown training option"),
        ({"warm_start": True}, "no production model"),
    ],
)
def test_submit_train_refuses_bad_options(
    root: Path,
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
    options: dict[str, Any],
    match: str,
) -> None:
    (root / "data").mkdir()
    with pytest.raises(ValueError, match=match):
        submission.submit_train(sessions, dispatcher, settings, root / "data", options)
    with sessions() as s:
        assert repository.list_jobs(s) == []


def test_submit_train_refuses_bad_data_dir(
    root: Path,
    outside: Path,
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
) -> None:
    with pytest.raises(PathOutsideRootsError):
        submission.submit_train(sessions, dispatcher, settings, outside, {})
    with pytest.raises(submission.InvalidOptionsError, match="not a directory"):
        submission.submit_train(sessions, dispatcher, settings, root / "nope", {})


def test_submit_train_warm_start_records_production_model(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    model_id = _model(sessions)
    (root / "data").mkdir()
    job_id = submission.submit_train(
        sessions, dispatcher, settings, root / "data", {"warm_start": True}
    )
    with sessions() as s:
        job = repository.get_job(s, job_id)
    assert job.params["warm_start"] is True
    assert job.model_version_id == model_id


def test_submit_evaluate_and_cancel(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    model_id = _model(sessions, promote=False)
    (root / "held").mkdir()
    job_id = submission.submit_evaluate(
        sessions, dispatcher, settings, model_version_id=model_id, data_dir=root / "held"
    )
    with sessions() as s:
        job = repository.get_job(s, job_id)
    assert (job.kind, job.model_version_id, job.params) == (
        JobKind.EVALUATE, model_id, {"data": str(root / "held")}
    )
    assert _queued(settings, "gpu") == 1
    with pytest.raises(repository.NotFoundError):
        submission.submit_evaluate(
            sessions, dispatcher, settings, model_version_id=12345, data_dir=root / "held"
        )
    assert submission.cancel_job(sessions, dispatcher, job_id) == "cancelled"
    with pytest.raises(repository.NotFoundError):
        submission.cancel_job(sessions, dispatcher, 9999)


@pytest.mark.services
def test_submit_classify_on_postgresql(
    tmp_path: Path, root: Path, postgres_url: str, outside: Path
) -> None:
    settings = _settings(tmp_path, root, postgres_url, chunk_size=3)
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    dispatcher = Dispatcher(settings)
    try:
        _model(sessions)
        for i in range(7):
            touch_file(root / "f" / f"{i}.png")
        job_id = submission.submit_classify(sessions, dispatcher, settings, [str(root / "f")])
        with sessions() as s:
            assert repository.get_job(s, job_id).progress_total == 7
            assert len(repository.list_chunks(s, job_id)) == 3
        with pytest.raises(PathOutsideRootsError):
            submission.submit_classify(sessions, dispatcher, settings, [str(outside)])
        assert _counts(sessions) == (1, 7, 3)
    finally:
        dispatcher.close()
        engine.dispose()


def test_classify_options_reach_the_job_row(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    touch_file(root / "a.png")
    _model(sessions)
    default_id = submission.submit_classify(sessions, dispatcher, settings, [str(root)])
    chosen_id = submission.submit_classify(
        sessions, dispatcher, settings, [str(root)], review_below=0.25, explain="uncertain"
    )
    with sessions() as s:
        default, chosen = repository.get_job(s, default_id), repository.get_job(s, chosen_id)
        assert default.review_below == 0.6 and default.params["explain"] == "none"
        assert chosen.review_below == 0.25 and chosen.params["explain"] == "uncertain"
    before = _counts(sessions)
    for kwargs in ({"review_below": 2.0}, {"explain": "every"}):
        with pytest.raises(submission.InvalidOptionsError, match=f"^{next(iter(kwargs))}: "):
            submission.submit_classify(sessions, dispatcher, settings, [str(root)], **kwargs)
    assert _counts(sessions) == before  # refused before anything was stored


def test_reviews_from_must_name_a_classify_job(
    root: Path, settings: Settings, sessions: sessionmaker[Session], dispatcher: Dispatcher
) -> None:
    (root / "data").mkdir()
    touch_file(root / "a.png")
    _model(sessions)
    classify_id = submission.submit_classify(sessions, dispatcher, settings, [str(root)])
    with sessions() as s:
        train_id = repository.list_jobs(s, kind=JobKind.TRAIN)[0].id
    with pytest.raises(submission.InvalidOptionsError, match="^reviews_from: there is no job 99"):
        submission.submit_train(sessions, dispatcher, settings, root / "data", {"reviews_from": 99})
    with pytest.raises(submission.InvalidOptionsError, match="is a train job, not a classify"):
        submission.submit_train(sessions, dispatcher, settings, root / "data",
                                {"reviews_from": train_id})
    job_id = submission.submit_train(sessions, dispatcher, settings, root / "data",
                                     {"reviews_from": classify_id})
    plain_id = submission.submit_train(sessions, dispatcher, settings, root / "data",
                                       {"with_reviews": True})
    with sessions() as s:
        params = repository.get_job(s, job_id).params
        assert params["reviews_from"] == classify_id and params["with_reviews"] is True
        plain = repository.get_job(s, plain_id).params
        assert plain["with_reviews"] is True and plain["reviews_from"] is None
