"""Grad-CAM explanations (Selvaraju et al. 2017) of a checkpoint's predictions.

The library is captum's ``LayerGradCam``, chosen by measuring it against ``grad-cam``
(pytorch-grad-cam 1.5.7) on CPU, weights=None, batch 8, 2 threads, on a shared 2-core box
(best of 3; "x" is the time of one batched forward+backward over a plain inference-mode
forward of the same batch):

    model            size  plain        grad-cam 1.5.7     captum 0.9.0
    resnet18         64    2.5 ms/img   12.8 ms/img 5.1x    2.6 ms/img 1.05x
    resnet18         128   12.8 ms/img  21.6 ms/img 1.7x    7.6 ms/img 0.6x (noise)
    efficientnet_b0  64    3.0 ms/img   13.3 ms/img 4.4x    7.5 ms/img 2.5x
    efficientnet_b0  128   7.1 ms/img   26.9 ms/img 3.8x    6.5 ms/img 0.9x (noise)

Both do one batched forward and one backward per batch (counted with hooks). End to end
(``python -m bench.explanation``: decode, Grad-CAM, PNG + .npy written) an image costs 0.8-1.6x
its plain classification by ``core.inference.Predictor`` (efficientnet_b0 and resnet18 at
224, CPU; bench/README.md, "Explanation cost"); the target is <= 3x. captum is
faster because it asks autograd for the gradient of the target layer's output only
(``torch.autograd.grad``), so with the parameters frozen nothing before that layer keeps a
graph and the backward stops at the layer; ``grad-cam`` needs parameters that require
grad and runs ``loss.backward()`` through the whole network, accumulating every weight's
gradient. captum also brings no OpenCV (``grad-cam`` pulls opencv-python-headless and
ttach). The explainer runs on its own frozen copy of the checkpoint's model: the cached,
BatchNorm-folded inference model (:func:`core.inference.prepare_inference_model`) has no
autograd and is shared with every predictor of the process, so it is never touched here.

The overlay is drawn over what the model saw: the image decoded by
:func:`core.imaging.read_image`, cropped and letterboxed by the checkpoint's
:class:`core.transforms.EvalPreset` (the predictor's preprocessing), de-normalised to gray.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from core.devices import select_device
from core.errors import ImageReadError
from core.imaging import read_image
from core.transforms import EvalPreset

if TYPE_CHECKING:
    from core.checkpoint import LoadedCheckpoint

__all__ = [
    "OVERLAY_ALPHA",
    "TARGET_LAYERS",
    "Explainer",
    "Explanation",
    "GradCam",
    "explain_batch",
    "grad_cam",
    "overlay_image",
    "target_layer",
]

#: Dotted path of the layer whose activations Grad-CAM weighs, per architecture: the last
#: convolutional block, whose maps are the finest that still see the whole class evidence.
TARGET_LAYERS: dict[str, str] = {
    "efficientnet_b0": "features.8",  # the final 1x1 Conv-BN-SiLU (1280 channels)
    "efficientnet_b3": "features.8",  # the final 1x1 Conv-BN-SiLU (1536 channels)
    "resnet18": "layer4",
    "resnet50": "layer4",
    # norm5 is the last module of ``features``; the ReLU after it is functional, in forward.
    "densenet121": "features.norm5",
    "mobilenet_v3_large": "features.16",  # the final 1x1 Conv-BN-Hardswish (960 channels)
    "convnext_tiny": "features.7",  # the last stage (768 channels, stride 32)
}

#: Weight of the heat map in the overlay; the slice stays readable underneath.
OVERLAY_ALPHA = 0.45
_COLORMAP = "jet"


def target_layer(model: nn.Module, arch: str) -> nn.Module:
    """The Grad-CAM layer of a model built by :func:`core.models.build_model` for ``arch``."""
    try:
        path = TARGET_LAYERS[arch]
    except KeyError:
        raise ValueError(
            f"no Grad-CAM target layer for architecture {arch!r}; known: "
            f"{', '.join(TARGET_LAYERS)}"
        ) from None
    return model.get_submodule(path)


@dataclass(frozen=True)
class GradCam:
    """Grad-CAM maps of a batch and the logits of the same forward pass."""

    maps: np.ndarray  # N x H x W float32 in [0, 1], each image scaled by its own maximum
    logits: torch.Tensor  # N x C, detached
    targets: torch.Tensor  # N class indices that were explained


def grad_cam(
    model: nn.Module,
    layer: nn.Module,
    batch: torch.Tensor,
    *,
    target: Sequence[int] | None = None,
) -> GradCam:
    """Grad-CAM of ``layer`` for ``target`` (default: each image's argmax) in one forward and
    one backward pass over the whole batch.

    ``model`` must be in eval mode (it is not switched). Its parameters may be frozen: the
    gradient is taken with respect to ``layer``'s output only.
    """
    # Imported here: captum.attr takes seconds to import, paid only by callers that explain.
    from captum.attr import LayerAttribution, LayerGradCam

    if batch.dim() != 4:
        raise ValueError(f"expected an N x C x H x W batch, got shape {tuple(batch.shape)}")
    if target is not None and len(target) != batch.shape[0]:
        raise ValueError(f"{len(target)} targets for a batch of {batch.shape[0]} images")
    seen: dict[str, torch.Tensor] = {}

    def scores(x: torch.Tensor) -> torch.Tensor:
        # The explained class is picked inside the one forward pass, so the predicted class
        # needs no forward of its own; captum then differentiates one score per image.
        logits: torch.Tensor = model(x)
        chosen = (
            logits.detach().argmax(dim=1)
            if target is None
            else torch.as_tensor(list(target), dtype=torch.long, device=logits.device)
        )
        seen["logits"], seen["targets"] = logits.detach(), chosen
        return logits.gather(1, chosen[:, None]).squeeze(1)

    with torch.enable_grad():
        raw = LayerGradCam(scores, layer).attribute(batch, relu_attributions=True)
    maps = LayerAttribution.interpolate(
        raw.detach().float(), tuple(batch.shape[-2:]), interpolate_mode="bilinear"
    )[:, 0]
    # Bilinear upsampling of non-negative maps stays non-negative; the clamp absorbs rounding.
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = (maps / peak[:, None, None]).clamp_(0.0, 1.0)
    return GradCam(
        maps=scaled.cpu().numpy().astype(np.float32, copy=False),
        logits=seen["logits"],
        targets=seen["targets"],
    )


def explain_batch(
    model: nn.Module, batch: torch.Tensor, *, arch: str, target: Sequence[int] | None = None
) -> np.ndarray:
    """N x H x W Grad-CAM maps in [0, 1] of ``batch`` (preprocessed inputs) for ``target``
    (default: the predicted class of each image). ``model`` is a built ``arch`` in eval mode."""
    return grad_cam(model, target_layer(model, arch), batch, target=target).maps


def overlay_image(
    gray: np.ndarray, heat: np.ndarray, *, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """H x W x 3 uint8: ``heat`` (H x W in [0, 1]) in the jet colormap blended over ``gray``."""
    import matplotlib

    if gray.shape != heat.shape:
        raise ValueError(f"image {gray.shape} and map {heat.shape} differ in size")
    colours = matplotlib.colormaps[_COLORMAP](np.clip(heat, 0.0, 1.0))[..., :3]
    base = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2)
    blended: np.ndarray = (1.0 - alpha) * base + alpha * colours
    return np.round(blended * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class Explanation:
    """One input's explanation: its prediction and artifacts, or the error that stopped it."""

    path: str
    label: str | None
    confidence: float | None  # calibrated, as core.inference reports it
    overlay_png: Path | None
    map_npy: Path | None
    error: str | None  # names the file and the reason

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class _Read:
    path: str
    tensor: torch.Tensor | None  # 3 x S x S, the model's input
    error: str | None


class Explainer:
    """Explains a checkpoint's predictions of image files; create once, :meth:`explain` often.

    Runs on a frozen copy of ``ckpt.model`` on ``device`` (``ckpt.model`` itself and the
    predictors' cached inference model stay as they are). ``roots`` confines every read.
    """

    def __init__(
        self,
        ckpt: LoadedCheckpoint,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        roots: Sequence[Path | str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.arch = ckpt.meta.arch
        self.classes: tuple[str, ...] = tuple(ckpt.meta.classes)
        self.temperature = float(ckpt.meta.calibration.temperature)
        self.device = select_device(device)
        self.batch_size = batch_size
        self.roots: tuple[Path | str, ...] | None = None if roots is None else tuple(roots)
        self.preset = EvalPreset(params=ckpt.meta.preset)
        model = copy.deepcopy(ckpt.model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.layer = target_layer(self.model, self.arch)
        self._mean = float(ckpt.meta.preset.mean[0])
        self._std = float(ckpt.meta.preset.std[0])

    def explain(
        self,
        paths: Iterable[Path | str],
        out_dir: Path,
        *,
        names: Iterable[str] | None = None,
    ) -> Iterator[Explanation]:
        """One :class:`Explanation` per input, in input order, writing
        ``out_dir/<name>.png`` (overlay) and ``out_dir/<name>.npy`` (the S x S float32 map).

        ``names`` gives each input's file stem (one per path; the same name overwrites, so a
        re-run is idempotent); by default ``<index>_<file stem>``. The next batch is read in
        a background thread while the current one is explained.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        named = _named(paths, names)
        with ThreadPoolExecutor(1, thread_name_prefix="mriq-explain-read") as pool:
            pending: Future[list[_Read]] | None = None
            chunk = _take(named, self.batch_size)
            if chunk:
                pending = pool.submit(self._read_all, [p for p, _ in chunk])
            while pending is not None:
                reads = pending.result()
                current = chunk
                chunk = _take(named, self.batch_size)
                pending = pool.submit(self._read_all, [p for p, _ in chunk]) if chunk else None
                yield from self._explain_reads(reads, [n for _, n in current], out_dir)

    # ---- steps ----------------------------------------------------------------------

    def _read_all(self, paths: list[str]) -> list[_Read]:
        return [self._read(p) for p in paths]

    def _read(self, key: str) -> _Read:
        path = Path(key)
        try:
            img = read_image(path, roots=self.roots)
        except ImageReadError as exc:
            return _Read(key, None, str(exc))
        except OSError as exc:
            return _Read(key, None, f"{path}: cannot read file: {exc.strerror or exc}")
        try:
            return _Read(key, self.preset(img), None)
        except (ValueError, RuntimeError, TypeError, OSError) as exc:
            return _Read(key, None, f"{path}: preprocessing failed: {type(exc).__name__}: {exc}")

    def _explain_reads(
        self, reads: list[_Read], names: list[str], out_dir: Path
    ) -> Iterator[Explanation]:
        ok = [r for r in reads if r.tensor is not None]
        if not ok:
            for r in reads:
                yield Explanation(r.path, None, None, None, None, r.error)
            return
        batch = torch.stack([r.tensor for r in ok if r.tensor is not None])
        x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        cam = grad_cam(self.model, self.layer, x)
        # The one temperature of core.inference: softmax(logits / T).
        probs = torch.softmax(cam.logits.float() / self.temperature, dim=1).cpu().numpy()
        row = 0
        for r, name in zip(reads, names, strict=True):
            if r.tensor is None:
                yield Explanation(r.path, None, None, None, None, r.error)
                continue
            p = probs[row]
            index = int(np.argmax(p))
            gray = (batch[row, 0] * self._std + self._mean).clamp_(0.0, 1.0).numpy()
            heat = cam.maps[row]
            row += 1
            png, npy = out_dir / f"{name}.png", out_dir / f"{name}.npy"
            try:
                _write_atomic(png, _png_bytes(overlay_image(gray, heat)))
                _write_atomic(npy, _npy_bytes(heat))
            except OSError as exc:
                reason = f"{r.path}: cannot write its explanation: {exc.strerror or exc}"
                yield Explanation(r.path, None, None, None, None, reason)
                continue
            yield Explanation(r.path, self.classes[index], float(p[index]), png, npy, None)


def _named(paths: Iterable[Path | str], names: Iterable[str] | None) -> Iterator[tuple[str, str]]:
    if names is None:
        for i, p in enumerate(paths):
            yield str(p), f"{i:06d}_{Path(p).stem}"
        return
    for p, name in zip(paths, names, strict=True):
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{p}: explanation name {name!r} is not a plain file name")
        yield str(p), name


def _take(items: Iterator[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for item in items:
        out.append(item)
        if len(out) == n:
            break
    return out


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy_bytes(heat: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, heat.astype(np.float32, copy=False), allow_pickle=False)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """A reader (API download) sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
