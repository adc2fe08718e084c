"""Fixtures for the dashboard's router tests: a real SQLite database, the embedded
filesystem broker (no worker), tiny PNGs inside a data root, seeded jobs and models."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.api import create_app
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind, JobStatus
from scheduler.settings import Settings

CLASSES = ("Glioblastoma", "Meningioma", "Normal")


def web_settings(tmp_path: Path, root: Path, url: str, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "state", database_url=url, data_roots=(root,),
                    chunk_size=4, max_paths_per_job=20, **kw)


@pytest.fixture
def settings(tmp_path: Path, root: Path, sqlite_url: str) -> Settings:
    upgrade(sqlite_url)
    return web_settings(tmp_path, root, sqlite_url)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def write_png(path: Path, *, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random(size) * 30).astype("uint8")  # dark noise
    arr[8:-8, 8:-8] = 200  # a bright "brain" for the crop to find
    Image.fromarray(arr, mode="L").save(path)
    return path


def add_model(sessions: sessionmaker[Session], *, promote: bool = False,
              metrics: dict[str, Any] | None = None) -> int:
    with sessions() as s, s.begin():
        train = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d/train"})
        version = repository.register_model_version(
            s, training_job_id=train.id, arch="resnet18", label_mode="15",
            classes=list(CLASSES), checkpoint_path="/m/best.pt",
            checkpoint_sha256="c" * 64,
            metrics=metrics or {"test_macro_f1": 0.61, "test_accuracy": 0.7},
        )
        repository.finish_job(s, train.id, JobStatus.SUCCEEDED)
        if promote:
            repository.promote_model_version(s, version.id)
        return int(version.id)


@dataclass(frozen=True)
class SeededJob:
    job_id: int
    model_id: int
    paths: tuple[str, ...]


def seed_classify(sessions: sessionmaker[Session], root: Path, *, n: int = 6,
                  errors: int = 1, outside: Path | None = None) -> SeededJob:
    """A finished classify job over ``n`` PNGs in ``root`` (the last ``errors`` are error
    rows); confidences 0.9, 0.8, ... and labels cycling through CLASSES. With ``outside``,
    item 0's recorded path is that file instead."""
    model_id = add_model(sessions, promote=True)
    paths = [str(write_png(root / "inbox" / f"img_{i}.png", seed=i)) for i in range(n)]
    if outside is not None:
        paths[0] = str(outside)
    records = []
    for i, path in enumerate(paths):
        failed = i >= n - errors
        name, conf = CLASSES[i % len(CLASSES)], round(0.9 - 0.1 * i, 3)
        top = ((name, conf), (CLASSES[(i + 1) % 3], 0.05))
        records.append(PredictionRecord(
            item_index=i, path=path, file_sha256=None, label=None if failed else name,
            confidence=None if failed else conf, top_k=() if failed else top,
            error=f"{path}: not an image" if failed else None))
    with sessions() as s, s.begin():
        job = repository.create_job(s, kind=JobKind.CLASSIFY, params={"top_k": 3},
                                    model_version_id=model_id)
        repository.add_job_items(s, job.id, paths, chunk_size=4)
        repository.mark_job_running(s, job.id)
        repository.record_predictions(s, job.id, records)
        for chunk in repository.list_chunks(s, job.id):
            repository.complete_chunk(s, job.id, chunk.chunk_index)
        job_id = int(job.id)
    return SeededJob(job_id, model_id, tuple(paths))
