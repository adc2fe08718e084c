"""ONNX Runtime as the forward pass of :class:`core.inference.Predictor` (issue 14).

:class:`OrtModel` is a drop-in for the torch module the predictor runs: called with a batch
of preprocessed images (any layout, on the CPU) it returns the logits as a float32 tensor.
Preprocessing and calibration (the temperature) stay in the predictor, so both runtimes
share them and differ only in the kernels. :func:`cached_onnx_export` makes the ONNX file
once per checkpoint (keyed by its sha256) next to it, verified by :func:`core.export.export_model`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.export import export_model, input_name

if TYPE_CHECKING:
    from core.checkpoint import LoadedCheckpoint

__all__ = ["OrtModel", "cached_onnx_export", "onnx_cache_path"]

_export_lock = threading.Lock()


class OrtModel:
    """An ONNX Runtime session over an exported model, called like the torch module."""

    def __init__(self, path: Path | str, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between runs: spinning intra-op threads starve the decode thread
        # and any torch work in the process (measured: eager torch beside a spinning
        # session ran at a quarter of its speed).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self._session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = input_name()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # The graph takes plain NCHW float32; a channels-last batch is made contiguous here.
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        (logits,) = self._session.run(None, {self._input: x})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def onnx_cache_path(checkpoint_path: Path | str, sha256: str) -> Path:
    """Where the ONNX export of a checkpoint is cached: beside it, named by its sha256, so a
    checkpoint replaced in place never reuses the old export."""
    path = Path(checkpoint_path)
    return path.parent / f"{path.stem}.{sha256[:16]}.onnx"


def cached_onnx_export(ckpt: LoadedCheckpoint, checkpoint_path: Path | str) -> Path:
    """The verified ONNX export of ``ckpt`` (exported on first use, then reused)."""
    out = onnx_cache_path(checkpoint_path, ckpt.sha256)
    with _export_lock:
        if not out.exists():
            export_model(ckpt, out, format="onnx")
    return out
