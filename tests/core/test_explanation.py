"""Grad-CAM: the target layer of every architecture, the maps against a hand computation and
against where the evidence is, and the Explainer's artifacts, labels and error rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.calibration import Calibration
from core.checkpoint import CheckpointMeta, LoadedCheckpoint, load_checkpoint, save_checkpoint
from core.explanation import (
    TARGET_LAYERS,
    Explainer,
    explain_batch,
    grad_cam,
    overlay_image,
    target_layer,
)
from core.imaging import read_image
from core.inference import Predictor
from core.labels import CLASSES_15
from core.models import ARCHITECTURES, build_model
from core.transforms import EvalPreset, PresetParams
from tests.core.imagefiles import phantom, write_gray

#: Grad-CAM of resnet18's layer4 (stride 32) at 64 px is a 2 x 2 map: the smallest input
#: whose map still has a place in it.
IMAGE_SIZE = 64


def make_explain_checkpoint(directory: Path) -> LoadedCheckpoint:
    """resnet18 over 15 classes, a brain-crop 64 px preset and a fitted temperature (2.0),
    so confidences prove they are the calibrated ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("resnet18", len(CLASSES_15), weights="none")
    meta = CheckpointMeta(
        arch="resnet18",
        classes=CLASSES_15,
        label_mode="15",
        preset=PresetParams(image_size=IMAGE_SIZE, crop="brain"),
        calibration=Calibration(temperature=2.0, calibrated=True),
    )
    path = directory / "explain.pt"
    sha = save_checkpoint(path, model=model, meta=meta)
    return load_checkpoint(path, expected_sha256=sha)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> LoadedCheckpoint:
    return make_explain_checkpoint(tmp_path_factory.mktemp("ckpt"))


