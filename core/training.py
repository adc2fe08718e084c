"""Training loop: seeded, resumable, cancellable; writes checkpoints, metrics and a test report.

Recipe (the reference notebook's, minus its defects): a seeded near-duplicate-aware split,
augmentation only on the training set (validation/test use the deterministic eval preset),
a weighted sampler (1/count, ``oversample`` x the training set) plus a class-weighted loss in
class-index order, AdamW/SGD with weight decay, gradient clipping, an LR schedule with linear
warm-up, early stopping on validation macro-F1, ``best.pt`` (best validation macro-F1) and
``last.pt`` (everything needed to resume) after every epoch, and finally an evaluation of
``best.pt`` on the held-out test split.

Resuming from ``last.pt`` restores weights, optimizer, scheduler, grad scaler, sampler and
loader generators and the torch/numpy/python RNG states, so on CPU a resumed run ends with
bit-identical weights to an uninterrupted one. Cancellation (``should_stop``) is checked
between batches; the partial epoch is discarded and ``last.pt`` keeps the last completed one.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.calibration import Calibration
from core.checkpoint import (
    CheckpointMeta,
    ChecksumMismatchError,
    LoadedCheckpoint,
    load_checkpoint,
    move_checkpoint,
    read_sidecar,
    save_checkpoint,
)
from core.config import TrainConfig
from core.devices import select_device
from core.evaluation import EvalReport, EvaluationCancelled
from core.labels import as_label_mode, classes_for
from core.models import build_model, head_name, resolve_weights
from core.optimization import build_optimization
from core.plots import plot_training_curves
from core.resume import (
    Progress,
    checked_training_state,
    find_resume,
    restore_training_state,
    training_state,
)
from core.training_data import TrainingDataError, derived_seed, load_training_data
from core.training_epoch import EpochRun, TrainingDivergedError, train_epoch
from core.training_report import (
    CURVES_PNG,
    EpochMetrics,
    TrainResult,
    fit_calibration,
    write_metrics,
    write_test_report,
)
from core.transforms import PresetParams
from core.validation import Placement, val_logits, validate

__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "EpochMetrics",
    "TrainResult",
    "TrainingDataError",
    "TrainingDivergedError",
    "train",
]

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
#: The epoch before last.pt's, kept so a corrupt last.pt costs one epoch, not the run.
PREVIOUS_CHECKPOINT = "last.prev.pt"

# Below this many validation images a fitted temperature is noise (two images can pull it
# anywhere in [T_MIN, T_MAX]); the model then keeps the raw softmax and says so.
CALIBRATION_MIN_VAL = 20


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CPU (cheap there), restoring the process-wide flag after."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# --------------------------------------------------------------------------------------
# the run


class _Run:
    """State of one ``train`` call; methods are the phases of the run, in order."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        device: torch.device,
        on_epoch: Callable[[EpochMetrics], None] | None,
        on_batch: Callable[[int, int], None] | None,
        should_stop: Callable[[], bool] | None,
        on_log: Callable[[str], None] | None,
    ) -> None:
        self.config = config
        self.device = device
        self.on_epoch = on_epoch
        self.on_batch = on_batch
        self.should_stop = should_stop or (lambda: False)
        self.log = on_log or (lambda _message: None)
        self.out_dir = Path(config.out_dir)
        self.best_path = self.out_dir / BEST_CHECKPOINT
        self.last_path = self.out_dir / LAST_CHECKPOINT
        self.previous_path = self.out_dir / PREVIOUS_CHECKPOINT
        self.mode = as_label_mode(config.labels)
        self.classes = classes_for(self.mode)
        self.preset = PresetParams(
            image_size=config.image_size,
            crop=config.crop,
            rotation_degrees=config.rotation_degrees,
            hflip_p=config.hflip_p,
        )
        self.cuda = device.type == "cuda"
        self.use_amp = config.amp and self.cuda
        self.amp_dtype = (
            torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float16
        )
        self.channels_last = config.channels_last and self.cuda
        self.placement = Placement(device, self.use_amp, self.amp_dtype, self.channels_last)
        # Run-progress state, restored from last.pt on resume.
        self.progress = Progress()

    # ---- setup ---------------------------------------------------------------------

    def load_data(self) -> None:
        self.data = load_training_data(
            self.config,
            mode=self.mode,
            classes=self.classes,
            preset=self.preset,
            pin_memory=self.cuda,
            log=self.log,
        )

    def load_resume(self) -> tuple[Path, LoadedCheckpoint] | None:
        """The checkpoint to resume from (:func:`core.resume.find_resume`)."""
        return find_resume(
            self.config.resume, last=self.last_path, previous=self.previous_path, log=self.log
        )

    def build_model(self, resuming: bool) -> None:
        cfg = self.config
        # Seed right before building so the head's random init does not depend on how much
        # randomness the data setup consumed.
        torch.manual_seed(derived_seed(cfg.seed, "model"))
        # On resume the weights come from last.pt; do not fetch pretrained ones needlessly.
        weights = "none" if resuming else resolve_weights(
            cfg.weights, arch=cfg.arch, on_warning=self.log
        )
        model = build_model(cfg.arch, len(self.classes), weights=weights, finetune=cfg.finetune)
        if cfg.init_checkpoint is not None and not resuming:
            self._warm_start(model, Path(cfg.init_checkpoint))
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _warm_start(self, model: nn.Module, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.meta.arch != self.config.arch:
            raise ValueError(
                f"{path}: init checkpoint is a {ckpt.meta.arch} model, "
                f"but this run trains {self.config.arch}"
            )
        state = ckpt.model.state_dict()
        if tuple(ckpt.meta.classes) == self.classes:
            model.load_state_dict(state)
            self.log(f"warm start: loaded all weights from {path}")
        else:
            # Same backbone, different label space (e.g. 15 -> 44): keep the fresh head.
            prefix = head_name(self.config.arch) + "."
            backbone = {k: v for k, v in state.items() if not k.startswith(prefix)}
            model.load_state_dict(backbone, strict=False)
            self.log(
                f"warm start: loaded the backbone from {path}; its classes differ, so the "
                "classification head starts fresh"
            )

    def build_optimization(self) -> None:
        self.opt = build_optimization(
            self.config,
            self.model,
            counts=self.data.counts,
            n_classes=len(self.classes),
            steps_per_epoch=self.data.steps_per_epoch,
            device=self.device,
            fp16_scaling=self.use_amp and self.amp_dtype == torch.float16,
        )

    # ---- resume state ----------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        return training_state(
            self.progress, self.opt, self.data, device=self.device, config=self.config
        )

    def restore(self, path: Path, ckpt: LoadedCheckpoint) -> None:
        state = checked_training_state(
            path,
            ckpt,
            config=self.config,
            classes=self.classes,
            fingerprint=self.data.fingerprint,
            log=self.log,
        )
        self.model.load_state_dict(ckpt.model.state_dict())
        self.progress = restore_training_state(state, self.opt, self.data, device=self.device)

    # ---- checkpoints -----------------------------------------------------------------

    def meta(self, metrics: dict[str, Any]) -> CheckpointMeta:
        return CheckpointMeta(
            arch=self.config.arch,
            classes=self.classes,
            label_mode=self.mode.value,
            preset=self.preset,
            config=self.config.to_dict(),
            metrics=metrics,
        )

    def save_last(self, metrics: dict[str, Any]) -> None:
        # Renames, so keeping the previous epoch needs no extra space until the new write.
        move_checkpoint(self.last_path, self.previous_path)
        save_checkpoint(
            self.last_path,
            model=self.model,
            meta=self.meta(metrics),
            training_state=self.training_state(),
        )

    def write_metrics(self) -> None:
        write_metrics(self.out_dir, self.progress.history)

    # ---- epochs ----------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> float | None:
        """One pass over the sampler; None when cancelled part-way."""
        return train_epoch(
            EpochRun(
                self.model, self.data, self.opt, self.placement, self.progress, self.config,
                self.device, self.should_stop, self.on_batch,
            ),
            epoch,
        )

    def run_epochs(self) -> bool:
        """Train until done/early stop; False when cancelled."""
        cfg = self.config
        for epoch in range(self.progress.start_epoch, cfg.epochs):
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            if train_loss is None:
                return False
            validated = validate(
                self.model,
                self.data.val_loader,
                self.placement,
                loss_weights=self.opt.loss_weights,
                should_stop=self.should_stop,
            )
            if validated is None:
                return False
            val_loss, val_accuracy, val_f1 = validated
            metrics = EpochMetrics(
                epoch=epoch + 1,
                train_loss=train_loss,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                val_macro_f1=val_f1,
                lr=float(self.opt.optimizer.param_groups[0]["lr"]),
                seconds=time.perf_counter() - started,
            )
            self.progress.history.append(metrics)
            if self.progress.best_score is None or val_f1 > self.progress.best_score:
                self.progress.best_score = val_f1
                self.progress.best_epoch = epoch + 1
                self.progress.bad_epochs = 0
                self.progress.best_sha256 = save_checkpoint(
                    self.best_path, model=self.model, meta=self.meta(metrics.to_dict())
                )
            else:
                self.progress.bad_epochs += 1
            if self.opt.plateau is not None and epoch + 1 >= cfg.warmup_epochs:
                self.opt.plateau.step(val_f1)
            patience = cfg.early_stopping_patience
            self.progress.stopped_early = patience > 0 and self.progress.bad_epochs >= patience
            self.progress.start_epoch = epoch + 1
            self.progress.finished = self.progress.stopped_early or epoch + 1 == cfg.epochs
            self.save_last(metrics.to_dict())
            self.write_metrics()
            if self.on_epoch is not None:
                self.on_epoch(metrics)
            if self.progress.stopped_early:
                self.log(
                    f"early stopping after epoch {epoch + 1}: no val macro-F1 gain for "
                    f"{patience} epoch(s) (best {self.progress.best_score:.4f} at epoch "
                    f"{self.progress.best_epoch})"
                )
                break
        self.progress.finished = True
        return True

    # ---- calibration -------------------------------------------------------------------

    def _load_best_for_calibration(self) -> LoadedCheckpoint:
        try:
            return load_checkpoint(
                self.best_path,
                expected_sha256=self.progress.best_sha256 or None,
                device=self.device,
            )
        except ChecksumMismatchError:
            # A crash between writing the calibrated best.pt and re-saving last.pt leaves
            # last.pt with best.pt's earlier digest. Accept the file its own sidecar vouches
            # for if it is that calibrated copy; anything else is a real mismatch.
            sidecar = read_sidecar(self.best_path)
            if sidecar is None:
                raise
            ckpt = load_checkpoint(self.best_path, expected_sha256=sidecar, device=self.device)
            done = ckpt.meta.calibration
            if not (done.calibrated or done.n > 0):
                raise
            self.log(f"{self.best_path}: calibrated after the last save of {LAST_CHECKPOINT}")
            self.progress.best_sha256 = ckpt.sha256
            self.save_last(self.progress.history[-1].to_dict() if self.progress.history else {})
            return ckpt

    def calibrate(self) -> Calibration:
        """Fit best.pt's temperature on the validation split and store it in best.pt.

        Done once: a resumed run finds the calibration in best.pt and keeps it. best.pt gets a
        new digest; last.pt is saved again right after so that a resume verifies best.pt
        against it.
        """
        ckpt = self._load_best_for_calibration()
        done = ckpt.meta.calibration
        if done.calibrated or done.n > 0:
            return done  # a resumed run that had calibrated already: best.pt stays as it is
        logits, labels = val_logits(
            ckpt.model,
            self.data.val_loader,
            self.placement,
            n_classes=len(self.classes),
            should_stop=self.should_stop,
        )
        calibration = fit_calibration(logits, labels, min_n=CALIBRATION_MIN_VAL, log=self.log)
        if ckpt.meta.calibration != calibration:
            self.progress.best_sha256 = save_checkpoint(
                self.best_path,
                model=ckpt.model,
                meta=replace(ckpt.meta, calibration=calibration),
            )
            self.save_last(self.progress.history[-1].to_dict() if self.progress.history else {})
        return calibration

    # ---- final evaluation --------------------------------------------------------------

    def evaluate_test(self) -> EvalReport | None:
        """Evaluate best.pt on the test split; None when there is no test split.

        Raises EvaluationCancelled when should_stop fires during the evaluation.
        """
        if not self.data.splits.test:
            self.log("no test images: skipping the test evaluation")
            return None
        ckpt = load_checkpoint(
            self.best_path, expected_sha256=self.progress.best_sha256 or None, device=self.device
        )
        return write_test_report(
            ckpt,
            self.data.splits.test,
            self.out_dir,
            batch_size=self.config.batch_size,
            device=self.device,
            num_workers=self.config.num_workers,
            should_stop=self.should_stop,
            roots=self.config.data_roots,
        )

    def result(self, *, report: EvalReport | None, cancelled: bool, resumed: int) -> TrainResult:
        return TrainResult(
            best_checkpoint=self.best_path,
            last_checkpoint=self.last_path,
            best_sha256=self.progress.best_sha256,
            epochs=tuple(self.progress.history),
            test_report=report,
            stopped_early=self.progress.stopped_early,
            cancelled=cancelled,
            resumed_from_epoch=resumed,
            class_table=self.data.class_table,
            loss_weights=(
                tuple(float(w) for w in self.opt.loss_weights.cpu().tolist())
                if self.opt.loss_weights is not None
                else None
            ),
            device=str(self.device),
        )


