"""The fast paths of decoding, brain cropping and normalising give bit-identical results.

Each optimised internal is compared with a plain reference written here (the way the code
computed it before it was optimised), on random and adversarial inputs: equality is
checked bit for bit (``_bits``), so even the sign of a zero counts.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import cropping
from core.imaging import read_image
from core.transforms import EvalPreset, PresetParams


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.itemsize}") if a.dtype.kind == "f" else a


def _assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _odd_floats(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Mostly [0, 1) with negatives, zeros of both signs and subnormals sprinkled in."""
    a = rng.random(shape, dtype=np.float32)
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 3e-45, -1e-40, 1.0, -0.5], np.float32)
    pick = rng.random(shape) < 0.2
    a[pick] = rng.choice(specials, size=int(pick.sum()))
    return a


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_8bit_gray_is_value_over_255(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (61, 47), dtype=np.uint8)
    values[0, :3] = (0, 255, 128)
    path = tmp_path / f"g{suffix}"
    Image.fromarray(values, "L").save(path)
    with Image.open(path) as im:
        decoded = np.asarray(im.convert("L"), dtype=np.uint8)
    got = read_image(path)
    _assert_identical(got, decoded.astype(np.float32) / np.float32(255))
    assert got.flags.c_contiguous and got.flags.writeable
    assert got.min() >= 0.0 and got.max() <= 1.0


def test_la_and_1bit_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (40, 33), dtype=np.uint8)
    alpha = rng.integers(0, 256, (40, 33), dtype=np.uint8)
    alpha[0, 0], gray[0, 0] = 255, 255
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(tmp_path / "la.png")
    la = np.stack([gray, alpha], -1).astype(np.float32) / np.float32(255)
    got = read_image(tmp_path / "la.png")
    _assert_identical(got, la[..., 0] * la[..., 1])
    assert got.max() == 1.0 and got.min() >= 0.0

    bits = rng.random((40, 33)) < 0.5
    Image.fromarray(bits).convert("1").save(tmp_path / "one.png")
    _assert_identical(read_image(tmp_path / "one.png"), bits.astype(np.float32))


def test_exif_orientation_still_applied(tmp_path: Path) -> None:
    values = np.zeros((20, 30), dtype=np.uint8)
    values[:5, :5] = 255  # a bright top-left corner
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    Image.fromarray(values, "L").save(tmp_path / "r.png", exif=exif.tobytes())
    got = read_image(tmp_path / "r.png")
    _assert_identical(got, values[::-1, ::-1].astype(np.float32) / np.float32(255))


# ------------------------------------------------------------------------------ cropping


def _pil_box(img: np.ndarray, nh: int, nw: int) -> np.ndarray:
    small = Image.fromarray(np.ascontiguousarray(img), mode="F").resize(
        (nw, nh), Image.Resampling.BOX
    )
    return np.asarray(small, dtype=np.float32)


@pytest.mark.parametrize("shape", [(512, 512), (512, 384), (384, 512), (512, 256), (6, 512)])
def test_downsample_halving_is_pillows_box(shape: tuple[int, int]) -> None:
    # OpenCV's INTER_AREA against the Pillow BOX resize the numpy crop used: at exactly half
    # size both average 2x2 blocks. At other scales Pillow weighs whole pixels by where their
    # centres fall and OpenCV by covered area; on smooth slices the boxes stay within 2 px
    # (test_cropping's corpus tests cover such sizes).
    rng = np.random.default_rng(sum(shape))
    img = rng.random(shape, dtype=np.float32)
    work, sy, sx = cropping._downsample(img)
    assert max(work.shape) == 256
    assert (sy, sx) == (shape[0] / work.shape[0], shape[1] / work.shape[1])
    np.testing.assert_allclose(work, _pil_box(img, *work.shape), atol=2e-6)


def _gaussian_reference(img: np.ndarray) -> np.ndarray:
    x = np.arange(-2, 3, dtype=np.float32)
    k = np.exp(-(x**2) / (2 * 1.1**2))
    k /= k.sum()
    p = np.pad(img, 2, mode="reflect")
    rows = sum(k[i] * p[:, i : i + img.shape[1]] for i in range(5))
    return np.asarray(sum(k[i] * rows[i : i + img.shape[0], :] for i in range(5)))


