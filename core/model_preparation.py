"""Preparing a checkpoint's model for inference, once per (model, device) and process:
eval mode, each BatchNorm folded into the convolution whose output it reads, channels-last.

In eval mode BN is a fixed per-channel affine map, so the folded convolution computes the
same function up to float rounding (~1.2x on EfficientNet-B0 on CPU). The pairs are found by
a probe forward pass with hooks on a copy, not torch.fx, whose tracing patches ``nn.Module``
process-wide and broke other threads' forward passes.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["prepare_inference_model"]

_log = logging.getLogger(__name__)

_prepared_lock = threading.Lock()
# original model -> {device: prepared model}; weak keys: a checkpoint evicted from the
# worker's cache takes its prepared copies with it.
_prepared: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm folded into the conv that feeds it.

    Eval-mode BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one
    conv with rescaled weights and a shifted bias. Which BatchNorm reads which conv's output
    is found by one probe forward pass with hooks on the copy's own modules, not by tracing:
    torch.fx patches ``nn.Module`` for the whole process while it traces, so a model being
    prepared in one worker thread broke the forward passes running in the others (and could
    leave the patch behind). The folded copy must then reproduce the unfolded one on the
    probe; a model where it does not (a conv output also used elsewhere, say) is used
    unfolded: slower, never wrong.
    """
    plain = copy.deepcopy(model).eval()
    name = type(model).__name__
    probe = _probe_input(plain)
    if probe is None:
        return plain
    try:
        pairs = _conv_bn_pairs(plain, probe)
        if not pairs:
            return plain
        folded = copy.deepcopy(plain)
        for conv_name, bn_name in pairs:
            conv = folded.get_submodule(conv_name)
            bn = folded.get_submodule(bn_name)
            assert isinstance(conv, nn.modules.conv._ConvNd)
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            _replace_submodule(folded, conv_name, fuse_conv_bn_eval(conv, bn))
            _replace_submodule(folded, bn_name, nn.Identity())
        with torch.no_grad():
            expected, got = plain(probe), folded(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means "keep the model as it is"
        _log.warning(
            "BatchNorm folding skipped for %s (%s: %s); running the model unfolded",
            name,
            type(exc).__name__,
            exc,
        )
        return plain
    if not (
        isinstance(expected, torch.Tensor)
        and isinstance(got, torch.Tensor)
        and got.shape == expected.shape
        and torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    ):
        _log.warning(
            "BatchNorm folding skipped for %s (the folded copy does not reproduce the "
            "model's outputs); running the model unfolded",
            name,
        )
        return plain
    return folded


def _probe_input(model: nn.Module) -> torch.Tensor | None:
    """A small batch for the probe pass: 2 images of 64x64 with the first conv's channels."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return None
    param = next(model.parameters(), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, first.in_channels, 64, 64, generator=gen)
    return x if param is None else x.to(dtype=param.dtype, device=param.device)


def _conv_bn_pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where the BatchNorm reads the conv's output as is.

    Only modules that run exactly once in the probe pass qualify (a shared module would have
    one fold applied to all its uses), the output must reach the BatchNorm unmodified (same
    tensor object, same version: no in-place op in between) and the shapes must match. A
    conv output that is also read elsewhere is not visible here; the caller's output check
    catches that case.
    """
    calls: collections.Counter[str] = collections.Counter()
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}  # id -> (conv, tensor, version)
    found: list[tuple[str, str]] = []
    handles = []

    def on_conv(conv_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls[conv_name] += 1
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (conv_name, out, out._version)

        return hook

    def on_bn(bn_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls[bn_name] += 1
            x = args[0] if args else None
            hit = outputs.get(id(x))
            if hit is not None and hit[1] is x and x._version == hit[2]:
                found.append((hit[0], bn_name))

        return hook

    for mod_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            handles.append(module.register_forward_hook(on_conv(mod_name)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(on_bn(mod_name)))
    try:
        # no_grad, not inference_mode: inference tensors have no version counter.
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    pairs: list[tuple[str, str]] = []
    used: set[str] = set()
    for conv_name, bn_name in found:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(conv, nn.modules.conv._ConvNd)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        if (
            calls[conv_name] == 1
            and calls[bn_name] == 1
            and conv_name not in used
            and bn.running_mean is not None
            and bn.running_var is not None
            and bn.num_features == conv.out_channels
        ):
            pairs.append((conv_name, bn_name))
            used.add(conv_name)
    return pairs


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def prepare_inference_model(
    model: nn.Module, device: torch.device, *, fold_batchnorm: bool = True
) -> nn.Module:
    """``model`` ready for inference on ``device``: eval mode, BatchNorm folded, channels-last.

    The input model is left as it is (a copy is prepared), so a checkpoint can still be
    trained or saved afterwards. Prepared copies are cached per (model, device,
    fold_batchnorm): building predictors for many chunks of a job costs one preparation.
    """
    key = f"{device}|{'fold' if fold_batchnorm else 'plain'}"
    # Held while preparing: two chunk tasks of one job starting together in a threads-pool
    # worker prepare the model once, and the second gets the first's copy. The model itself
    # is only read (deep-copied), never switched between train and eval here.
    with _prepared_lock:
        cached = _prepared.get(model, {}).get(key)
        if cached is not None:
            return cached
        prepared = _fold_batchnorm(model) if fold_batchnorm else copy.deepcopy(model)
        prepared.eval()
        for p in prepared.parameters():
            p.requires_grad_(False)
        # channels_last is the fast layout for cuDNN tensor cores and oneDNN on CPU alike.
        prepared = prepared.to(device).to(memory_format=torch.channels_last)
        _prepared.setdefault(model, {})[key] = prepared
        return prepared
