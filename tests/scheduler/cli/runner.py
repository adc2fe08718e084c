"""Running ``mriq`` in-process (Typer's CliRunner) and the rows its tests start from."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner, Result

from scheduler import repository
from scheduler.cli import app
from scheduler.schema import JobKind

runner = CliRunner()


def mriq(env: dict[str, str], *args: str) -> Result:
    return runner.invoke(app, list(args), env=env)


def make_model(
    sessions: sessionmaker[Session], *, promote: bool = False, acc: float = 0.5
) -> int:
    with sessions() as s, s.begin():
        train = repository.create_job(s, kind=JobKind.TRAIN, params={"data": "/d"})
        version = repository.register_model_version(
            s, training_job_id=train.id, arch="resnet18", label_mode="15",
            classes=["Glioblastoma", "Normal"], checkpoint_path="/m/best.pt",
            checkpoint_sha256="a" * 64, metrics={"accuracy": acc, "macro_f1": acc / 2},
        )
        if promote:
            repository.promote_model_version(s, version.id)
        return int(version.id)



def make_image(root: Path, name: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really an image")
    return path

