"""Training configuration: one frozen, validated, JSON-round-trippable record.

Kept free of torch imports on purpose: the scheduler (which never imports torch) may build
and validate a ``TrainConfig`` before handing it to a worker.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from core.labels import as_label_mode

# The canonical registry lives here so that config validation needs no torch import;
# ``core.models.ARCHITECTURES`` is the same tuple.
ARCHITECTURES: tuple[str, ...] = (
    "efficientnet_b0",
    "efficientnet_b3",
    "resnet18",
    "resnet50",
    "densenet121",
    "mobilenet_v3_large",
    "convnext_tiny",
)
DEFAULT_ARCH = "efficientnet_b0"

OptimizerName = Literal["adamw", "sgd"]
SchedulerName = Literal["onecycle", "cosine", "step", "plateau", "none"]
ClipMode = Literal["norm", "value", "none"]
DeviceSpec = Literal["auto", "cpu", "cuda"]
CropName = Literal["brain", "profile", "none"]

OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
CLIP_MODES: tuple[str, ...] = get_args(ClipMode)
DEVICES: tuple[str, ...] = get_args(DeviceSpec)
CROP_MODES: tuple[str, ...] = get_args(CropName)

#: The key of a user-settable field's :class:`OptionSpec` in ``dataclasses.field(metadata=...)``.
OPTION_KEY = "option"


@dataclass(frozen=True)
class OptionSpec:
    """What a user may set a training option to, through the CLI, the API and job submission.

    The bounds are the job system's offer, inside the looser invariants ``TrainConfig``
    checks on every config (``python -m core.train`` included): a ``TrainConfig`` field
    without a spec is not a job option. ``allowed`` says the accepted values in words, for
    refusals and help, where the bounds or choices alone do not.
    """

    help: str
    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    allowed: str | None = None


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    allowed: str | None = None,
) -> Any:
    """A dataclass field with ``default`` that is also a user-settable job option."""
    spec = OptionSpec(help=help, choices=choices, ge=ge, gt=gt, le=le, allowed=allowed)
    return field(default=default, metadata={OPTION_KEY: spec})


def option_fields(config_cls: type[Any]) -> tuple[Field[Any], ...]:
    """The fields of ``config_cls`` (TrainConfig or a subclass) that are job options."""
    return tuple(f for f in fields(config_cls) if OPTION_KEY in f.metadata)


def option_spec(f: Field[Any]) -> OptionSpec:
    """The :class:`OptionSpec` of an option field (see :func:`option_fields`)."""
    spec = f.metadata[OPTION_KEY]
    assert isinstance(spec, OptionSpec)
    return spec


_FLOAT_FIELDS = (
    "lr",
    "weight_decay",
    "momentum",
    "clip_value",
    "oversample",
    "val_fraction",
    "test_fraction",
    "rotation_degrees",
    "hflip_p",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (see docs/ARCHITECTURE.md)."""

    data_dir: Path
    out_dir: Path
    arch: str = option(
        DEFAULT_ARCH, f"Architecture: {', '.join(ARCHITECTURES)}.", choices=ARCHITECTURES
    )
    epochs: int = option(10, "Training epochs.", ge=1, le=10_000)
    image_size: int = option(224, "Side of the square input image, in pixels.", ge=32, le=2048)
    batch_size: int = option(32, "Images per training batch.", ge=1, le=4096)
    lr: float = option(1e-3, "Learning rate.", gt=0, le=10)
    weight_decay: float = 1e-4
    optimizer: OptimizerName = "adamw"
    momentum: float = 0.9
    scheduler: SchedulerName = "onecycle"
    warmup_epochs: int = 1
    clip: ClipMode = "norm"
    clip_value: float = 1.0
    finetune: bool = option(False, "Train only the head of a pretrained backbone.")
    weights: str = option(
        "auto",
        "auto, none, imagenet or a checkpoint path.",
        allowed="auto, none, imagenet or a path",
    )
    labels: str = option(
        "15", "Label space: 15 or 44.", choices=("15", "44"), allowed="15 or 44"
    )
    seed: int = option(0, "Random seed (split, augmentation, initial weights).", ge=0, le=2**32 - 1)
    device: DeviceSpec = option("auto", "auto, cpu or cuda.", choices=DEVICES)
    resume: Path | str | None = None
    weighted_loss: bool = True
    oversample: float = 2.0
    # 0 disables early stopping.
    early_stopping_patience: int = 5
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    crop: CropName = "brain"
    rotation_degrees: float = 15.0
    hflip_p: float = 0.5
    num_workers: int = 0
    # amp and channels_last only take effect on CUDA; on CPU they are ignored.
    amp: bool = True
    channels_last: bool = True
    skip_unknown: bool = False
    init_checkpoint: Path | None = None
    # Folders every data file must lie inside (symlinks resolved), checked when the data set
    # is scanned and again whenever a file is read; None (python -m core.train) confines
    # nothing. The worker passes MRIQ_DATA_ROOTS here.
    data_roots: tuple[Path, ...] | None = None

    def __post_init__(self) -> None:
        # Normalise types first (frozen: object.__setattr__) so that configs built from CLI
        # strings, JSON or Python values compare and serialise identically.
        object.__setattr__(self, "data_dir", _as_path("data_dir", self.data_dir))
        object.__setattr__(self, "out_dir", _as_path("out_dir", self.out_dir))
        if self.init_checkpoint is not None:
            object.__setattr__(
                self, "init_checkpoint", _as_path("init_checkpoint", self.init_checkpoint)
            )
        if self.data_roots is not None:
            if isinstance(self.data_roots, str | Path) or not isinstance(
                self.data_roots, list | tuple
            ):
                raise ValueError(f"data_roots: must be a list of folders, not {self.data_roots!r}")
            object.__setattr__(
                self, "data_roots", tuple(_as_path("data_roots", r) for r in self.data_roots)
            )
        try:
            object.__setattr__(self, "labels", as_label_mode(self.labels).value)
        except ValueError as exc:
            raise ValueError(f"labels: {exc}") from None
        if isinstance(self.resume, Path | str):
            text = str(self.resume).strip()
            if not text:
                raise ValueError("resume: must be None, 'auto' or a checkpoint path, not ''")
            object.__setattr__(self, "resume", "auto" if text == "auto" else Path(text))
        elif self.resume is not None:
            raise ValueError(f"resume: must be None, 'auto' or a path, not {self.resume!r}")
        self._validate()
        # Ints are accepted for float fields (``lr=1``) but stored as floats so that
        # to_dict() is stable whatever the caller passed.
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))

    def _validate(self) -> None:
        _choice("arch", self.arch, ARCHITECTURES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("clip", self.clip, CLIP_MODES)
        _choice("device", self.device, DEVICES)
        _choice("crop", self.crop, CROP_MODES)
        _int_at_least("epochs", self.epochs, 1)
        _int_at_least("image_size", self.image_size, 16)
        _int_at_least("batch_size", self.batch_size, 2)  # BatchNorm cannot train on 1 image
        _int_at_least("warmup_epochs", self.warmup_epochs, 0)
        _int_at_least("early_stopping_patience", self.early_stopping_patience, 0)
        _int_at_least("num_workers", self.num_workers, 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed: must be an integer, not {self.seed!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be in [0, 2**63), not {self.seed}")
        _positive_float("lr", self.lr)
        _positive_float("clip_value", self.clip_value)
        _positive_float("oversample", self.oversample)
        _float_in("weight_decay", self.weight_decay, 0.0, math.inf)
        _float_in("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _float_in("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _float_in("test_fraction", self.test_fraction, 0.0, 1.0, high_open=True)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave images for training, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        _float_in("rotation_degrees", self.rotation_degrees, 0.0, 180.0)
        _float_in("hflip_p", self.hflip_p, 0.0, 1.0)
        for name in ("finetune", "weighted_loss", "amp", "channels_last", "skip_unknown"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, not {getattr(self, name)!r}")
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise ValueError(
                f"weights: must be 'auto', 'none', 'imagenet' or a file path, not {self.weights!r}"
            )

    @property
    def resume_auto(self) -> bool:
        """True when ``resume="auto"`` (resume from ``out_dir/last.pt`` when present)."""
        return self.resume == "auto"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (paths as strings) that ``from_dict`` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [str(v) for v in value]
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are an error so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        missing = [name for name in ("data_dir", "out_dir") if name not in data]
        if missing:
            raise ValueError(f"missing TrainConfig field(s): {', '.join(missing)}")
        return cls(**data)


def _as_path(name: str, value: object) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value.strip():
        return Path(value)
    raise ValueError(f"{name}: must be a non-empty path, not {value!r}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _int_at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: must be an integer, not {value!r}")
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, not {value}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: must be finite, not {value!r}")
    return number


def _positive_float(name: str, value: object) -> None:
    if _number(name, value) <= 0:
        raise ValueError(f"{name}: must be > 0, not {value!r}")


def _float_in(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    number = _number(name, value)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name}: must be in {left}{low}, {high}{right}, not {value!r}")
