"""One training epoch of :mod:`core.training`: the optimizer steps over the sampler."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from core.config import TrainConfig
from core.optimization import Optimization
from core.resume import Progress
from core.training_data import TrainingData
from core.validation import Placement

__all__ = ["EpochRun", "TrainingDivergedError", "train_epoch"]


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN/inf; the run cannot continue meaningfully."""


@dataclass(frozen=True)
class EpochRun:
    """What an epoch works on (``progress.global_step`` advances with every batch)."""

    model: nn.Module
    data: TrainingData
    opt: Optimization
    placement: Placement
    progress: Progress
    config: TrainConfig
    device: torch.device
    should_stop: Callable[[], bool]
    on_batch: Callable[[int, int], None] | None


def train_epoch(run: EpochRun, epoch: int) -> float | None:
    """One pass over the sampler: the mean training loss, or None when cancelled part-way.
    Raises :class:`TrainingDivergedError` when the loss is not finite (without AMP, whose
    scaler skips such steps itself)."""
    cfg = run.config
    set_epoch = getattr(run.data.train_dataset, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)
    run.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    seen = 0
    total = run.data.steps_per_epoch
    for index, batch in enumerate(run.data.train_loader):
        if run.should_stop():
            return None
        images, labels = run.placement.to_device(batch[0], batch[1])
        run.opt.optimizer.zero_grad(set_to_none=True)
        with run.placement.autocast():
            logits = run.model(images)
            loss = run.opt.criterion(logits, labels)
        run.opt.scaler.scale(loss).backward()
        if cfg.clip != "none":
            # Unscale first so the threshold applies to the true gradients under AMP.
            run.opt.scaler.unscale_(run.opt.optimizer)
            if cfg.clip == "norm":
                nn.utils.clip_grad_norm_(run.opt.params, cfg.clip_value)
            else:
                nn.utils.clip_grad_value_(run.opt.params, cfg.clip_value)
        run.opt.scaler.step(run.opt.optimizer)
        run.opt.scaler.update()
        if run.opt.batch_scheduler is not None and (
            run.opt.plateau is None or run.progress.global_step < run.opt.warmup_steps
        ):
            # With "plateau" the per-batch scheduler only drives the warm-up; afterwards
            # ReduceLROnPlateau owns the LR.
            run.opt.batch_scheduler.step()
        run.progress.global_step += 1
        loss_sum += loss.detach().double() * labels.shape[0]
        seen += labels.shape[0]
        if run.on_batch is not None:
            run.on_batch(index + 1, total)
    train_loss = float(loss_sum.item()) / max(seen, 1)
    if not math.isfinite(train_loss) and not run.opt.scaler.is_enabled():
        raise TrainingDivergedError(
            f"training loss became {train_loss} in epoch {epoch + 1}; lower the learning "
            f"rate (now {cfg.lr}) or enable gradient clipping"
        )
    return train_loss
