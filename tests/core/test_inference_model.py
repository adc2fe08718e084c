"""prepare_inference_model: BatchNorm folding keeps the function, caches, never breaks."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from core.config import ARCHITECTURES
from core.model_preparation import prepare_inference_model
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


class _DataDependent(nn.Module):
    """Data-dependent control flow: no tracer can follow it; the probe pass need not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if float(y.sum()) > 0:
            y = y * 2
        return y.mean(dim=(2, 3))


def test_data_dependent_model_is_folded_and_keeps_its_function() -> None:
    model = _DataDependent()
    _randomise_batchnorm(model)
    model.eval()
    prepared = prepare_inference_model(model, CPU)
    assert _count_bn(prepared) == 0
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)


class _ConvOutputReused(nn.Module):
    """The conv's output feeds the BatchNorm *and* the sum: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.bn(y) + y).mean(dim=(2, 3))


def test_unfoldable_model_runs_unfolded_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = _ConvOutputReused()
    _randomise_batchnorm(model)
    model.eval()
    with caplog.at_level(logging.WARNING, logger="core.model_preparation"):
        prepared = prepare_inference_model(model, CPU)
    assert "BatchNorm folding skipped" in caplog.text
    assert _count_bn(prepared) == 1
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), model(x))


class _SharedConv(nn.Module):
    """One conv module run twice, each time into its own BatchNorm, plus an ordinary pair."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_a(self.shared(x))
        y = self.bn_b(self.shared(y))
        return self.bn(self.conv(y)).mean(dim=(2, 3))


def test_a_conv_run_twice_is_not_folded_but_the_other_pair_is() -> None:
    model = _SharedConv()
    _randomise_batchnorm(model)
    model.eval()
    prepared = prepare_inference_model(model, CPU)
    assert isinstance(prepared.get_submodule("bn"), nn.Identity)
    assert isinstance(prepared.get_submodule("bn_a"), nn.BatchNorm2d)
    assert isinstance(prepared.get_submodule("bn_b"), nn.BatchNorm2d)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)


def test_preparing_models_while_other_threads_run_forward_passes() -> None:
    """A threads-pool worker prepares a model in one task while other tasks run theirs (CI
    once saw torch.fx tracing in one thread break the forward passes of another)."""
    torch.manual_seed(0)
    running = prepare_inference_model(build_model("resnet18", 15, weights="none").eval(), CPU)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = running(x)
    same_model = build_model("efficientnet_b0", 15, weights="none")
    _randomise_batchnorm(same_model)
    stop = threading.Event()
    errors: list[BaseException] = []
    forwards = 0

    def forward_loop() -> None:
        nonlocal forwards
        try:
            while not stop.is_set():
                with torch.inference_mode():
                    torch.testing.assert_close(running(x), expected)
                forwards += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    def prepare(arch: str) -> nn.Module:
        fresh = prepare_inference_model(build_model(arch, 15, weights="none"), CPU)
        assert _count_bn(fresh) == 0
        # tasks of one job start together: the same model object, prepared once
        return prepare_inference_model(same_model, CPU)

    loop = threading.Thread(target=forward_loop)
    loop.start()
    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(prepare, ["resnet18", "efficientnet_b0", "resnet18"]))
    finally:
        stop.set()
        loop.join(timeout=60)
    assert not errors, errors
    assert forwards > 0
    assert results[0] is results[1] is results[2]  # one preparation for the shared model
    assert _count_bn(results[0]) == 0
