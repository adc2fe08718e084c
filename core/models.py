"""CNN architectures: torchvision builders with a ``num_classes`` head and weight loading.

ImageNet weights come through torchvision's own ``Weights`` enums (so their hash check and
architecture-specific key fixes, e.g. DenseNet's, stay in force) and therefore through the
torch hub cache (``torch.hub.get_dir()/checkpoints``). Without network access they must be
placed there beforehand; otherwise ``WeightsUnavailableError`` says which file and where.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from core.config import ARCHITECTURES, DEFAULT_ARCH

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCH",
    "WeightsUnavailableError",
    "build_model",
    "head_module",
    "head_name",
    "imagenet_weights_cache_file",
    "is_imagenet_cached",
    "resolve_weights",
]


@dataclass(frozen=True)
class _ArchSpec:
    builder: Callable[..., nn.Module]
    weights: type[WeightsEnum]
    # Dotted path of the final Linear layer that maps features to class logits.
    head: str


_SPECS: dict[str, _ArchSpec] = {
    "efficientnet_b0": _ArchSpec(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights, "classifier.1"),
    "efficientnet_b3": _ArchSpec(tvm.efficientnet_b3, tvm.EfficientNet_B3_Weights, "classifier.1"),
    "resnet18": _ArchSpec(tvm.resnet18, tvm.ResNet18_Weights, "fc"),
    "resnet50": _ArchSpec(tvm.resnet50, tvm.ResNet50_Weights, "fc"),
    "densenet121": _ArchSpec(tvm.densenet121, tvm.DenseNet121_Weights, "classifier"),
    "mobilenet_v3_large": _ArchSpec(
        tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights, "classifier.3"
    ),
    "convnext_tiny": _ArchSpec(tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights, "classifier.2"),
}
assert tuple(_SPECS) == ARCHITECTURES  # one registry, two views; keep them in step


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (not cached and not downloadable)."""

    def __init__(self, arch: str, source: str, cache_dir: Path, cause: BaseException | str):
        self.arch = arch
        self.source = source
        self.cache_dir = cache_dir
        self.cause = cause
        super().__init__(
            f"ImageNet weights for {arch} are unavailable: {source} is not in the torch hub "
            f"cache {cache_dir} and could not be downloaded ({_describe(cause)}). Copy the "
            f"file into {cache_dir} (or point torch.hub.set_dir / TORCH_HOME at a cache that "
            f"has it), or train with weights='none'."
        )


def _describe(cause: BaseException | str) -> str:
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return cause


def _spec(arch: str) -> _ArchSpec:
    try:
        return _SPECS[arch]
    except KeyError:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        ) from None


def _imagenet_weights(arch: str) -> WeightsEnum:
    weights: WeightsEnum = _spec(arch).weights.DEFAULT
    return weights


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights_cache_file(arch: str) -> Path:
    """Where torchvision's loader looks for (and stores) ``arch``'s ImageNet weights."""
    url = _imagenet_weights(arch).url
    return _hub_checkpoint_dir() / Path(urlparse(url).path).name


def is_imagenet_cached(arch: str) -> bool:
    """True when ``arch``'s ImageNet weights are already in the torch hub cache."""
    return imagenet_weights_cache_file(arch).is_file()


def resolve_weights(
    spec: str,
    *,
    arch: str = DEFAULT_ARCH,
    on_warning: Callable[[str], None] | None = None,
) -> str:
    """Turn ``"auto"`` into ``"imagenet"`` (weights cached) or ``"none"`` (with a warning).

    Other specs (``"none"``, ``"imagenet"``, a path) come back unchanged; a path must name
    an existing file. The warning goes to ``on_warning`` when given, else to ``warnings``.
    """
    text = spec.strip()
    if text in ("none", "imagenet"):
        return text
    if text == "auto":
        if is_imagenet_cached(arch):
            return "imagenet"
        message = (
            f"ImageNet weights for {arch} are not cached at "
            f"{imagenet_weights_cache_file(arch)}; training from random initialisation "
            f"(weights='none'). Pass weights='imagenet' to download them."
        )
        if on_warning is not None:
            on_warning(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=2)
        return "none"
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"{path}: weights must be 'auto', 'none', 'imagenet' or an existing file"
        )
    return text