@pytest.mark.parametrize("shape", [(3, 3), (3, 17), (29, 3), (64, 64), (256, 201)])
def test_gaussian_matches_reference(shape: tuple[int, int]) -> None:
    # Smaller images never reach the blur (brain_bbox keeps them whole).
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    img = rng.random(shape, dtype=np.float32)
    got = cropping._gaussian5(img)
    assert got.dtype == np.float32 and got.shape == img.shape
    np.testing.assert_allclose(got, _gaussian_reference(img), atol=1e-6)


def _morph_reference(mask: np.ndarray, iterations: int, erode: bool) -> np.ndarray:
    for _ in range(iterations):
        if erode:
            p = np.pad(mask, 1, mode="edge")
        else:
            p = np.pad(mask, 1, mode="constant", constant_values=False)
        h, w = mask.shape
        windows = [p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
        mask = np.logical_and.reduce(windows) if erode else np.logical_or.reduce(windows)
    return mask


def test_open_mask_is_two_erosions_then_two_dilations() -> None:
    rng = np.random.default_rng(7)
    for h, w in [(3, 3), (3, 9), (7, 3), (5, 8), (33, 40), (96, 71)]:
        for density in (0.3, 0.7, 0.95, 1.0):
            img = rng.random((h, w), dtype=np.float32)
            t = 1.0 - density
            want = _morph_reference(_morph_reference(img > t, 2, True), 2, False)
            got = cropping._open_mask(img, t)
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got.astype(bool), want)


