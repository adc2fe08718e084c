"""core.export: verified ONNX / TorchScript exports of a tiny resnet18 checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from core.export import (
    ExportVerificationError,
    export_model,
    run_exported,
    sample_batch,
)
from tests.core.test_inference import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory):  # -> LoadedCheckpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_the_checkpoint_at_any_batch_size(ckpt, tmp_path: Path, fmt) -> None:
    out = tmp_path / f"model.{fmt}"
    result = export_model(ckpt, out, format=fmt)
    data = out.read_bytes()
    assert result.path == out and result.format == fmt
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.max_abs_diff <= 1e-4
    # The batch axis is dynamic: a batch of 5 (not the sample's 2) runs and matches.
    x = sample_batch(ckpt, 5, seed=1)
    ckpt.model.eval()
    with torch.inference_mode():
        expected = ckpt.model(x).numpy()
    got = run_exported(data, fmt, x)
    assert got.shape == (5, len(ckpt.meta.classes))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_failing_verification_raises_and_writes_nothing(ckpt, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    # atol 0 cannot be met by ORT's different kernels: the difference is named.
    with pytest.raises(ExportVerificationError, match="differs from the checkpoint by") as info:
        export_model(ckpt, out, format="onnx", atol=0.0)
    assert info.value.max_abs_diff > 0.0
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_format_is_refused(ckpt, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(ckpt, tmp_path / "m.x", format="tflite")  # type: ignore[arg-type]