def train(
    config: TrainConfig,
    *,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``config.arch`` on ``config.data_dir``; see the module docstring for the recipe.

    ``on_epoch(metrics)`` follows every completed epoch (and, after a resume, is first called
    again for the epochs already in ``last.pt`` so that consumers can upsert them).
    ``on_batch(done, total)`` follows every training batch of the current epoch.
    ``should_stop()`` is polled between batches; when it returns True the run ends with
    ``TrainResult(cancelled=True)`` and ``last.pt`` holding the last completed epoch.
    ``on_log(message)`` receives the class table, warnings and notices (an addition to the
    contract; progress goes out through callbacks, never print).
    """
    device = select_device(config.device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(
        config,
        device=device,
        on_epoch=on_epoch,
        on_batch=on_batch,
        should_stop=should_stop,
        on_log=on_log,
    )
    with _deterministic(device):
        # Seed the global generators too: some torchvision layers (dropout, stochastic
        # depth) draw from them during training.
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        run.load_data()
        resume = run.load_resume()
        run.build_model(resuming=resume is not None)
        run.build_optimization()
        resumed_from = 0
        if resume is not None:
            resume_path, ckpt = resume
            run.restore(resume_path, ckpt)
            del ckpt
            resumed_from = run.progress.start_epoch
            run.log(f"resumed from {resume_path} after epoch {resumed_from}")
            if on_epoch is not None:
                for metrics in run.progress.history:
                    on_epoch(metrics)
        else:
            # An epoch-0 last.pt: a run cancelled or killed in its first epoch can resume
            # (and resume="auto" finds it) with the very same initial state.
            run.save_last({})
        completed = run.progress.finished or run.run_epochs()
        if not completed:
            run.log(f"cancelled; {LAST_CHECKPOINT} holds epoch {run.progress.start_epoch}")
            return run.result(report=None, cancelled=True, resumed=resumed_from)
        if run.progress.history:
            plot_training_curves(run.progress.history, out_dir / CURVES_PNG)
        if not run.best_path.is_file():
            raise FileNotFoundError(f"{run.best_path}: best checkpoint missing after training")
        try:
            run.calibrate()
            report = run.evaluate_test()
        except EvaluationCancelled:
            run.log("cancelled during calibration or the test evaluation")
            return run.result(report=None, cancelled=True, resumed=resumed_from)
        return run.result(report=report, cancelled=False, resumed=resumed_from)