def _components_reference(mask: np.ndarray) -> np.ndarray:
    """8-connected flood fill, components in the row-major order of their first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    rows = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, pixels = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny in range(max(cy - 1, 0), min(cy + 2, h)):
                for nx in range(max(cx - 1, 0), min(cx + 2, w)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        ys = [p[0] for p in pixels]
        xs = [p[1] for p in pixels]
        rows.append((len(pixels), min(ys), max(ys), min(xs), max(xs)))
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def test_components_match_flood_fill() -> None:
    # Same rows in the same order (first pixel, row-major): np.argmax's tie-break between
    # equal areas, and so the box, stays what the numpy crop chose.
    rng = np.random.default_rng(11)
    for h, w in [(1, 1), (1, 12), (9, 1), (6, 6), (20, 31), (48, 40)]:
        for density in (0.0, 0.2, 0.45, 0.6, 1.0):
            mask = (rng.random((h, w)) < density).astype(np.uint8)
            got = cropping._components(mask)
            assert got.dtype == np.int64
            want = _components_reference(mask)
            np.testing.assert_array_equal(got, want)
            big = cropping._components(mask, 3)
            np.testing.assert_array_equal(big, want[want[:, 0] >= 3])


def _otsu_reference(img: np.ndarray) -> float:
    clipped = np.clip(img, 0.0, 1.0)
    hist, edges = np.histogram(clipped, bins=256, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 45.0 / 255.0
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    s0 = np.cumsum(hist * centres)
    m0 = np.divide(s0, w0, out=np.zeros_like(s0), where=w0 > 0)
    m1 = np.divide(s0[-1] - s0, w1, out=np.zeros_like(s0), where=w1 > 0)
    return float(edges[int(np.argmax(w0 * w1 * (m0 - m1) ** 2)) + 1])


def test_otsu_matches_histogram_reference() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        img = (rng.random((50, 70)) ** rng.uniform(0.3, 3)).astype(np.float32)
        img[rng.random(img.shape) < 0.05] = rng.choice([0.0, 1.0, 1.5, -0.2])
        assert cropping._otsu(img) == _otsu_reference(img)
    # bin edges: exact multiples of 1/256 land in the bin they start
    edges = (np.arange(257, dtype=np.float32) / np.float32(256)).reshape(1, -1)
    assert cropping._otsu(edges) == _otsu_reference(edges)


# ---------------------------------------------------------------------------- transforms


def test_normalise_is_subtract_then_divide() -> None:
    params = PresetParams(image_size=32, crop="none")
    preset = EvalPreset(params=params)
    gray = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(params.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(params.std, dtype=torch.float32).view(3, 1, 1)
    got = preset._normalise(gray)
    want = (gray.expand(3, -1, -1) - mean) / std
    assert got.shape == (3, 32, 32) and got.is_contiguous()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


# ---------------------------------------------------------- same answers end to end (issue 14)


def _fitted_checkpoint(
    directory: Path, inputs: torch.Tensor, labels: list[int], params: PresetParams
) -> Path:
    """A resnet18 whose classifier is fitted to ``inputs`` and saved as a real checkpoint.

    Only the last layer is trained, on the frozen random backbone's features: a model with
    real margins on these images in well under a second, where ``core.training.train``
    needs many epochs (a minute on 2 busy cores) to leave chance level.
    """
    from core.checkpoint import CheckpointMeta, save_checkpoint
    from core.labels import CLASSES_15
    from core.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("resnet18", len(CLASSES_15), weights="none").eval()
        head = model.fc
        model.fc = torch.nn.Identity()
        with torch.no_grad():
            features = model(inputs)
        model.fc = head
        optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
        target = torch.tensor(labels)
        for _ in range(200):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(head(features), target).backward()
            optimiser.step()
    meta = CheckpointMeta(arch="resnet18", classes=CLASSES_15, label_mode="15", preset=params)
    path = directory / "fitted.pt"
    save_checkpoint(path, model=model, meta=meta)
    return path


def test_top1_labels_unchanged_on_a_trained_model(tmp_path: Path) -> None:
    """Predictor (OpenCV crop) against the old pipeline (numpy crop, then the same eval
    preset) on a model fitted to the old pipeline's tensors of these very images (every
    label is the true one there, with margins of a few logits)."""
    from core.checkpoint import load_checkpoint
    from core.decoding import ImageFiles
    from core.inference import Predictor
    from core.labels import CLASSES_15
    from core.synth import synthesize
    from tests.core import crop_reference

    data = tmp_path / "data"
    classes = {"Glioblastoma T1": "Glioblastoma", "Meningioma T1": "Meningioma",
               "_NORMAL T1": "Normal"}
    # Sizes either side of the crop's 256 px working size, JPEG and PNG.
    synthesize(data, per_folder=4, image_size_range=(48, 320), formats=("jpeg", "png"),
               folders=list(classes))
    paths = sorted(p for p in data.rglob("*") if p.is_file())
    labels = [CLASSES_15.index(classes[p.parent.name]) for p in paths]
    params = PresetParams(image_size=32, crop="brain")
    no_crop = EvalPreset(params=PresetParams(image_size=32, crop="none"))
    old_inputs = torch.stack(
        [no_crop(crop_reference.crop_to_brain(read_image(p))) for p in paths]
    )
    ckpt = load_checkpoint(_fitted_checkpoint(tmp_path, old_inputs, labels, params))

    # The predictor's dataset decodes at full size unless told otherwise.
    preset = EvalPreset(params=params)
    item = ImageFiles(preset)[str(paths[0])]
    assert item[1] is not None and torch.equal(item[1], preset(read_image(paths[0])))

    with torch.no_grad():
        old_labels = ckpt.model(old_inputs).argmax(dim=1).tolist()
    new = list(Predictor(ckpt, batch_size=8).predict_logits(paths))
    assert all(err is None for _, _, err in new)
    assert [int(np.argmax(logits)) for _, logits, _ in new] == old_labels
    assert old_labels == labels  # a fitted model, not one answer for everything


def test_reduced_decode_tells_the_preset_its_reduction(tmp_path: Path) -> None:
    """With ``min_decode_side`` the dataset decodes a JPEG at 1/2 and the brain crop's
    padding halves with it: the crop keeps the full decode's box, scaled."""
    from core.decoding import ImageFiles
    from tests.core.imagefiles import phantom, to_uint8, write_gray

    img = phantom(128, 128, center=(64.0, 64.0), radii=(40.0, 34.0))
    path = write_gray(tmp_path / "s.jpg", to_uint8(img), quality=95)
    preset = EvalPreset(params=PresetParams(image_size=32, crop="brain"))
    item = ImageFiles(preset, min_decode_side=64)[str(path)]
    reduced = read_image(path, min_decode_side=64)
    assert reduced.shape == (64, 64)
    assert item[1] is not None and torch.equal(item[1], preset(reduced, reduction=2.0))
    full_box = cropping.brain_bbox(read_image(path))
    half_box = cropping.brain_bbox(reduced, padding=2)
    assert full_box is not None and half_box is not None
    assert max(abs(2 * h - f) for h, f in zip(half_box, full_box, strict=True)) <= 2
    assert not torch.equal(item[1], preset(reduced))  # the unscaled padding would differ
