"""What the API tests build: settings on a real SQLite file, a registered model, images.

The fixtures using them (``root``, ``settings``, ``sessions``, ``client``) are in
``tests/scheduler/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from scheduler import repository
from scheduler.schema import JobKind
from scheduler.settings import Settings

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def api_settings(tmp_path: Path, root: Path, url: str, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "state", database_url=url, data_roots=(root,),
                    chunk_size=2, max_paths_per_job=5, **kw)


def add_model(sessions: sessionmaker[Session], *, promote: bool = True) -> int:
    with sessions() as s, s.begin():
        train = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d"})
        version = repository.register_model_version(
            s, training_job_id=train.id, arch="resnet18", label_mode="15",
            classes=["Glioblastoma", "Normal"], checkpoint_path="/m/best.pt",
            checkpoint_sha256="c" * 64, metrics={"accuracy": 0.7},
        )
        if promote:
            repository.promote_model_version(s, version.id)
        return int(version.id)


def make_images(root: Path, n: int, folder: str = "imgs") -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"{i:02d}.png").write_bytes(b"x")
    return d


def classify_job_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return len(repository.list_jobs(s, kind=JobKind.CLASSIFY, limit=1000))


def sent_tasks(data_dir: Path) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message waiting in the embedded broker's queue folder."""
    import base64
    import json

    folder = data_dir / "broker" / "queue"
    sent = []
    for path in sorted(folder.glob("*.msg")) if folder.exists() else []:
        message = json.loads(path.read_text("utf-8"))
        body = json.loads(base64.b64decode(message["body"]))
        sent.append((str(message["headers"]["task"]), list(body[0])))
    return sent


def touch_file(path: Path, data: bytes = b"x") -> Path:
    """Write ``data`` to ``path``, making its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
