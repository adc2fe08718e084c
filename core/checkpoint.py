"""Checkpoint files: model weights + metadata (+ optional resume state), sha256-verified.

File layout (a plain dict so ``torch.load(weights_only=True)`` can read it, i.e. no pickled
classes): ``{"format": "mriq-checkpoint", "format_version": 1, "meta": {...},
"model_state": state_dict, "training_state": dict | None}``. Every save goes through a
temporary file and ``os.replace`` so a crash never leaves a half-written checkpoint, and a
``<path>.sha256`` sidecar (``sha256sum`` format) records the digest of the written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from core.atomicio import write_bytes_atomically
from core.calibration import Calibration
from core.labels import as_label_mode
from core.models import build_model
from core.transforms import PresetParams

CHECKPOINT_FORMAT = "mriq-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_CHUNK = 1 << 20

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointMeta",
    "ChecksumMismatchError",
    "LoadedCheckpoint",
    "current_versions",
    "file_sha256",
    "load_checkpoint",
    "move_checkpoint",
    "read_sidecar",
    "save_checkpoint",
    "state_dict_sha256",
]


# The (path, reason) exception shape of core.errors.ImageReadError: alike by design, each
# with its own type so callers can tell a bad checkpoint from a bad image.
class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not an mriq checkpoint."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ChecksumMismatchError(CheckpointError):
    """The checkpoint file's sha256 differs from the expected one (corrupt or replaced)."""

    def __init__(self, path: Path | str, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(path, f"sha256 mismatch: expected {expected}, file has {actual}")


def current_versions() -> dict[str, str]:
    """Library versions recorded with every checkpoint (for reproducibility audits)."""
    try:
        mriq_version = metadata.version("mriq")
    except metadata.PackageNotFoundError:
        mriq_version = "unknown"
    return {
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "mriq": mriq_version,
    }


# Field lists alike by shape to core.evaluation's records: see the note there.
@dataclass(frozen=True)
class CheckpointMeta:
    """What a model is: architecture, label space, preprocessing and how it was trained."""

    arch: str
    classes: tuple[str, ...]
    label_mode: str
    preset: PresetParams
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=current_versions)
    # sha256 of the weights alone (see state_dict_sha256); filled in by save_checkpoint, so
    # best.pt and last.pt holding the same weights share it while their file hashes differ.
    weights_sha256: str = ""
    # Temperature scaling fitted at the end of training; a checkpoint written before that
    # existed has no "calibration" entry and loads as Calibration() (T = 1.0, calibrated
    # False), so its confidences stay the raw softmax and its record says so.
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "label_mode", as_label_mode(self.label_mode).value)
        # Not forced to equal classes_for(label_mode): tests and future label subsets may use
        # fewer classes; the output size of the model is len(classes) either way.
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be >= 2 distinct names, not {self.classes!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (str/list/dict/float only) that ``torch.load(weights_only=True)`` reads."""
        return {
            "arch": self.arch,
            "classes": list(self.classes),
            "label_mode": self.label_mode,
            "preset": self.preset.to_dict(),
            "config": dict(self.config),
            "metrics": dict(self.metrics),
            "versions": dict(self.versions),
            "weights_sha256": self.weights_sha256,
            "calibration": self.calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        return cls(
            arch=str(data["arch"]),
            classes=tuple(data["classes"]),
            label_mode=str(data["label_mode"]),
            preset=PresetParams.from_dict(dict(data["preset"])),
            config=dict(data.get("config") or {}),
            metrics=dict(data.get("metrics") or {}),
            versions=dict(data.get("versions") or {}),
            weights_sha256=str(data.get("weights_sha256", "")),
            calibration=Calibration.from_dict(data.get("calibration")),
        )


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model ready for inference (eval mode, on the requested device) and its metadata."""

    model: nn.Module
    meta: CheckpointMeta
    sha256: str
    training_state: dict[str, Any] | None


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state_dict, in key order."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # view as bytes so every dtype (incl. bool/bfloat16) hashes without numpy
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def move_checkpoint(src: Path | str, dst: Path | str) -> bool:
    """Rename ``src`` (and its sidecar, re-pointed at the new name) to ``dst``, replacing
    what is there; returns False when ``src`` does not exist. Renames need no disk space."""
    src, dst = Path(src), Path(dst)
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        return False
    try:
        os.replace(sidecar_path(src), sidecar_path(dst))
    except FileNotFoundError:
        sidecar_path(dst).unlink(missing_ok=True)
        return True
    digest = read_sidecar(dst)
    if digest is not None:
        # Best effort: ``sha256sum -c`` should check the new name; on a full disk the moved
        # sidecar (whose digest is what verification reads) stays as it is.
        with contextlib.suppress(OSError):
            write_bytes_atomically(sidecar_path(dst), f"{digest}  {dst.name}\n".encode())
    return True


def save_checkpoint(
    path: Path | str,
    *,
    model: nn.Module,
    meta: CheckpointMeta,
    training_state: dict[str, Any] | None = None,
) -> str:
    """Write ``model``'s weights and ``meta`` (and resume state) atomically; return the sha256.

    Tensors are saved on the CPU so a checkpoint written on a GPU loads anywhere.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = replace(meta, weights_sha256=state_dict_sha256(state))
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "meta": meta.to_dict(),
        "model_state": state,
        "training_state": training_state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    write_bytes_atomically(path, data, what="the checkpoint")
    # The sidecar is written after the file: a crash in between leaves a stale sidecar, which
    # a verifier reports as a mismatch rather than silently accepting the wrong file.
    write_bytes_atomically(sidecar_path(path), f"{digest}  {path.name}\n".encode())
    return digest


def sidecar_path(path: Path | str) -> Path:
    """``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: Path | str) -> str | None:
    """The digest recorded in ``<path>.sha256``, or None when there is no sidecar."""
    try:
        text = sidecar_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return text.split()[0] if text.strip() else None


def load_checkpoint(
    path: Path | str,
    *,
    expected_sha256: str | None = None,
    device: torch.device | str = "cpu",
) -> LoadedCheckpoint:
    """Read, verify and rebuild a checkpoint written by ``save_checkpoint``.

    The bytes are hashed and deserialised from the same in-memory copy, so what was verified
    is what gets loaded. Raises ``ChecksumMismatchError`` when ``expected_sha256`` is given
    and differs, ``CheckpointError`` for anything that is not a readable mriq checkpoint.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(path, "checkpoint file not found") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.strip().lower():
        raise ChecksumMismatchError(path, expected_sha256, digest)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            path, f"not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, "not an mriq checkpoint (no 'format' marker)")
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(path, f"unsupported checkpoint format version {version!r}")
    try:
        meta = CheckpointMeta.from_dict(payload["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid metadata ({exc})") from None
    # Building initialises layers from the global torch RNG; fork it so loading a checkpoint
    # (e.g. mid-training) never changes the random stream of the caller.
    with torch.random.fork_rng(devices=[]):
        model = build_model(meta.arch, len(meta.classes), weights="none")
    try:
        model.load_state_dict(payload["model_state"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(path, f"weights do not fit {meta.arch}: {exc}") from None
    model.to(device).eval()
    training_state = payload.get("training_state")
    return LoadedCheckpoint(
        model=model,
        meta=meta,
        sha256=digest,
        training_state=training_state if isinstance(training_state, dict) else None,
    )
