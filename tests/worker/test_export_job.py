"""``mriq.export`` through a real worker: the verified file recorded for the model version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import load_checkpoint
from core.export import run_exported, sample_batch
from scheduler import repository, submission
from scheduler.dispatch import Dispatcher
from scheduler.schema import JobStatus
from tests.worker.conftest import (
    StartWorker,
    TinyModel,
    make_settings,
    migrated_factory,
    wait_until,
)
from tests.worker.test_classify import _job, _register_model


@pytest.mark.slow
def test_export_job_records_a_verified_onnx_file(
    tmp_path: Path, sqlite_url: str, start_worker: StartWorker, tiny_model: TinyModel
) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    factory = migrated_factory(sqlite_url)
    version_id = _register_model(factory, tiny_model)
    worker = start_worker(settings)
    dispatcher = Dispatcher(settings)
    try:
        job_id = submission.submit_export(factory, dispatcher, settings, version_id, "onnx")
        wait_until(
            lambda: _job(factory, job_id)[0].is_terminal,
            timeout=120,
            what=f"export job {job_id}; worker log:\n{worker.log()}",
        )
        assert _job(factory, job_id)[0] == JobStatus.SUCCEEDED, worker.log()
        with factory() as session:
            (artifact,) = repository.list_model_artifacts(
                session, version_id, repository.EXPORT_ARTIFACT
            )
            assert artifact.job_id == job_id
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
    path = Path(artifact.path)
    assert path == settings.jobs_dir / str(job_id) / f"model-{version_id}.onnx"
    ckpt = load_checkpoint(tiny_model.path, expected_sha256=tiny_model.sha256)
    x = sample_batch(ckpt, 3, seed=7)
    ckpt.model.eval()
    with torch.inference_mode():
        expected = ckpt.model(x).numpy()
    np.testing.assert_allclose(run_exported(path.read_bytes(), "onnx", x), expected, atol=1e-4)
