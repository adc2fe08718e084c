"""Model registry: every architecture builds offline, heads fit, finetune freezes, weights load."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.models import (
    ARCHITECTURES,
    WeightsUnavailableError,
    build_model,
    head_module,
    imagenet_weights_cache_file,
    is_imagenet_cached,
    resolve_weights,
)

SMALL = ("efficientnet_b0", "resnet18", "mobilenet_v3_large")
BIG = tuple(a for a in ARCHITECTURES if a not in SMALL)


@pytest.fixture
def empty_hub(tmp_path: Path) -> Iterator[Path]:
    """Point the torch hub cache at an empty folder so nothing is cached (restored after)."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub"
    finally:
        torch.hub.set_dir(previous)


def test_registry_order_and_default() -> None:
    assert ARCHITECTURES == (
        "efficientnet_b0", "efficientnet_b3", "resnet18", "resnet50", "densenet121",
        "mobilenet_v3_large", "convnext_tiny",
    )


@pytest.mark.parametrize("arch", SMALL)
def test_small_architectures_output_num_classes(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 15, weights="none").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 15)
    assert head_module(model, arch).out_features == 15


@pytest.mark.parametrize("arch", BIG)
def test_big_architectures_build_with_44_outputs(arch: str) -> None:
    model = build_model(arch, 44, weights="none").eval()
    assert head_module(model, arch).out_features == 44
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 44)


def test_finetune_freezes_everything_but_the_head() -> None:
    model = build_model("resnet18", 15, weights="none", finetune=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    full = build_model("resnet18", 15, weights="none")
    assert all(p.requires_grad for p in full.parameters())


def test_unknown_arch_and_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_model("vgg", 15)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", 1)


def test_imagenet_offline_raises_clear_error(empty_hub: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet18", 15, weights="imagenet")
    message = str(info.value)
    assert "resnet18" in message
    assert str(empty_hub / "checkpoints") in message
    assert "resnet18-" in message and ".pth" in message  # names the file to put there
    assert info.value.cause is not None


def test_auto_resolves_to_none_with_warning_when_not_cached(empty_hub: Path) -> None:
    assert not is_imagenet_cached("efficientnet_b0")
    with pytest.warns(UserWarning, match="not cached"):
        assert resolve_weights("auto") == "none"
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the callback replaces the warnings module
        assert resolve_weights("auto", arch="resnet18", on_warning=seen.append) == "none"
    assert len(seen) == 1 and "resnet18" in seen[0]


def test_auto_resolves_to_imagenet_when_cached(empty_hub: Path) -> None:
    cached = imagenet_weights_cache_file("resnet18")
    assert cached.parent == empty_hub / "checkpoints"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"placeholder")  # only presence matters to resolve_weights
    assert resolve_weights("auto", arch="resnet18") == "imagenet"


def test_resolve_passes_through_explicit_specs(tmp_path: Path) -> None:
    assert resolve_weights("none") == "none"
    assert resolve_weights("imagenet") == "imagenet"
    with pytest.raises(ValueError, match="missing.pt"):
        resolve_weights(str(tmp_path / "missing.pt"))


def test_weights_from_state_dict_file_keeps_backbone_and_fitting_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_model("resnet18", 15)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    same = build_model("resnet18", 15, weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    # Another label space: backbone loaded, head left fresh (shapes differ).
    other = build_model("resnet18", 44, weights=str(path))
    assert torch.equal(other.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    assert other.state_dict()["fc.weight"].shape == (44, 512)


def test_weights_file_for_another_arch_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(build_model("mobilenet_v3_large", 15).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        build_model("resnet18", 15, weights=str(path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt"):
        build_model("resnet18", 15, weights=str(garbage))
