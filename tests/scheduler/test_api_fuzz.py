"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis 4).

Every operation gets generated requests (valid and invalid bodies, paths and queries), with
and without the bearer token, against a real migrated SQLite database and the embedded
filesystem broker (tasks are queued, no worker runs). The only check is the one that
matters for a service facing the network: no 5xx, whatever is sent. The database holds a
production model, a classify job with predictions, a train job with metrics and artifacts,
so generated ids around 1..3 reach the deeper code paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error

from scheduler import repository
from scheduler.api import create_app
from scheduler.database import make_engine, make_session_factory, upgrade
from scheduler.repository import PredictionRecord
from scheduler.schema import JobKind, JobStatus
from scheduler.settings import Settings

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)


def _seed(url: str, root: Path, data_dir: Path) -> None:
    for i in range(3):
        (root / f"img_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    (root / "data" / "Glioblastoma T1").mkdir(parents=True)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as s, s.begin():
            train = repository.create_job(s, kind=JobKind.TRAIN, params={"data": str(root)})
            version = repository.register_model_version(
                s, training_job_id=train.id, arch="resnet18", label_mode="15",
                classes=["Glioblastoma", "Normal"], checkpoint_path=str(data_dir / "m.pt"),
                checkpoint_sha256="c" * 64, metrics={"accuracy": 0.5},
            )
            repository.promote_model_version(s, version.id)
            repository.record_epoch_metric(s, train.id, epoch=1, train_loss=1.0, val_loss=1.0,
                                           val_accuracy=0.5, val_macro_f1=0.5, lr=1e-3,
                                           seconds=1.0)
            plot = data_dir / "jobs" / str(train.id) / "curves.png"
            plot.parent.mkdir(parents=True)
            plot.write_bytes(b"\x89PNG")
            repository.record_artifact(s, job_id=train.id, kind="training_curves",
                                       path=str(plot))
            repository.record_artifact(s, job_id=train.id, kind="report", path="/etc/passwd")
            repository.finish_job(s, train.id, JobStatus.SUCCEEDED)
            job = repository.create_job(s, kind=JobKind.CLASSIFY, params={"top_k": 2},
                                        model_version_id=version.id)
            repository.add_job_items(s, job.id, [str(root / "img_0.png"), str(root / "x.png")],
                                     chunk_size=1)
            repository.record_predictions(s, job.id, [
                PredictionRecord(item_index=0, path=str(root / "img_0.png"), file_sha256=None,
                                 label="Normal", confidence=0.9, top_k=(("Normal", 0.9),),
                                 error=None),
                PredictionRecord(item_index=1, path=str(root / "x.png"), file_sha256=None,
                                 label=None, confidence=None, top_k=(), error="not found"),
            ])
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    tmp = tmp_path_factory.mktemp("fuzz")
    root = tmp / "root"
    root.mkdir()
    url = f"sqlite:///{tmp / 'mriq.db'}"
    upgrade(url)
    app_settings = Settings(data_dir=tmp / "state", database_url=url, data_roots=(root,),
                            chunk_size=4, max_paths_per_job=50,
                            api_token=SecretStr(TOKEN))
    _seed(url, root, app_settings.data_dir)
    yield create_app(app_settings)


@pytest.fixture(scope="module")
def api_schema(fuzz_app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def _operations(api_schema: Any) -> list[Any]:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    return operations


# Operations are driven from a plain test (not ``@schema.parametrize``) so the schema can
# come from a fixture over a tmp database; hypothesis still generates, shrinks and reports.


def test_no_server_error_with_token(api_schema: Any) -> None:
    statuses: list[int] = []
    operations = _operations(api_schema)
    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
            statuses.append(response.status_code)

        run()
    # The fuzz really ran, and got past validation into the handlers, not only 422s.
    assert len(statuses) >= 10 * len(operations)
    assert {200, 403, 404, 422} <= set(statuses), sorted(set(statuses))


def test_no_server_error_without_token(api_schema: Any) -> None:
    for operation in _operations(api_schema):
        _fuzz_anonymous(operation, public=operation.path == "/health")


def _fuzz_anonymous(operation: Any, *, public: bool) -> None:
    @FUZZ
    @given(case=operation.as_strategy())
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=[not_a_server_error])
        if not public:
            assert response.status_code == 401, (case.method, case.path, response.text)

    run()
