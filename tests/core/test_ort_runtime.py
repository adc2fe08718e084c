"""core.ort_runtime: ONNX Runtime as the predictor's forward pass gives the torch answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.inference import Predictor
from core.ort_runtime import OrtModel, cached_onnx_export, onnx_cache_path
from tests.core.test_inference import make_tiny_checkpoint_file, write_gray_png


def test_onnxruntime_predictions_equal_torch_ones(tmp_path: Path) -> None:
    from core.checkpoint import load_checkpoint

    path, sha = make_tiny_checkpoint_file(tmp_path)
    ckpt = load_checkpoint(path, expected_sha256=sha)
    images = [write_gray_png(tmp_path / f"img{i}.png", seed=i) for i in range(5)]
    onnx = cached_onnx_export(ckpt, path)
    assert onnx == onnx_cache_path(path, sha) and onnx.exists()
    mtime = onnx.stat().st_mtime_ns
    assert cached_onnx_export(ckpt, path).stat().st_mtime_ns == mtime  # reused, not redone
    torch_rows = list(Predictor(ckpt, batch_size=2).predict(images))
    ort_rows = list(Predictor(ckpt, batch_size=2, forward_model=OrtModel(onnx)).predict(images))
    assert [r.label for r in ort_rows] == [r.label for r in torch_rows]
    for a, b in zip(ort_rows, torch_rows, strict=True):
        assert a.ok and b.ok
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-4)
        np.testing.assert_allclose(
            [p for _, p in a.top_k], [p for _, p in b.top_k], atol=1e-4
        )
