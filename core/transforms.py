"""Turn a decoded grayscale slice into a model input tensor.

Input: the HxW float32 array in [0, 1] from :func:`core.imaging.read_image`. Output: a
3xSxS float32 tensor.

How grayscale meets 3-channel torchvision models: the single channel is replicated to
three identical channels and then normalised with the ImageNet per-channel mean/std.
Pretrained first-layer filters were learnt on RGB images normalised that way; a gray
pixel of value v looks to them exactly like an RGB pixel (v, v, v), so the pretrained
filters apply unchanged and no layer of the network needs to be altered. (Summing the
first-layer filters over their input channels would be equivalent but would make the
architecture depend on the input format.)

Resizing is aspect-preserving: the longer side is scaled to S with antialiased bilinear
interpolation and the shorter side is padded symmetrically with black (0.0, the MRI
background) to S. Brain crops have varying aspect ratios, and stretching them would
change the anatomy's shape from image to image; padding with the background does not.

``EvalPreset`` (also exported as ``InferencePreset``) is deterministic: crop, resize,
replicate, normalise. ``TrainPreset`` adds a random rotation (uniform in
±``rotation_degrees``, black fill) and a horizontal flip (probability ``hflip_p``), both
drawn from the ``torch.Generator`` passed to each call and never from global RNG state,
so a (seed, epoch, index) generator reproduces an augmented sample exactly. Augmentation
lives here and only here, never inside a model, so it cannot leak into evaluation or
inference.

All steps operate on a single channel until the final replicate-and-normalise, which
keeps the per-image cost low inside DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import cv2
import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from core.cropping import CROP_MODES, CropMode, apply_crop

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalPreset",
    "InferencePreset",
    "PresetParams",
    "TrainPreset",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PresetParams:
    """Everything that defines the preprocessing; stored with each checkpoint."""

    image_size: int = 224
    crop: CropMode = "brain"
    rotation_degrees: float = 15.0
    hflip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"image_size must be an int, got {self.image_size!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if not 0.0 <= float(self.rotation_degrees) <= 180.0:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")
        if not 0.0 <= float(self.hflip_p) <= 1.0:
            raise ValueError(f"hflip_p must be in [0, 1], got {self.hflip_p}")
        # Lists arrive from JSON; store tuples so the params stay hashable and immutable.
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std must have 3 values (one per RGB channel)")
        if any(not s > 0 for s in std):
            raise ValueError(f"std values must be > 0, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "rotation_degrees", float(self.rotation_degrees))
        object.__setattr__(self, "hflip_p", float(self.hflip_p))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PresetParams:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error
        (a preset from a newer version would otherwise be silently misapplied)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PresetParams keys: {unknown}")
        return cls(**{k: data[k] for k in known if k in data})


class _Preset:
    def __init__(self, *, params: PresetParams) -> None:
        self.params = params
        # Shaped for broadcasting over 3xSxS; created once, reused for every image.
        self._mean = torch.tensor(params.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(params.std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(params={self.params!r})"

    def _prepare(self, img: np.ndarray, reduction: float = 1.0) -> torch.Tensor:
        """Crop and letterbox to 1xSxS (``reduction``: see :func:`core.cropping.apply_crop`)."""
        if not isinstance(img, np.ndarray) or img.ndim != 2:
            shape = getattr(img, "shape", None)
            raise ValueError(f"expected a 2-D grayscale numpy array, got {type(img)} {shape}")
        cropped = apply_crop(img, self.params.crop, reduction=reduction)
        t = torch.from_numpy(np.ascontiguousarray(cropped, dtype=np.float32))
        return _letterbox(t, self.params.image_size)

    def _normalise(self, gray: torch.Tensor) -> torch.Tensor:
        # (x - mean) / std, dividing in place into the difference's fresh 3xSxS tensor.
        return torch.sub(gray.expand(3, -1, -1), self._mean).div_(self._std)


class EvalPreset(_Preset):
    """Deterministic preprocessing for validation, test and inference."""

    def __call__(self, img: np.ndarray, *, reduction: float = 1.0) -> torch.Tensor:
        """``reduction``: ``img`` was decoded at 1/reduction of the file's size
        (:class:`core.imaging.DecodedImage`); 1.0 for a full-size decode."""
        return self._normalise(self._prepare(img, reduction))


InferencePreset = EvalPreset


class TrainPreset(_Preset):
    """Preprocessing plus augmentation; all randomness comes from ``generator``."""

    def __call__(self, img: np.ndarray, *, generator: torch.Generator) -> torch.Tensor:
        gray = self._prepare(img)
        # Both draws happen on every call, even when an augmentation is disabled, so the
        # generator's stream (and thus every later draw) does not depend on the params.
        draws = torch.rand(2, generator=generator)
        angle = (float(draws[0]) * 2.0 - 1.0) * self.params.rotation_degrees
        if angle != 0.0:
            gray = cast(
                torch.Tensor,
                tvf.rotate(gray, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0),
            )
        if float(draws[1]) < self.params.hflip_p:
            gray = gray.flip(-1)
        return self._normalise(gray)


def _letterbox(img: torch.Tensor, size: int) -> torch.Tensor:
    """HxW in [0, 1] -> 1 x size x size: longer side to ``size``, centred, black padding."""
    h, w = img.shape
    scale = size / max(h, w)
    nh = min(size, max(1, round(h * scale)))
    nw = min(size, max(1, round(w * scale)))
    if (nh, nw) != (h, w) and nh >= h and nw >= w:
        # Enlarging (a JPEG decoded at reduced scale, then cropped): antialiasing has nothing
        # to do there, and OpenCV's bilinear is the same interpolation (half-pixel centres,
        # equal to ~1e-6) at a tenth of torch's cost on one core.
        enlarged = cv2.resize(img.numpy(), (nw, nh), interpolation=cv2.INTER_LINEAR)
        resized = torch.from_numpy(enlarged)[None].clamp_(0.0, 1.0)
    elif (nh, nw) != (h, w):
        resized = nnf.interpolate(
            img[None, None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
        )[0]
        # Bilinear with antialiasing can overshoot slightly at sharp edges.
        resized = resized.clamp_(0.0, 1.0)
    else:
        resized = img[None].clone()
    if (nh, nw) == (size, size):
        return resized
    top = (size - nh) // 2
    left = (size - nw) // 2
    out = torch.zeros((1, size, size), dtype=torch.float32)
    out[:, top : top + nh, left : left + nw] = resized
    return out
