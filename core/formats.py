"""File formats mriq reads, as a torch- and numpy-free module: the control plane (scheduler)
filters folder and glob inputs with the same list the readers in core.imaging accept."""

from __future__ import annotations

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".dcm"}
)
