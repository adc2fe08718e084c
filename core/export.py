"""Export a checkpoint's model to ONNX or TorchScript, verified against the checkpoint.

The export is verified before it replaces anything: the exported file is loaded by its own
runtime (ONNX Runtime for ONNX, ``torch.jit.load`` for TorchScript) and run on a sample
batch; if any logit differs from the eager model's by more than ``atol`` the export is
refused with :class:`ExportVerificationError` and nothing is written at ``out``.

The exported graph is the BatchNorm-folded inference model (:func:`prepare_inference_model`,
the one the torch runtime runs), so both runtimes compute the same function; the logits are
uncalibrated (the temperature is applied by the caller, as :class:`core.inference.Predictor`
does). The batch axis is dynamic.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from core.atomicio import atomic_path
from core.formats import EXPORT_FORMATS, ExportFormat
from core.model_preparation import prepare_inference_model

if TYPE_CHECKING:
    from core.checkpoint import LoadedCheckpoint

__all__ = [
    "EXPORT_FORMATS",
    "ExportFormat",
    "ExportResult",
    "ExportVerificationError",
    "export_model",
    "input_name",
    "run_exported",
    "sample_batch",
]

# The name the exported graph's input carries; core.ort_runtime feeds it.
_INPUT = "images"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    format: ExportFormat
    max_abs_diff: float


class ExportVerificationError(RuntimeError):
    """The exported model's outputs differ from the checkpoint's by more than ``atol``."""

    def __init__(self, fmt: str, max_abs_diff: float, atol: float) -> None:
        super().__init__(
            f"{fmt} export differs from the checkpoint by {max_abs_diff:.3g} "
            f"(more than the allowed {atol:.3g}); nothing was written"
        )
        self.max_abs_diff = max_abs_diff
        self.atol = atol


def input_name() -> str:
    return _INPUT


def sample_batch(ckpt: LoadedCheckpoint, batch: int = 2, *, seed: int = 0) -> torch.Tensor:
    """A deterministic batch shaped like the checkpoint's eval preset's output."""
    size = int(ckpt.meta.preset.image_size)
    gen = torch.Generator().manual_seed(seed)
    # Inputs are normalized images: values of a few units around zero.
    return torch.randn(batch, 3, size, size, generator=gen)


def export_model(
    ckpt: LoadedCheckpoint,
    out: Path,
    *,
    format: ExportFormat,  # noqa: A002 - the agreed keyword (issue 14)
    sample: torch.Tensor | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``ckpt``'s model to ``out`` in ``format``, verified on ``sample``."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, not {format!r}")
    x = (sample if sample is not None else sample_batch(ckpt)).float().cpu().contiguous()
    model = prepare_inference_model(ckpt.model, torch.device("cpu"))
    with torch.inference_mode():
        expected = model(x).float().numpy()
    data = _onnx_bytes(model, x) if format == "onnx" else _torchscript_bytes(model, x)
    got = run_exported(data, format, x)
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not diff <= atol:  # also refuses NaN
        raise ExportVerificationError(format, diff, atol)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, what=f"{format} export") as tmp:
        tmp.write_bytes(data)
    return ExportResult(
        path=out, sha256=hashlib.sha256(data).hexdigest(), format=format, max_abs_diff=diff
    )


def run_exported(data: bytes, fmt: ExportFormat, x: torch.Tensor) -> np.ndarray:
    """Logits of an exported model (its serialized bytes) on ``x``, by its own runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {_INPUT: x.numpy()})
        return np.asarray(outputs[0], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        result: np.ndarray = loaded(x).float().numpy()
    return result


def _onnx_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    # A contiguous copy: the prepared model is cached and shared with running predictors, and
    # plain NCHW weights export as plain constants.
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter at its default opset: it handles these CNNs with a
        # dynamic batch axis and needs no onnxscript rewrite pass.
        torch.onnx.export(
            plain,
            (x,),
            buffer,  # type: ignore[arg-type]  # a file-like object is accepted
            input_names=[_INPUT],
            output_names=["logits"],
            dynamic_axes={_INPUT: {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return buffer.getvalue()


def _torchscript_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    # torch.jit is deprecated in favour of torch.export, but a traced file is what
    # TorchScript consumers (C++ libtorch) load; the warnings say nothing new per call.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, (x,), check_trace=False)  # type: ignore[no-untyped-call]
        torch.jit.save(traced, buffer)
    return buffer.getvalue()
