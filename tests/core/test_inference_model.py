"""prepare_inference_model: BatchNorm folding keeps the function, caches, never breaks."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from core.config import ARCHITECTURES
from core.inference import prepare_inference_model
from core.models import build_model

CPU = torch.device("cpu")


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Fresh BN layers are the identity (mean 0, var 1, weight 1, bias 0), which would make
    folding trivially right; trained-like statistics make the test able to fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folding_keeps_the_function_of_every_architecture(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 15, weights="none")
    _randomise_batchnorm(model)
    model.eval()
    bn_before = _count_bn(model)
    prepared = prepare_inference_model(model, CPU)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        out = prepared(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert not any(p.requires_grad for p in prepared.parameters())
    # the checkpoint's own model is not touched: still unfolded, still usable for training
    assert _count_bn(model) == bn_before
    if bn_before and arch != "densenet121":  # densenet's BN precede their convs: kept
        assert _count_bn(prepared) == 0


def test_prepared_copy_is_cached_per_device_and_mode_and_training_flag_restored() -> None:
    model = build_model("resnet18", 3, weights="none")
    model.train()
    a = prepare_inference_model(model, CPU)
    assert model.training  # restored after preparing
    assert prepare_inference_model(model, CPU) is a
    plain = prepare_inference_model(model, CPU, fold_batchnorm=False)
    assert plain is not a and _count_bn(plain) == _count_bn(model)
    assert not plain.training and not a.training


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if float(y.sum()) > 0:
            y = y * 2
        return y.mean(dim=(2, 3))


def test_untraceable_model_runs_unfolded_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = _Untraceable()
    _randomise_batchnorm(model)
    model.eval()
    with caplog.at_level(logging.WARNING, logger="core.inference"):
        prepared = prepare_inference_model(model, CPU)
    assert "BatchNorm folding skipped" in caplog.text
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), model(x))
    assert _count_bn(prepared) == 1
