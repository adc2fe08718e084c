"""MRIQ_RUNTIME=onnxruntime: a worker classifies through ONNX Runtime, same answers as torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.checkpoint import load_checkpoint
from core.inference import Predictor
from core.ort_runtime import onnx_cache_path
from scheduler import repository
from scheduler.dispatch import Dispatcher
from scheduler.schema import JobStatus
from tests.worker.conftest import (
    StartWorker,
    TinyModel,
    make_settings,
    migrated_factory,
    wait_until,
    write_images,
)
from tests.worker.test_classify import _create_classify_job, _job, _register_model


@pytest.mark.slow
def test_onnxruntime_worker_matches_the_torch_predictor(
    tmp_path: Path, sqlite_url: str, start_worker: StartWorker, tiny_model: TinyModel
) -> None:
    base = make_settings(tmp_path, database_url=sqlite_url, broker_url=None)
    settings = base.model_copy(update={"runtime": "onnxruntime"})
    factory = migrated_factory(sqlite_url)
    paths = write_images(tmp_path / "images", 6)
    version_id = _register_model(factory, tiny_model)
    job_id, n_chunks = _create_classify_job(factory, version_id, paths)
    worker = start_worker(settings)
    dispatcher = Dispatcher(settings)
    try:
        dispatcher.classify_chunks(job_id, range(n_chunks))
        wait_until(
            lambda: _job(factory, job_id)[0].is_terminal,
            timeout=120,
            what=f"job {job_id} to finish; worker log:\n{worker.log()}",
        )
        assert _job(factory, job_id)[0] == JobStatus.SUCCEEDED, worker.log()
        with factory() as session:
            rows = repository.list_predictions(session, job_id, limit=100)
    finally:
        dispatcher.close()
        factory.kw["bind"].dispose()
    # The export was made on first use, beside the checkpoint, named by its sha256.
    assert onnx_cache_path(tiny_model.path, tiny_model.sha256).exists()
    ckpt = load_checkpoint(tiny_model.path, expected_sha256=tiny_model.sha256)
    expected = list(Predictor(ckpt, batch_size=8).predict(paths))
    assert [r.label for r in rows] == [p.label for p in expected]
    np.testing.assert_allclose(
        [r.confidence for r in rows], [p.confidence for p in expected], atol=1e-4
    )
