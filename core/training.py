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
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import CrossEntropyLoss
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau
from torch.utils.data import DataLoader

from core.atomicio import write_text_atomically
from core.calibration import Calibration, ece, fit_temperature, nll, softmax
from core.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    ChecksumMismatchError,
    LoadedCheckpoint,
    load_checkpoint,
    move_checkpoint,
    read_sidecar,
    save_checkpoint,
)
from core.config import TrainConfig
from core.dataset import (
    ImageDataset,
    SplitSamples,
    class_counts,
    class_weights,
    format_class_table,
    load_splits,
    make_weighted_sampler,
)
from core.evaluation import (
    EvalReport,
    EvaluationCancelled,
    evaluate_checkpoint_outputs,
)
from core.inference import select_device
from core.labels import as_label_mode, classes_for
from core.models import build_model, head_name, resolve_weights
from core.plots import plot_confusion_matrix, plot_training_curves, write_evaluation_plots
from core.transforms import EvalPreset, PresetParams, TrainPreset

__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "EpochMetrics",
    "TrainResult",
    "TrainingDataError",
    "TrainingDivergedError",
    "macro_f1",
    "train",
]

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
#: The epoch before last.pt's, kept so a corrupt last.pt costs one epoch, not the run.
PREVIOUS_CHECKPOINT = "last.prev.pt"
METRICS_JSON = "metrics.json"
TEST_REPORT_JSON = "test_report.json"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"

# ReduceLROnPlateau: cut the LR 10x after this many epochs without a val macro-F1 gain.
_PLATEAU_PATIENCE = 2
_PLATEAU_FACTOR = 0.1
# "step": decay 10x at every third of the run; "cosine": decay to 1% of the peak LR.
_STEP_GAMMA = 0.1
_COSINE_FLOOR = 0.01
_TRAINING_STATE_VERSION = 1
# Below this many validation images a fitted temperature is noise (two images can pull it
# anywhere in [T_MIN, T_MAX]); the model then keeps the raw softmax and says so.
CALIBRATION_MIN_VAL = 20


class TrainingDataError(ValueError):
    """The data directory cannot support a training run (e.g. too few images per split)."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN/inf; the run cannot continue meaningfully."""


