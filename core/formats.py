"""File formats mriq reads, as a torch- and numpy-free module: the control plane (scheduler)
filters folder and glob inputs with the same list the readers in core.imaging accept."""

from __future__ import annotations

from typing import Literal

#: Formats ``mriq models export`` writes (core.export); torch-free here for the scheduler.
ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("onnx", "torchscript")
#: File suffix of each export format.
EXPORT_SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".dcm"}
)
