"""The optimisation side of a training run: loss, optimizer, LR schedule and grad scaler.

The per-batch schedules are closed forms of the step count (:func:`lr_lambda`), so a
resumed run continues the very same schedule; ``plateau`` adds ``ReduceLROnPlateau`` per
epoch after the warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from core.config import TrainConfig
from core.dataset import class_weights

__all__ = ["Optimization", "build_optimization", "lr_lambda"]

# ReduceLROnPlateau: cut the LR 10x after this many epochs without a val macro-F1 gain.
_PLATEAU_PATIENCE = 2
_PLATEAU_FACTOR = 0.1
# "step": decay 10x at every third of the run; "cosine": decay to 1% of the peak LR.
_STEP_GAMMA = 0.1
_COSINE_FLOOR = 0.01


@dataclass(frozen=True)
class Optimization:
    """The objects that change the weights; their state goes into ``last.pt``."""

    #: Class weights of the loss in class-index order (on the run's device), or None.
    loss_weights: torch.Tensor | None
    criterion: CrossEntropyLoss
    params: list[nn.Parameter]
    optimizer: Optimizer
    batch_scheduler: LRScheduler | None
    plateau: ReduceLROnPlateau | None
    scaler: torch.amp.GradScaler
    warmup_steps: int


def lr_lambda(
    scheduler: str, *, warmup_steps: int, total_steps: int, steps_per_epoch: int, epochs: int
) -> Callable[[int], float]:
    """Per-batch LR multiplier: linear warm-up, then the named decay (closed form, so the
    schedule depends only on the step count and survives a resume unchanged)."""
    step_epochs = max(1, math.ceil(epochs / 3))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "cosine":
            span = max(1, total_steps - warmup_steps)
            t = min(1.0, (step - warmup_steps) / span)
            return _COSINE_FLOOR + (1 - _COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * t))
        if scheduler == "step":
            return float(_STEP_GAMMA ** ((step // steps_per_epoch) // step_epochs))
        return 1.0  # "none" and "plateau" (which reduces the LR itself, per epoch)

    return factor


def _loss_weights(
    cfg: TrainConfig, counts: Sequence[int], n_classes: int, device: torch.device
) -> torch.Tensor | None:
    if not cfg.weighted_loss:
        return None
    weights = class_weights(counts).to(torch.float32)
    if weights.shape != (n_classes,):
        raise RuntimeError(
            f"class_weights returned shape {tuple(weights.shape)}, expected ({n_classes},)"
        )
    return weights.to(device)


def _optimizer(cfg: TrainConfig, trainable: list[tuple[str, nn.Parameter]]) -> Optimizer:
    # No weight decay on biases and norm scales: decaying them only hurts (standard
    # practice for AdamW/SGD on CNNs).
    decay = [p for _, p in trainable if p.ndim > 1]
    no_decay = [p for _, p in trainable if p.ndim <= 1]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return AdamW(groups, lr=cfg.lr)


def _schedulers(
    cfg: TrainConfig, optimizer: Optimizer, steps_per_epoch: int, warmup_steps: int
) -> tuple[LRScheduler, ReduceLROnPlateau | None]:
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        # OneCycle has its own warm-up phase; map warmup_epochs onto its pct_start.
        pct = cfg.warmup_epochs / cfg.epochs if 0 < cfg.warmup_epochs < cfg.epochs else 0.3
        total = max(total, 2)
        if math.isclose(pct * total, 1.0):
            # torch's OneCycleLR divides by zero when the warm-up phase ends exactly at
            # step 0 (tiny runs, e.g. 2 steps with pct 0.5); start in the decay phase.
            pct = 0.5 / total
        return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=pct), None
    batch_scheduler = LambdaLR(
        optimizer,
        lr_lambda(
            cfg.scheduler,
            warmup_steps=warmup_steps,
            total_steps=total,
            steps_per_epoch=steps_per_epoch,
            epochs=cfg.epochs,
        ),
    )
    plateau = None
    if cfg.scheduler == "plateau":
        plateau = ReduceLROnPlateau(
            optimizer, mode="max", factor=_PLATEAU_FACTOR, patience=_PLATEAU_PATIENCE
        )
    return batch_scheduler, plateau


def build_optimization(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    counts: Sequence[int],
    n_classes: int,
    steps_per_epoch: int,
    device: torch.device,
    fp16_scaling: bool,
) -> Optimization:
    """Loss, optimizer and schedules of a run over ``model``'s trainable parameters;
    ``fp16_scaling`` enables the grad scaler (float16 autocast only)."""
    loss_weights = _loss_weights(cfg, counts, n_classes, device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, trainable)
    warmup_steps = min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch
    batch_scheduler, plateau = _schedulers(cfg, optimizer, steps_per_epoch, warmup_steps)
    return Optimization(
        loss_weights=loss_weights,
        criterion=CrossEntropyLoss(weight=loss_weights),
        params=[p for _, p in trainable],
        optimizer=optimizer,
        batch_scheduler=batch_scheduler,
        plateau=plateau,
        scaler=torch.amp.GradScaler(device.type, enabled=fp16_scaling),
        warmup_steps=warmup_steps,
    )