@dataclass(frozen=True)
class EpochMetrics:
    """One completed epoch (``epoch`` counts from 1)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    lr: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochMetrics:
        return cls(
            epoch=int(data["epoch"]),
            **{f.name: float(data[f.name]) for f in fields(cls) if f.name != "epoch"},
        )


@dataclass(frozen=True)
class TrainResult:
    """Outcome of ``train``. ``epochs`` includes epochs from before a resume."""

    best_checkpoint: Path
    last_checkpoint: Path
    best_sha256: str
    epochs: tuple[EpochMetrics, ...]
    test_report: EvalReport | None
    stopped_early: bool
    cancelled: bool
    resumed_from_epoch: int
    # Additions to the contract (all defaulted): what was printed as the class table, the
    # class weights given to the loss (class-index order; None when unweighted) and the
    # device used. They make the run auditable without re-reading its files.
    class_table: str = ""
    loss_weights: tuple[float, ...] | None = None
    device: str = "cpu"


# --------------------------------------------------------------------------------------
# small helpers


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch per worker (base_seed + id); numpy/random must follow suit or
    # every worker would share one stream.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _derived_seed(seed: int, stream: str) -> int:
    """Independent, stable seeds for the different generators of one run."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean F1 over the classes present in ``y_true`` or ``y_pred`` (``sklearn.metrics``)."""
    from sklearn.metrics import f1_score

    if len(y_true) == 0 and len(y_pred) == 0:
        return 0.0  # sklearn refuses empty input
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def _rng_state(device: torch.device) -> dict[str, Any]:
    # legacy tuple form: (name, key array, pos, has_gauss, cached_gaussian)
    np_state: Any = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # Plain lists/ints only: checkpoints are read with torch.load(weights_only=True).
        "numpy": {
            "name": str(np_state[0]),
            "key": np_state[1].tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np.asarray(np_state["key"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    cuda_states = state.get("cuda")
    if device.type == "cuda" and cuda_states and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


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


def _split_fingerprint(splits: SplitSamples) -> str:
    digest = hashlib.sha256()
    for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        for s in part:
            digest.update(f"{name}\t{s.path}\t{s.label}\n".encode())
    return digest.hexdigest()


def _lr_lambda(
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
        # Run-progress state, restored from last.pt on resume.
        self.history: list[EpochMetrics] = []
        self.start_epoch = 0
        self.global_step = 0
        self.best_score: float | None = None
        self.best_epoch = 0
        self.best_sha256 = ""
        self.bad_epochs = 0
        self.finished = False
        self.stopped_early = False

    # ---- setup ---------------------------------------------------------------------

    def load_data(self) -> None:
        cfg = self.config
        self.splits = load_splits(
            cfg.data_dir,
            mode=self.mode,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            skip_unknown=cfg.skip_unknown,
            on_warning=self.log,
            roots=cfg.data_roots,
        )
        if len(self.splits.train) < 2:
            raise TrainingDataError(
                f"{cfg.data_dir}: {len(self.splits.train)} training image(s) found; "
                "need at least 2 (are the class folders empty or unrecognised?)"
            )
        if not self.splits.val:
            raise TrainingDataError(
                f"{cfg.data_dir}: the validation split is empty ({len(self.splits.train)} "
                f"training images, val_fraction={cfg.val_fraction}); add images or a val/ "
                "folder"
            )
        self.fingerprint = _split_fingerprint(self.splits)
        self.class_table = format_class_table(self.splits, self.classes)
        self.log(self.class_table)

        n_classes = len(self.classes)
        self.counts = class_counts(self.splits.train, n_classes)
        self.train_dataset = ImageDataset(
            self.splits.train, TrainPreset(params=self.preset), seed=cfg.seed,
            roots=cfg.data_roots,
        )
        # Validation must never see augmentation: the eval preset is deterministic.
        self.val_dataset = ImageDataset(
            self.splits.val, EvalPreset(params=self.preset), seed=cfg.seed,
            roots=cfg.data_roots,
        )
        self.sampler_generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, "sampler"))
        self.sampler = make_weighted_sampler(
            self.splits.train,
            n_classes,
            oversample=cfg.oversample,
            generator=self.sampler_generator,
        )
        n_drawn = self.sampler.num_samples
        # BatchNorm cannot train on a single image: drop the last batch only if it would
        # hold exactly one (the sampler draws with replacement, so nothing is "lost").
        drop_last = n_drawn > cfg.batch_size and n_drawn % cfg.batch_size == 1
        self.loader_generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, "loader"))
        self.train_loader: DataLoader[Any] = DataLoader(
            self.train_dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.cuda,
            drop_last=drop_last,
            worker_init_fn=_seed_worker,
            generator=self.loader_generator,
        )
        self.val_generator = torch.Generator().manual_seed(_derived_seed(cfg.seed, "val"))
        self.val_loader: DataLoader[Any] = DataLoader(
            self.val_dataset,
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            pin_memory=self.cuda,
            worker_init_fn=_seed_worker,
            generator=self.val_generator,
        )
        self.steps_per_epoch = len(self.train_loader)

    def resume_path(self) -> Path | None:
        resume = self.config.resume
        if resume is None:
            return None
        if resume == "auto":
            for path in (self.last_path, self.previous_path):
                if path.is_file():
                    return path
            return None
        return Path(resume)

    def load_resume(self) -> tuple[Path, LoadedCheckpoint] | None:
        """The checkpoint to resume from, verified against its sha256 sidecar.

        An explicit ``resume`` path must load. With ``resume="auto"`` a corrupt or
        unreadable ``last.pt`` (a crash mid-write on storage that ignores fsync, a bad disk)
        falls back to ``last.prev.pt``, the epoch before, and without a usable one the run
        starts fresh; either way ``on_log`` says so. An unusable file is renamed to
        ``<name>.corrupt`` so the next epoch's rotation cannot replace the good previous one.
        """
        path = self.resume_path()
        if path is None:
            return None
        if self.config.resume != "auto":
            if not path.is_file():
                raise FileNotFoundError(f"{path}: resume checkpoint not found")
            return path, load_checkpoint(path, expected_sha256=read_sidecar(path))
        for candidate in (self.last_path, self.previous_path):
            if not candidate.is_file():
                continue
            try:
                ckpt = load_checkpoint(candidate, expected_sha256=read_sidecar(candidate))
            except CheckpointError as exc:
                self.log(f"warning: cannot resume from {exc}; renamed to {candidate.name}.corrupt")
                move_checkpoint(candidate, candidate.with_name(candidate.name + ".corrupt"))
                continue
            if candidate != self.last_path:
                self.log(f"warning: resuming from {candidate}, the epoch before the lost last.pt")
            return candidate, ckpt
        self.log("warning: no usable checkpoint to resume from: starting fresh")
        return None

    def build_model(self, resuming: bool) -> None:
        cfg = self.config
        # Seed right before building so the head's random init does not depend on how much
        # randomness the data setup consumed.
        torch.manual_seed(_derived_seed(cfg.seed, "model"))
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
        cfg = self.config
        if cfg.weighted_loss:
            weights = class_weights(self.counts).to(torch.float32)
            if weights.shape != (len(self.classes),):
                raise RuntimeError(
                    f"class_weights returned shape {tuple(weights.shape)}, "
                    f"expected ({len(self.classes)},)"
                )
            self.loss_weights: torch.Tensor | None = weights.to(self.device)
        else:
            self.loss_weights = None
        self.criterion = CrossEntropyLoss(weight=self.loss_weights)

        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        # No weight decay on biases and norm scales: decaying them only hurts (standard
        # practice for AdamW/SGD on CNNs).
        decay = [p for _, p in trainable if p.ndim > 1]
        no_decay = [p for _, p in trainable if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        self.params = [p for _, p in trainable]
        if cfg.optimizer == "sgd":
            self.optimizer: Optimizer = SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0
            )
        else:
            self.optimizer = AdamW(groups, lr=cfg.lr)

        total = cfg.epochs * self.steps_per_epoch
        warmup_steps = min(cfg.warmup_epochs, cfg.epochs) * self.steps_per_epoch
        self.warmup_steps = warmup_steps
        self.batch_scheduler: LRScheduler | None = None
        self.plateau: ReduceLROnPlateau | None = None
        if cfg.scheduler == "onecycle":
            # OneCycle has its own warm-up phase; map warmup_epochs onto its pct_start.
            pct = cfg.warmup_epochs / cfg.epochs if 0 < cfg.warmup_epochs < cfg.epochs else 0.3
            total = max(total, 2)
            if math.isclose(pct * total, 1.0):
                # torch's OneCycleLR divides by zero when the warm-up phase ends exactly at
                # step 0 (tiny runs, e.g. 2 steps with pct 0.5); start in the decay phase.
                pct = 0.5 / total
            self.batch_scheduler = OneCycleLR(
                self.optimizer, max_lr=cfg.lr, total_steps=total, pct_start=pct
            )
        else:
            self.batch_scheduler = LambdaLR(
                self.optimizer,
                _lr_lambda(
                    cfg.scheduler,
                    warmup_steps=warmup_steps,
                    total_steps=total,
                    steps_per_epoch=self.steps_per_epoch,
                    epochs=cfg.epochs,
                ),
            )
            if cfg.scheduler == "plateau":
                self.plateau = ReduceLROnPlateau(
                    self.optimizer,
                    mode="max",
                    factor=_PLATEAU_FACTOR,
                    patience=_PLATEAU_PATIENCE,
                )
        self.scaler = torch.amp.GradScaler(
            self.device.type,
            enabled=self.use_amp and self.amp_dtype == torch.float16,
        )

    # ---- resume state ----------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        return {
            "version": _TRAINING_STATE_VERSION,
            "epoch": self.start_epoch,
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.batch_scheduler.state_dict() if self.batch_scheduler else None,
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "scaler": self.scaler.state_dict(),
            "sampler_generator": self.sampler_generator.get_state(),
            "loader_generator": self.loader_generator.get_state(),
            "val_generator": self.val_generator.get_state(),
            "rng": _rng_state(self.device),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_sha256": self.best_sha256,
            "bad_epochs": self.bad_epochs,
            "finished": self.finished,
            "stopped_early": self.stopped_early,
            "history": [m.to_dict() for m in self.history],
            "split_fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
        }

    def restore(self, path: Path, ckpt: LoadedCheckpoint) -> None:
        state = ckpt.training_state
        if state is None:
            raise ValueError(
                f"{path}: has no training state (best.pt files cannot be resumed; use last.pt)"
            )
        if ckpt.meta.arch != self.config.arch or tuple(ckpt.meta.classes) != self.classes:
            raise ValueError(
                f"{path}: checkpoint is {ckpt.meta.arch} with {len(ckpt.meta.classes)} classes, "
                f"this run is {self.config.arch} with {len(self.classes)}"
            )
        if state.get("version") != _TRAINING_STATE_VERSION:
            raise ValueError(f"{path}: unsupported training state version {state.get('version')}")
        self._warn_config_drift(path, ckpt, state)
        if state.get("split_fingerprint") != self.fingerprint:
            self.log(
                f"warning: {path} was trained on a different split of the data (files changed "
                "since); resuming anyway"
            )
        self.model.load_state_dict(ckpt.model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        if self.batch_scheduler is not None and state["scheduler"] is not None:
            self.batch_scheduler.load_state_dict(state["scheduler"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler_generator.set_state(state["sampler_generator"])
        self.loader_generator.set_state(state["loader_generator"])
        self.val_generator.set_state(state["val_generator"])
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_score = state["best_score"]
        self.best_epoch = int(state["best_epoch"])
        self.best_sha256 = str(state["best_sha256"])
        self.bad_epochs = int(state["bad_epochs"])
        self.finished = bool(state["finished"])
        self.stopped_early = bool(state["stopped_early"])
        self.history = [EpochMetrics.from_dict(d) for d in state["history"]]
        # Last: everything built above may have drawn random numbers.
        _set_rng_state(state["rng"], self.device)

    def _warn_config_drift(self, path: Path, ckpt: LoadedCheckpoint, state: dict[str, Any]) -> None:
        # Where/how the run executes may change between attempts; anything else changes the
        # trajectory, so say so (the run continues: extending epochs is a legitimate use).
        ignored = {"out_dir", "resume", "device", "num_workers", "data_dir", "data_roots"}
        saved = state.get("config") or {}
        now = self.config.to_dict()
        changed = sorted(k for k in now if k not in ignored and k in saved and saved[k] != now[k])
        if changed:
            self.log(
                f"warning: resuming {path} with changed settings: "
                + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed)
            )

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
        write_text_atomically(
            self.out_dir / METRICS_JSON,
            json.dumps([m.to_dict() for m in self.history], indent=2) + "\n",
        )

    # ---- epochs ----------------------------------------------------------------------

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def train_epoch(self, epoch: int) -> float | None:
        """One pass over the sampler; None when cancelled part-way."""
        cfg = self.config
        set_epoch = getattr(self.train_dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        total = self.steps_per_epoch
        for index, batch in enumerate(self.train_loader):
            if self.should_stop():
                return None
            images, labels = self._to_device(batch[0], batch[1])
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = self.model(images)
                loss = self.criterion(logits, labels)
            self.scaler.scale(loss).backward()
            if cfg.clip != "none":
                # Unscale first so the threshold applies to the true gradients under AMP.
                self.scaler.unscale_(self.optimizer)
                if cfg.clip == "norm":
                    nn.utils.clip_grad_norm_(self.params, cfg.clip_value)
                else:
                    nn.utils.clip_grad_value_(self.params, cfg.clip_value)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.batch_scheduler is not None and (
                self.plateau is None or self.global_step < self.warmup_steps
            ):
                # With "plateau" the per-batch scheduler only drives the warm-up; afterwards
                # ReduceLROnPlateau owns the LR.
                self.batch_scheduler.step()
            self.global_step += 1
            loss_sum += loss.detach().double() * labels.shape[0]
            seen += labels.shape[0]
            if self.on_batch is not None:
                self.on_batch(index + 1, total)
        train_loss = float(loss_sum.item()) / max(seen, 1)
        if not math.isfinite(train_loss) and not self.scaler.is_enabled():
            raise TrainingDivergedError(
                f"training loss became {train_loss} in epoch {epoch + 1}; lower the learning "
                f"rate (now {cfg.lr}) or enable gradient clipping"
            )
        return train_loss

    @torch.inference_mode()
    def validate(self) -> tuple[float, float, float] | None:
        """(val_loss, accuracy, macro_f1); None when cancelled part-way."""
        self.model.eval()
        loss_sum = 0.0
        weight_sum = 0.0
        y_true: list[int] = []
        y_pred: list[int] = []
        for batch in self.val_loader:
            if self.should_stop():
                return None
            images, labels = self._to_device(batch[0], batch[1])
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = self.model(images)
            logits = logits.float()
            # Weighted mean over the whole split (not a mean of batch means), matching how
            # CrossEntropyLoss(weight=...) averages within one batch.
            loss_sum += float(
                F.cross_entropy(logits, labels, weight=self.loss_weights, reduction="sum")
            )
            if self.loss_weights is not None:
                weight_sum += float(self.loss_weights[labels].sum())
            else:
                weight_sum += labels.shape[0]
            y_true.extend(labels.tolist())
            y_pred.extend(logits.argmax(dim=1).tolist())
        val_loss = loss_sum / weight_sum if weight_sum > 0 else float("nan")
        accuracy = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if y_true else 0.0
        return val_loss, accuracy, macro_f1(y_true, y_pred)

    def run_epochs(self) -> bool:
        """Train until done/early stop; False when cancelled."""
        cfg = self.config
        for epoch in range(self.start_epoch, cfg.epochs):
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            if train_loss is None:
                return False
            validated = self.validate()
            if validated is None:
                return False
            val_loss, val_accuracy, val_f1 = validated
            metrics = EpochMetrics(
                epoch=epoch + 1,
                train_loss=train_loss,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                val_macro_f1=val_f1,
                lr=float(self.optimizer.param_groups[0]["lr"]),
                seconds=time.perf_counter() - started,
            )
            self.history.append(metrics)
            if self.best_score is None or val_f1 > self.best_score:
                self.best_score = val_f1
                self.best_epoch = epoch + 1
                self.bad_epochs = 0
                self.best_sha256 = save_checkpoint(
                    self.best_path, model=self.model, meta=self.meta(metrics.to_dict())
                )
            else:
                self.bad_epochs += 1
            if self.plateau is not None and epoch + 1 >= cfg.warmup_epochs:
                self.plateau.step(val_f1)
            patience = cfg.early_stopping_patience
            self.stopped_early = patience > 0 and self.bad_epochs >= patience
            self.start_epoch = epoch + 1
            self.finished = self.stopped_early or epoch + 1 == cfg.epochs
            self.save_last(metrics.to_dict())
            self.write_metrics()
            if self.on_epoch is not None:
                self.on_epoch(metrics)
            if self.stopped_early:
                self.log(
                    f"early stopping after epoch {epoch + 1}: no val macro-F1 gain for "
                    f"{patience} epoch(s) (best {self.best_score:.4f} at epoch "
                    f"{self.best_epoch})"
                )
                break
        self.finished = True
        return True

    # ---- calibration -------------------------------------------------------------------

    @torch.inference_mode()
    def _val_logits(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits and labels of the validation split; EvaluationCancelled on should_stop."""
        model.eval()
        logits: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for batch in self.val_loader:
            if self.should_stop():
                raise EvaluationCancelled("cancelled during calibration")
            images, target = self._to_device(batch[0], batch[1])
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                out = model(images)
            logits.append(out.float().cpu().numpy())
            labels.append(target.cpu().numpy())
        if not logits:
            return np.zeros((0, len(self.classes))), np.zeros(0, dtype=np.int64)
        return np.concatenate(logits), np.concatenate(labels)

    def _load_best_for_calibration(self) -> LoadedCheckpoint:
        try:
            return load_checkpoint(
                self.best_path, expected_sha256=self.best_sha256 or None, device=self.device
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
            self.best_sha256 = ckpt.sha256
            self.save_last(self.history[-1].to_dict() if self.history else {})
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
        logits, labels = self._val_logits(ckpt.model)
        if labels.size < CALIBRATION_MIN_VAL:
            calibration = Calibration(n=int(labels.size))
            self.log(
                f"calibration skipped: {labels.size} validation images, fewer than "
                f"{CALIBRATION_MIN_VAL}; confidences stay the raw softmax (temperature 1.0)"
            )
        else:
            t = fit_temperature(logits, labels)
            raw, scaled = softmax(logits), softmax(logits, t)
            calibration = Calibration(
                temperature=t,
                calibrated=True,
                n=int(labels.size),
                val_nll=nll(scaled, labels),
                val_nll_uncalibrated=nll(raw, labels),
                val_ece=ece(scaled, labels),
                val_ece_uncalibrated=ece(raw, labels),
            )
            self.log(
                f"calibration: temperature {t:.3f} on {labels.size} validation images, "
                f"ECE {calibration.val_ece_uncalibrated:.4f} -> {calibration.val_ece:.4f}"
            )
        if ckpt.meta.calibration != calibration:
            self.best_sha256 = save_checkpoint(
                self.best_path,
                model=ckpt.model,
                meta=replace(ckpt.meta, calibration=calibration),
            )
            self.save_last(self.history[-1].to_dict() if self.history else {})
        return calibration

    # ---- final evaluation --------------------------------------------------------------

    def evaluate_test(self) -> EvalReport | None:
        """Evaluate best.pt on the test split; None when there is no test split.

        Raises EvaluationCancelled when should_stop fires during the evaluation.
        """
        if not self.splits.test:
            self.log("no test images: skipping the test evaluation")
            return None
        ckpt = load_checkpoint(
            self.best_path, expected_sha256=self.best_sha256 or None, device=self.device
        )
        outputs = evaluate_checkpoint_outputs(
            ckpt,
            self.splits.test,
            batch_size=self.config.batch_size,
            device=self.device,
            num_workers=self.config.num_workers,
            should_stop=self.should_stop,
            roots=self.config.data_roots,
        )
        report = outputs.report
        write_text_atomically(
            self.out_dir / TEST_REPORT_JSON, json.dumps(report.to_dict(), indent=2) + "\n"
        )
        plot_confusion_matrix(report, self.out_dir / CONFUSION_PNG)
        write_evaluation_plots(outputs, self.out_dir)
        return report

    def result(self, *, report: EvalReport | None, cancelled: bool, resumed: int) -> TrainResult:
        return TrainResult(
            best_checkpoint=self.best_path,
            last_checkpoint=self.last_path,
            best_sha256=self.best_sha256,
            epochs=tuple(self.history),
            test_report=report,
            stopped_early=self.stopped_early,
            cancelled=cancelled,
            resumed_from_epoch=resumed,
            class_table=self.class_table,
            loss_weights=(
                tuple(float(w) for w in self.loss_weights.cpu().tolist())
                if self.loss_weights is not None
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
            resumed_from = run.start_epoch
            run.log(f"resumed from {resume_path} after epoch {resumed_from}")
            if on_epoch is not None:
                for metrics in run.history:
                    on_epoch(metrics)
        else:
            # An epoch-0 last.pt: a run cancelled or killed in its first epoch can resume
            # (and resume="auto" finds it) with the very same initial state.
            run.save_last({})
        completed = run.finished or run.run_epochs()
        if not completed:
            run.log(f"cancelled; {LAST_CHECKPOINT} holds epoch {run.start_epoch}")
            return run.result(report=None, cancelled=True, resumed=resumed_from)
        if run.history:
            plot_training_curves(run.history, out_dir / CURVES_PNG)
        if not run.best_path.is_file():
            raise FileNotFoundError(f"{run.best_path}: best checkpoint missing after training")
        try:
            run.calibrate()
            report = run.evaluate_test()
        except EvaluationCancelled:
            run.log("cancelled during calibration or the test evaluation")
            return run.result(report=None, cancelled=True, resumed=resumed_from)
        return run.result(report=report, cancelled=False, resumed=resumed_from)

