"""Grad-CAM explanations of a classify job's items, stored as artifacts of the job.

Not wired into a task yet. Files are named by item id (``explanations/<item_id>.png`` and
``.npy`` beside it), so a retried or re-sent chunk overwrites its earlier files instead of
adding copies: the same item always has the same two artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Only for the annotation: the worker's parent process must not import torch (see
    # worker/runtime.py), and a caller holding an Explainer has imported it already.
    from core.explanation import Explainer

__all__ = ["EXPLANATIONS_DIR", "explain_items"]

#: Folder of the explanations inside a job's artifact directory.
EXPLANATIONS_DIR = "explanations"


def explain_items(
    explainer: Explainer, items: Sequence[tuple[int, str]], out_dir: Path
) -> dict[int, str]:
    """Explain ``items`` ((item id, path) pairs); item id -> overlay path relative to
    ``out_dir`` (the job's artifact directory), e.g. ``"explanations/7.png"``.

    Items whose file could not be read or explained are absent from the result (their
    prediction row carries the error already); the map is at the same path with ``.npy``.
    """
    folder = out_dir / EXPLANATIONS_DIR
    names = [str(int(item_id)) for item_id, _ in items]
    results = explainer.explain([path for _, path in items], folder, names=names)
    overlays: dict[int, str] = {}
    for (item_id, _), result in zip(items, results, strict=True):
        if result.overlay_png is not None:
            overlays[item_id] = result.overlay_png.relative_to(out_dir).as_posix()
    return overlays
