"""Grad-CAM explanations of a classify job's items, stored as artifacts of the job.

Which items a classify job explains (``explain`` in its params, one of
``scheduler.options.EXPLAIN_MODES``): ``"uncertain"`` is exactly what enters the review
queue by confidence (error-free and confidence < the job's ``review_below``), ``"all"``
every error-free prediction, ``"none"`` nothing. Files are named by item id (the prediction
row's id: ``explanations/<item_id>.png`` and ``.npy`` beside it), so a retried or re-sent
chunk overwrites its earlier files instead of adding copies, and ``set_explanation``
replaces the row's path: the same item always has the same two files and one artifact row.

An explanation is an extra: a file or batch that cannot be explained is logged and left
without one; it never fails the chunk, whose predictions are recorded already.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from scheduler import repository
from scheduler.pathtext import filesystem_path
from scheduler.schema import Job, PredictionRow

if TYPE_CHECKING:
    # Only for the annotation: the worker's parent process must not import torch (see
    # worker/runtime.py), and a caller holding an Explainer has imported it already.
    from sqlalchemy.orm import Session

    from core.explanation import Explainer

__all__ = [
    "EXPLANATIONS_DIR",
    "explain_items",
    "explain_targets",
    "explanation_targets",
    "record_explanations",
]

log = logging.getLogger(__name__)

#: Folder of the explanations inside a job's artifact directory.
EXPLANATIONS_DIR = "explanations"

#: (item id, stored path) of one prediction to explain.
Target = tuple[int, str]


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
        elif result.error is not None:
            log.warning("item %s not explained: %s", item_id, result.error)
    return overlays


def explanation_targets(
    session: Session, job_id: int, *, mode: str, start: int, stop: int
) -> list[Target]:
    """The predictions of items ``[start, stop)`` of classify job ``job_id`` that ``mode``
    selects and that have no explanation yet (a retry redoes only what is missing)."""
    if mode not in ("uncertain", "all"):
        return []
    stmt = (
        select(PredictionRow.id, PredictionRow.path)
        .where(
            PredictionRow.job_id == job_id,
            PredictionRow.item_index >= start,
            PredictionRow.item_index < stop,
            PredictionRow.error.is_(None),
            PredictionRow.label.is_not(None),
            PredictionRow.explanation.is_(None),
        )
        .order_by(PredictionRow.item_index)
    )
    if mode == "uncertain":
        # The review queue's confidence rule (scheduler.review), flags aside: a flag is set
        # after the job ran, and the on-demand explanation covers it.
        stmt = stmt.join(Job, Job.id == PredictionRow.job_id).where(
            PredictionRow.confidence < Job.review_below
        )
    return [(int(item_id), str(path)) for item_id, path in session.execute(stmt)]


def record_explanations(
    session: Session, job_id: int, out_dir: Path, overlays: dict[int, str]
) -> None:
    """Point each prediction at its overlay (an absolute path in the job folder, as every
    artifact) and record it as the job's artifact (``repository.set_explanation``)."""
    for item_id, relative in sorted(overlays.items()):
        repository.set_explanation(session, item_id, str((out_dir / relative).resolve()))


def explain_targets(
    explainer: Explainer,
    targets: Sequence[Target],
    out_dir: Path,
    *,
    record: Callable[[dict[int, str]], None],
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[], None] = lambda: None,
) -> int:
    """Explain ``targets`` in batches of the explainer's size, ``record`` each batch's
    overlays; stops between batches when ``should_stop()``. Returns the items explained.

    A batch that fails as a whole (an error in the model's backward pass, say) is logged
    and skipped: the predictions stand without explanations.
    """
    done = 0
    size = max(1, int(explainer.batch_size))
    for start in range(0, len(targets), size):
        if should_stop():
            break
        batch = targets[start : start + size]
        try:
            overlays = explain_items(
                explainer, [(i, filesystem_path(p)) for i, p in batch], out_dir
            )
        except Exception:
            first, last = batch[0][0], batch[-1][0]
            log.exception("explaining items %s..%s failed; they stay unexplained", first, last)
            continue
        if overlays:
            record(overlays)
        done += len(overlays)
        on_batch()
    return done