def head_name(arch: str) -> str:
    """Dotted module path of ``arch``'s classification head (its state_dict key prefix)."""
    return _spec(arch).head


def head_module(model: nn.Module, arch: str) -> nn.Linear:
    """The classification head (final Linear) of a model built by ``build_model``."""
    head = model.get_submodule(_spec(arch).head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{arch}: expected a Linear head at {_spec(arch).head}, got {head}")
    return head


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    path = _spec(arch).head
    parent_name, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = head_module(model, arch)
    setattr(parent, child_name, nn.Linear(old.in_features, num_classes))


def build_model(
    arch: str,
    num_classes: int,
    *,
    weights: str = "none",
    finetune: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> nn.Module:
    """Build ``arch`` with a fresh ``num_classes`` head.

    ``weights``: ``"none"`` (random init), ``"imagenet"`` (torchvision's default ImageNet
    weights for the backbone), ``"auto"`` (see ``resolve_weights``) or the path of a
    state_dict / mriq checkpoint file (its head is kept only when the shapes match).
    ``finetune=True`` freezes every parameter except the head's.
    """
    spec = _spec(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, not {num_classes!r}")
    resolved = resolve_weights(weights, arch=arch, on_warning=on_warning)
    model = _build_imagenet(arch) if resolved == "imagenet" else spec.builder(weights=None)
    _replace_head(model, arch, num_classes)
    if resolved not in ("none", "imagenet"):
        _load_weights_file(model, arch, Path(resolved))
    if finetune:
        # Only the head learns; the pretrained features stay as they are. BatchNorm
        # statistics still adapt in train mode, which helps on a new image domain.
        for param in model.parameters():
            param.requires_grad_(False)
        for param in head_module(model, arch).parameters():
            param.requires_grad_(True)
    return model


def _build_imagenet(arch: str) -> nn.Module:
    spec = _spec(arch)
    weights = _imagenet_weights(arch)
    try:
        # The builder downloads/loads through weights.get_state_dict (torch hub cache,
        # hash-checked) and applies any architecture-specific key fixes.
        return spec.builder(weights=weights, progress=False)
    except Exception as exc:  # network, hash and corrupt-file errors all mean "unavailable"
        raise WeightsUnavailableError(
            arch, imagenet_weights_cache_file(arch).name, _hub_checkpoint_dir(), exc
        ) from exc


def _read_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read weights file ({exc.strerror or exc})") from None
    try:
        obj: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: not a loadable state_dict or mriq checkpoint ({type(exc).__name__}: "
            f"{exc})"
        ) from None
    if isinstance(obj, dict) and "model_state" in obj:
        # An mriq checkpoint (core.checkpoint); refuse a different architecture early with
        # a clearer message than a key mismatch would give.
        meta = obj.get("meta")
        ckpt_arch = meta.get("arch") if isinstance(meta, dict) else None
        if ckpt_arch is not None and ckpt_arch != arch:
            raise ValueError(f"{path}: checkpoint is a {ckpt_arch} model, not {arch}")
        obj = obj["model_state"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{path}: does not contain a state_dict (name -> tensor mapping)")
    return obj


def _load_weights_file(model: nn.Module, arch: str, path: Path) -> None:
    state = _read_state_dict(path, arch)
    head_prefix = _spec(arch).head + "."
    own = model.state_dict()
    # A head trained for another label space (or ImageNet's 1000 classes) cannot be reused;
    # the fresh head stays and only the backbone is loaded.
    filtered = {
        k: v
        for k, v in state.items()
        if not (k.startswith(head_prefix) and k in own and own[k].shape != v.shape)
    }
    try:
        missing, unexpected = model.load_state_dict(filtered, strict=False)
    except RuntimeError as exc:  # tensor shape mismatches inside the backbone
        raise ValueError(f"{path}: weights do not fit {arch}: {exc}") from None
    missing = [k for k in missing if not k.startswith(head_prefix)]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected key(s), e.g. {list(unexpected)[:3]}")
        raise ValueError(f"{path}: weights do not fit {arch}: {'; '.join(detail)}")