def write_slices(folder: Path, n: int) -> list[Path]:
    """``n`` phantoms of different shapes and places on black (non-square, so the brain
    crop and the letterbox both change the geometry)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = phantom(48, 72, center=(20 + i, 30 + 3 * i), radii=(12 + i % 3, 16 + i % 4))
        paths.append(write_gray(folder / f"slice{i}.png", img))
    return paths


_M = TypeVar("_M", bound=nn.Module)


def _frozen(model: _M) -> _M:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---- target layers ------------------------------------------------------------------


def test_target_layers_cover_every_architecture() -> None:
    assert set(TARGET_LAYERS) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_target_layer_resolves_and_maps_the_input(arch: str) -> None:
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = _frozen(build_model(arch, len(CLASSES_15), weights="none"))
    layer = target_layer(model, arch)
    shapes: list[torch.Size] = []
    handle = layer.register_forward_hook(lambda m, a, out: shapes.append(out.shape))
    maps = explain_batch(model, x, arch=arch)
    handle.remove()
    # The layer ran once, on the batch, and gives spatial feature maps.
    assert len(shapes) == 1 and len(shapes[0]) == 4 and shapes[0][0] == 2, shapes
    assert maps.shape == (2, IMAGE_SIZE, IMAGE_SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    # Each map is scaled by its own peak (all zero when nothing speaks for the class).
    for peak in maps.reshape(2, -1).max(axis=1):
        assert peak == 0.0 or peak == pytest.approx(1.0, abs=1e-5), peak


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="vgg16"):
        target_layer(nn.Linear(2, 2), "vgg16")


# ---- the maps -----------------------------------------------------------------------


class _TinyNet(nn.Module):
    """conv -> relu (the target layer) -> global average pool -> linear."""

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        k = 3 if stride == 1 else stride
        self.conv = nn.Conv2d(3, 4, k, stride=stride, padding=1 if stride == 1 else 0)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_maps_equal_a_hand_computed_grad_cam() -> None:
    torch.manual_seed(1)
    net = _frozen(_TinyNet())
    x = torch.randn(3, 3, 16, 16)
    for target in (None, [2, 0, 1]):
        cam = grad_cam(net, net.act, x, target=target)
        with torch.no_grad():
            acts = net.act(net.conv(x))  # N x K x H x W
            logits = net(x)
        classes = logits.argmax(dim=1) if target is None else torch.tensor(target)
        # d(score_c)/dA_k is W[c, k] / (H W) everywhere (average pool then linear), so the
        # channel weights are W[c, k] / (H W) and the map is relu(sum_k weight_k A_k).
        weights = net.fc.weight[classes] / (16 * 16)
        expected = torch.relu((weights[:, :, None, None] * acts).sum(dim=1))
        expected = expected / expected.flatten(1).amax(dim=1)[:, None, None]
        np.testing.assert_allclose(cam.maps, expected.numpy(), atol=1e-5)
        assert cam.targets.tolist() == classes.tolist()
        torch.testing.assert_close(cam.logits, logits)


def test_map_peaks_where_the_evidence_is() -> None:
    """A model that says "bright" (class 1) by the amount of brightness; one bright square in
    a different corner of each image; stride 4, so the map is upsampled 8 -> 32."""
    net = _TinyNet(stride=4)
    with torch.no_grad():
        net.conv.weight.fill_(1.0 / 48)
        assert net.conv.bias is not None
        net.conv.bias.fill_(-0.1)
        net.fc.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4, [0.0] * 4]))
        net.fc.bias.copy_(torch.tensor([0.0, -0.05, 0.0]))
    _frozen(net)
    corners = [(0, 0), (0, 24), (24, 0), (24, 24)]
    x = torch.zeros(len(corners), 3, 32, 32)
    for i, (top, left) in enumerate(corners):
        x[i, :, top : top + 8, left : left + 8] = 1.0
    cam = grad_cam(net, net.act, x)
    assert cam.targets.tolist() == [1, 1, 1, 1]
    for i, (top, left) in enumerate(corners):
        peak_y, peak_x = np.unravel_index(np.argmax(cam.maps[i]), cam.maps[i].shape)
        assert top <= peak_y < top + 8 and left <= peak_x < left + 8, (i, peak_y, peak_x)
        # Nothing lights up far from the square.
        far = cam.maps[i].copy()
        far[max(0, top - 4) : top + 12, max(0, left - 4) : left + 12] = 0.0
        assert far.max() == 0.0, i


def test_overlay_blends_the_colormap_over_the_gray() -> None:
    gray = np.full((4, 5), 0.5, dtype=np.float32)
    heat = np.zeros((4, 5), dtype=np.float32)
    heat[0, 0] = 1.0
    out = overlay_image(gray, heat, alpha=0.5)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    # jet: 0 is dark blue, 1 is dark red.
    assert out[0, 0, 0] > out[0, 0, 2] and out[1, 1, 2] > out[1, 1, 0]
    with pytest.raises(ValueError, match="differ"):
        overlay_image(gray, heat[:3])


# ---- the Explainer ------------------------------------------------------------------


@contextmanager
def _count_passes(explainer: Explainer) -> Iterator[dict[str, int]]:
    counts = {"forward": 0, "backward": 0}

    def on_forward(*_: object) -> None:
        counts["forward"] += 1

    def on_backward(*_: object) -> None:
        counts["backward"] += 1

    handles = [
        explainer.model.register_forward_hook(on_forward),
        explainer.model.get_submodule("fc").register_full_backward_hook(on_backward),
    ]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def test_explanations_are_overlays_of_what_the_model_saw(
    ckpt: LoadedCheckpoint, tmp_path: Path
) -> None:
    paths = write_slices(tmp_path / "in", 5)
    explainer = Explainer(ckpt, batch_size=2)
    results = list(explainer.explain(paths, tmp_path / "out"))
    assert [r.path for r in results] == [str(p) for p in paths]
    preset = EvalPreset(params=ckpt.meta.preset)
    for r, path in zip(results, paths, strict=True):
        assert r.ok and r.overlay_png is not None and r.map_npy is not None, r
        with Image.open(r.overlay_png) as png:
            assert png.format == "PNG" and png.size == (IMAGE_SIZE, IMAGE_SIZE)
            pixels = np.asarray(png.convert("RGB"))
        heat = np.load(r.map_npy, allow_pickle=False)
        assert heat.shape == (IMAGE_SIZE, IMAGE_SIZE) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        # The overlay is the map over the cropped, letterboxed slice, de-normalised.
        x = preset(read_image(path))
        alone = explain_batch(explainer.model, x[None], arch="resnet18")[0]
        np.testing.assert_allclose(heat, alone, atol=1e-5)
        gray = (x[0] * ckpt.meta.preset.std[0] + ckpt.meta.preset.mean[0]).clamp(0, 1).numpy()
        assert np.abs(pixels.astype(int) - overlay_image(gray, heat).astype(int)).max() <= 1
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_labels_and_confidences_equal_the_predictors(
    ckpt: LoadedCheckpoint, tmp_path: Path
) -> None:
    paths = write_slices(tmp_path / "in", 6)
    # The predictor runs the BatchNorm-folded copy; the explainer the unfolded model.
    predictions = list(Predictor(ckpt, batch_size=4).predict(paths))
    explanations = list(Explainer(ckpt, batch_size=4).explain(paths, tmp_path / "out"))
    assert [e.label for e in explanations] == [p.label for p in predictions]
    for e, p in zip(explanations, predictions, strict=True):
        assert e.confidence == pytest.approx(p.confidence, abs=1e-4)


def test_one_forward_and_one_backward_per_batch(ckpt: LoadedCheckpoint, tmp_path: Path) -> None:
    paths = write_slices(tmp_path / "in", 7)
    explainer = Explainer(ckpt, batch_size=3)
    with _count_passes(explainer) as counts:
        assert all(r.ok for r in explainer.explain(paths, tmp_path / "out"))
    assert counts == {"forward": 3, "backward": 3}  # batches of 3, 3 and 1


def test_bad_files_are_error_rows_naming_the_file(ckpt: LoadedCheckpoint, tmp_path: Path) -> None:
    good = write_slices(tmp_path / "in", 2)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("this is not a jpeg\n")
    missing = tmp_path / "missing.png"
    inputs = [empty, good[0], text, missing, good[1]]
    # Batches of 2: one mixed, one all bad, one good alone.
    results = list(Explainer(ckpt, batch_size=2).explain(inputs, tmp_path / "out"))
    assert [r.path for r in results] == [str(p) for p in inputs]
    assert [r.ok for r in results] == [False, True, False, False, True]
    for r in (results[0], results[2], results[3]):
        assert r.error is not None and r.error.startswith(f"{r.path}: "), r
        assert r.label is None and r.overlay_png is None and r.map_npy is None
    assert "empty" in (results[0].error or "")
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_a_file_outside_the_roots_and_an_unwritable_overlay_are_error_rows(
    ckpt: LoadedCheckpoint, tmp_path: Path
) -> None:
    inside = write_slices(tmp_path / "in", 2)
    outside = write_slices(tmp_path / "elsewhere", 1)[0]
    out = tmp_path / "out"
    (out / "blocked.png").mkdir(parents=True)  # os.replace cannot put a file there
    explainer = Explainer(ckpt, batch_size=4, roots=[tmp_path / "in"])
    results = list(
        explainer.explain([inside[0], outside, inside[1]], out, names=["ok", "out", "blocked"])
    )
    assert [r.ok for r in results] == [True, False, False]
    assert results[1].error == f"{outside}: leads outside the data roots"
    assert results[2].error is not None and results[2].error.startswith(f"{inside[1]}: ")
    assert "cannot write" in results[2].error
    assert not list(out.glob(".*.tmp"))


def test_names_make_a_rerun_overwrite(ckpt: LoadedCheckpoint, tmp_path: Path) -> None:
    paths = write_slices(tmp_path / "in", 3)
    out = tmp_path / "out"
    explainer = Explainer(ckpt, batch_size=2)
    first = list(explainer.explain(paths, out, names=["a", "b", "c"]))
    second = list(explainer.explain(paths, out, names=["a", "b", "c"]))
    assert [r.overlay_png for r in first] == [out / f"{n}.png" for n in "abc"]
    assert [r.overlay_png for r in second] == [r.overlay_png for r in first]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}.{ext}" for n in "abc" for ext in ("png", "npy")
    )
    with pytest.raises(ValueError, match="plain file name"):
        list(explainer.explain(paths[:1], out, names=["../escape"]))


def test_the_checkpoints_model_is_left_alone(ckpt: LoadedCheckpoint, tmp_path: Path) -> None:
    before = [p.requires_grad for p in ckpt.model.parameters()]
    training = ckpt.model.training
    explainer = Explainer(ckpt, batch_size=2)
    list(explainer.explain(write_slices(tmp_path / "in", 2), tmp_path / "out"))
    assert explainer.model is not ckpt.model
    assert [p.requires_grad for p in ckpt.model.parameters()] == before
    assert ckpt.model.training == training
