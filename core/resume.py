"""Resuming a training run: which checkpoint to resume from, and the RNG state it carries.

``last.pt`` holds, besides the weights, everything the next epoch depends on (optimizer,
schedules, scaler, data generators, the torch/numpy/python RNG states), so on CPU a resumed
run ends with bit-identical weights to an uninterrupted one. RNG states are stored as plain
lists and ints: checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    move_checkpoint,
    read_sidecar,
)
from core.config import TrainConfig
from core.optimization import Optimization
from core.training_data import TrainingData
from core.training_report import EpochMetrics

__all__ = [
    "TRAINING_STATE_VERSION",
    "Progress",
    "checked_training_state",
    "config_drift",
    "find_resume",
    "restore_training_state",
    "rng_state",
    "set_rng_state",
    "training_state",
]

TRAINING_STATE_VERSION = 1
# Where/how the run executes may change between attempts without changing its trajectory.
_DRIFT_IGNORED = frozenset({"out_dir", "resume", "device", "num_workers", "data_dir", "data_roots"})


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch, numpy, python (and CUDA) RNG states, as plain data."""
    # legacy tuple form: (name, key array, pos, has_gauss, cached_gaussian)
    np_state: Any = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
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


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned (CUDA only on the same number of devices)."""
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


def _resume_path(resume: str | Path | None, last: Path, previous: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        for path in (last, previous):
            if path.is_file():
                return path
        return None
    return Path(resume)


def find_resume(
    resume: str | Path | None, *, last: Path, previous: Path, log: Callable[[str], None]
) -> tuple[Path, LoadedCheckpoint] | None:
    """The checkpoint to resume from, verified against its sha256 sidecar.

    An explicit ``resume`` path must load. With ``resume="auto"`` a corrupt or unreadable
    ``last`` (a crash mid-write on storage that ignores fsync, a bad disk) falls back to
    ``previous``, the epoch before, and without a usable one the run starts fresh; either
    way ``log`` says so. An unusable file is renamed to ``<name>.corrupt`` so the next
    epoch's rotation cannot replace the good previous one.
    """
    path = _resume_path(resume, last, previous)
    if path is None:
        return None
    if resume != "auto":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: resume checkpoint not found")
        return path, load_checkpoint(path, expected_sha256=read_sidecar(path))
    for candidate in (last, previous):
        if not candidate.is_file():
            continue
        try:
            ckpt = load_checkpoint(candidate, expected_sha256=read_sidecar(candidate))
        except CheckpointError as exc:
            log(f"warning: cannot resume from {exc}; renamed to {candidate.name}.corrupt")
            move_checkpoint(candidate, candidate.with_name(candidate.name + ".corrupt"))
            continue
        if candidate != last:
            log(f"warning: resuming from {candidate}, the epoch before the lost last.pt")
        return candidate, ckpt
    log("warning: no usable checkpoint to resume from: starting fresh")
    return None


def config_drift(path: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The warning for settings that changed since ``path`` was saved (they change the
    trajectory; the run continues, extending epochs is a legitimate use), or None."""
    changed = sorted(
        k for k in now if k not in _DRIFT_IGNORED and k in saved and saved[k] != now[k]
    )
    if not changed:
        return None
    return f"warning: resuming {path} with changed settings: " + ", ".join(
        f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed
    )


@dataclass
class Progress:
    """How far a run got (mutable: the loop advances it); saved in ``last.pt``."""

    history: list[EpochMetrics] = field(default_factory=list)
    #: Epochs completed; the next one to run, counting from 0.
    start_epoch: int = 0
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    best_sha256: str = ""
    bad_epochs: int = 0
    finished: bool = False
    stopped_early: bool = False


def training_state(
    progress: Progress,
    opt: Optimization,
    data: TrainingData,
    *,
    device: torch.device,
    config: TrainConfig,
) -> dict[str, Any]:
    """Everything the next epoch depends on, as stored in ``last.pt``."""
    return {
        "version": TRAINING_STATE_VERSION,
        "epoch": progress.start_epoch,
        "global_step": progress.global_step,
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.batch_scheduler.state_dict() if opt.batch_scheduler else None,
        "plateau": opt.plateau.state_dict() if opt.plateau else None,
        "scaler": opt.scaler.state_dict(),
        "sampler_generator": data.sampler_generator.get_state(),
        "loader_generator": data.loader_generator.get_state(),
        "val_generator": data.val_generator.get_state(),
        "rng": rng_state(device),
        "best_score": progress.best_score,
        "best_epoch": progress.best_epoch,
        "best_sha256": progress.best_sha256,
        "bad_epochs": progress.bad_epochs,
        "finished": progress.finished,
        "stopped_early": progress.stopped_early,
        "history": [m.to_dict() for m in progress.history],
        "split_fingerprint": data.fingerprint,
        "config": config.to_dict(),
    }


def checked_training_state(
    path: Path,
    ckpt: LoadedCheckpoint,
    *,
    config: TrainConfig,
    classes: tuple[str, ...],
    fingerprint: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """``ckpt``'s training state when this run can resume from it (ValueError otherwise);
    changed settings and a changed split are warnings."""
    state = ckpt.training_state
    if state is None:
        raise ValueError(
            f"{path}: has no training state (best.pt files cannot be resumed; use last.pt)"
        )
    if ckpt.meta.arch != config.arch or tuple(ckpt.meta.classes) != classes:
        raise ValueError(
            f"{path}: checkpoint is {ckpt.meta.arch} with {len(ckpt.meta.classes)} classes, "
            f"this run is {config.arch} with {len(classes)}"
        )
    if state.get("version") != TRAINING_STATE_VERSION:
        raise ValueError(f"{path}: unsupported training state version {state.get('version')}")
    drift = config_drift(path, state.get("config") or {}, config.to_dict())
    if drift is not None:
        log(drift)
    if state.get("split_fingerprint") != fingerprint:
        log(
            f"warning: {path} was trained on a different split of the data (files changed "
            "since); resuming anyway"
        )
    return state


def restore_training_state(
    state: Mapping[str, Any], opt: Optimization, data: TrainingData, *, device: torch.device
) -> Progress:
    """Load ``state`` into the run's optimisation and data generators; its progress."""
    opt.optimizer.load_state_dict(state["optimizer"])
    if opt.batch_scheduler is not None and state["scheduler"] is not None:
        opt.batch_scheduler.load_state_dict(state["scheduler"])
    if opt.plateau is not None and state["plateau"] is not None:
        opt.plateau.load_state_dict(state["plateau"])
    opt.scaler.load_state_dict(state["scaler"])
    data.sampler_generator.set_state(state["sampler_generator"])
    data.loader_generator.set_state(state["loader_generator"])
    data.val_generator.set_state(state["val_generator"])
    progress = Progress(
        history=[EpochMetrics.from_dict(d) for d in state["history"]],
        start_epoch=int(state["epoch"]),
        global_step=int(state["global_step"]),
        best_score=state["best_score"],
        best_epoch=int(state["best_epoch"]),
        best_sha256=str(state["best_sha256"]),
        bad_epochs=int(state["bad_epochs"]),
        finished=bool(state["finished"]),
        stopped_early=bool(state["stopped_early"]),
    )
    # Last: everything built above may have drawn random numbers.
    set_rng_state(state["rng"], device)
    return progress
