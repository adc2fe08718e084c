"""Validation passes of a training run: loss, accuracy and macro-F1 for model selection, and
the raw logits that calibration fits its temperature on. Both read the validation loader
with the run's :class:`Placement` (device, autocast, memory layout)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from core.evaluation import EvaluationCancelled

__all__ = ["Placement", "macro_f1", "val_logits", "validate"]


@dataclass(frozen=True)
class Placement:
    """Where and how a run's batches are computed."""

    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype
    channels_last: bool

    def to_device(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean F1 over the classes present in ``y_true`` or ``y_pred`` (``sklearn.metrics``)."""
    from sklearn.metrics import f1_score

    if len(y_true) == 0 and len(y_pred) == 0:
        return 0.0  # sklearn refuses empty input
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


@torch.inference_mode()
def validate(
    model: nn.Module,
    loader: DataLoader[Any],
    placement: Placement,
    *,
    loss_weights: torch.Tensor | None,
    should_stop: Callable[[], bool],
) -> tuple[float, float, float] | None:
    """(val_loss, accuracy, macro_f1); None when cancelled part-way."""
    model.eval()
    loss_sum = 0.0
    weight_sum = 0.0
    y_true: list[int] = []
    y_pred: list[int] = []
    for batch in loader:
        if should_stop():
            return None
        images, labels = placement.to_device(batch[0], batch[1])
        with placement.autocast():
            logits = model(images)
        logits = logits.float()
        # Weighted mean over the whole split (not a mean of batch means), matching how
        # CrossEntropyLoss(weight=...) averages within one batch.
        loss_sum += float(F.cross_entropy(logits, labels, weight=loss_weights, reduction="sum"))
        if loss_weights is not None:
            weight_sum += float(loss_weights[labels].sum())
        else:
            weight_sum += labels.shape[0]
        y_true.extend(labels.tolist())
        y_pred.extend(logits.argmax(dim=1).tolist())
    val_loss = loss_sum / weight_sum if weight_sum > 0 else float("nan")
    accuracy = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if y_true else 0.0
    return val_loss, accuracy, macro_f1(y_true, y_pred)


@torch.inference_mode()
def val_logits(
    model: nn.Module,
    loader: DataLoader[Any],
    placement: Placement,
    *,
    n_classes: int,
    should_stop: Callable[[], bool],
) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits and labels of the validation split; EvaluationCancelled on should_stop."""
    model.eval()
    logits: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in loader:
        if should_stop():
            raise EvaluationCancelled("cancelled during calibration")
        images, target = placement.to_device(batch[0], batch[1])
        with placement.autocast():
            out = model(images)
        logits.append(out.float().cpu().numpy())
        labels.append(target.cpu().numpy())
    if not logits:
        return np.zeros((0, n_classes)), np.zeros(0, dtype=np.int64)
    return np.concatenate(logits), np.concatenate(labels)
