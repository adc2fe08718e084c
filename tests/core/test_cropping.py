"""Croppers on synthetic slices: brain ellipses, burnt-in text, empty frames.

The OpenCV brain crop is also held to the numpy crop it replaced (``crop_reference``): the
same boxes, within 2 px, over the synthetic and the bad-input corpora.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.cropping import CROP_MODES, apply_crop, brain_bbox, crop_profile, crop_to_brain
from core.errors import ImageReadError
from core.imaging import read_image
from core.synth import REAL_COUNTS, synthesize
from tests.badinput import make_corpus
from tests.core import crop_reference
from tests.core.imagefiles import phantom, write_gray


def _ellipse_box(h: int, w: int, center: tuple[float, float], radii: tuple[float, float]):
    cy, cx = center
    ry, rx = radii
    return cy - ry, cy + ry, cx - rx, cx + rx


def _burn_text(img: np.ndarray, top: int, left: int, value: float = 1.0) -> None:
    """Glyph-like strokes (letters 'L R' at a few pixels per stroke) into ``img``."""
    img[top : top + 10, left : left + 2] = value
    img[top + 8 : top + 10, left : left + 7] = value
    img[top : top + 10, left + 10 : left + 12] = value
    img[top : top + 2, left + 10 : left + 16] = value
    img[top + 4 : top + 6, left + 10 : left + 16] = value
    img[top : top + 10, left + 15 : left + 17] = value


def _assert_box_close(box: tuple[int, int, int, int] | None, want, tol: float) -> None:
    assert box is not None
    for got, exp in zip(box, want, strict=True):
        assert abs(got - exp) <= tol, (box, want)


def test_ellipse_with_corner_text_crops_to_ellipse() -> None:
    h, w = 64, 64
    center, radii = (36.0, 34.0), (18.0, 15.0)
    img = phantom(h, w, center=center, radii=radii)
    _burn_text(img, 1, 1)  # top-left, brighter than the brain
    _burn_text(img, 55, 46)  # bottom-right
    box = brain_bbox(img, padding=0)
    _assert_box_close(box, _ellipse_box(h, w, center, radii), tol=2.5)
    out = crop_to_brain(img, padding=0)
    assert out.shape == (box[1] - box[0], box[3] - box[2])  # type: ignore[index]
    assert out.max() <= 0.7 + 1e-6  # no text made it into the crop


def test_big_corner_marker_brighter_and_larger_than_text() -> None:
    h, w = 64, 64
    center, radii = (32.0, 32.0), (20.0, 17.0)
    img = phantom(h, w, center=center, radii=radii)
    img[0:12, 50:64] = 1.0  # a solid marker block in the top-right corner
    _assert_box_close(brain_bbox(img, padding=0), _ellipse_box(h, w, center, radii), tol=2.5)


def test_text_band_along_the_top_edge_is_ignored() -> None:
    h, w = 64, 64
    center, radii = (38.0, 32.0), (18.0, 16.0)
    img = phantom(h, w, center=center, radii=radii)
    for left in (8, 26, 44):  # a patient-name line across the top
        _burn_text(img, 0, left, value=0.9)
    _assert_box_close(brain_bbox(img, padding=0), _ellipse_box(h, w, center, radii), tol=2.5)


def test_padding_and_clipping() -> None:
    img = phantom(64, 64, center=(32.0, 32.0), radii=(20.0, 20.0))
    tight = brain_bbox(img, padding=0)
    padded = brain_bbox(img, padding=3)
    assert tight is not None and padded is not None
    assert padded == (tight[0] - 3, tight[1] + 3, tight[2] - 3, tight[3] + 3)
    huge = brain_bbox(img, padding=100)
    assert huge == (0, 64, 0, 64)
    with pytest.raises(ValueError):
        brain_bbox(img, padding=-1)


def test_split_brain_pieces_are_kept_together() -> None:
    # Cerebrum and cerebellum separated by a dark gap; both belong in the crop.
    img = phantom(64, 64, center=(24.0, 32.0), radii=(14.0, 18.0))
    img += phantom(64, 64, center=(48.0, 32.0), radii=(6.0, 9.0))
    box = brain_bbox(img, padding=0)
    assert box is not None
    assert box[0] <= 11 and box[1] >= 53


@pytest.mark.parametrize(
    "img",
    [
        np.zeros((48, 48), np.float32),
        np.full((48, 48), 0.01, np.float32),
        np.random.default_rng(0).random((48, 48)).astype(np.float32) * 0.02,
    ],
    ids=["black", "flat-dim", "dim-noise"],
)
def test_no_brain_returns_whole_image(img: np.ndarray) -> None:
    assert brain_bbox(img) is None
    out = crop_to_brain(img)
    assert out.shape == img.shape
    assert np.shares_memory(out, img)


def test_only_corner_text_returns_whole_image() -> None:
    img = np.zeros((64, 64), np.float32)
    _burn_text(img, 1, 1)
    assert crop_to_brain(img).shape == (64, 64)


def test_dim_brain_found_by_automatic_threshold_not_by_recipe_threshold() -> None:
    img = phantom(64, 64, value=0.12)  # below 45/255 everywhere
    assert brain_bbox(img, threshold=45 / 255) is None
    assert brain_bbox(img) is not None


def test_large_image_uses_downsampled_mask_but_full_resolution_box() -> None:
    h, w = 600, 520
    center, radii = (320.0, 250.0), (200.0, 170.0)
    img = phantom(h, w, center=center, radii=radii)
    img[10:60, 10:150] = 1.0  # a burnt-in label block
    _assert_box_close(brain_bbox(img, padding=0), _ellipse_box(h, w, center, radii), tol=6.0)


def test_crop_from_real_file(tmp_path: Path) -> None:
    src = phantom(64, 56, center=(34.0, 28.0), radii=(20.0, 16.0))
    _burn_text(src, 54, 0)
    img = read_image(write_gray(tmp_path / "slice.jpg", src, quality=90))
    box = brain_bbox(img, padding=0)
    _assert_box_close(box, _ellipse_box(64, 56, (34.0, 28.0), (20.0, 16.0)), tol=3.0)


def test_rejects_non_2d() -> None:
    with pytest.raises(ValueError):
        crop_to_brain(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        crop_profile(np.zeros((8, 8, 3), np.float32))


# ----------------------------------------------------------------- profile crop


def test_profile_crop_is_centred_with_the_profile_extent() -> None:
    img = np.zeros((100, 120), np.float32)
    img[20:80, 30:100] = 0.8  # off-centre horizontally: 70 wide, 60 tall
    out = crop_profile(img)
    assert out.shape == (60, 70)
    # Centred on the image centre, as the notebook's CenterCrop does, not on the object.
    np.testing.assert_array_equal(out, img[20:80, 25:95])


def test_profile_ignores_frame_pixels_and_dim_pixels() -> None:
    img = np.zeros((60, 60), np.float32)
    img[:, :3] = 1.0  # scanner border inside the ignored frame
    img[:3, :] = 1.0
    img[20:40, 15:45] = 0.9
    img[10:20, 30] = 0.05  # below 0.1 x max on the middle column
    out = crop_profile(img)
    assert out.shape == (20, 30)


def test_profile_blank_or_tiny_returns_whole_image() -> None:
    blank = np.zeros((32, 32), np.float32)
    assert crop_profile(blank).shape == (32, 32)
    tiny = np.ones((8, 8), np.float32)
    assert crop_profile(tiny, frame=5).shape == (8, 8)


def test_profile_uses_only_middle_row_and_column() -> None:
    img = np.zeros((50, 50), np.float32)
    img[20:30, 20:30] = 1.0
    img[0:10, 40:50] = 1.0  # off the middle lines: does not widen the crop
    assert crop_profile(img).shape == (10, 10)


# ----------------------------------------------------------------------- modes


def test_apply_crop_modes() -> None:
    img = phantom(64, 64, center=(32.0, 32.0), radii=(16.0, 16.0))
    assert CROP_MODES == ("brain", "profile", "none")
    assert apply_crop(img, "none") is img
    assert apply_crop(img, "brain").shape == crop_to_brain(img).shape
    assert apply_crop(img, "profile").shape == crop_profile(img).shape
    assert apply_crop(img, "brain").shape[0] < 64
    with pytest.raises(ValueError, match="unknown crop mode"):
        apply_crop(img, "square")  # type: ignore[arg-type]


# ------------------------------------------------ same boxes as the numpy crop (issue 14)


def _box_gap(got: tuple[int, int, int, int] | None, want: tuple[int, int, int, int] | None) -> int:
    """Largest coordinate difference of two boxes; both None (whole image) counts as 0."""
    if got is None or want is None:
        assert got is None and want is None, (got, want)
        return 0
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def synthetic_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One slice per 44c folder at 48..64 px, plus a few at 300..520 px: those cross the
    256 px working size at scales other than exactly one half (the area filter's case)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out / "small", per_folder=1, image_size_range=(48, 64), formats=("jpeg", "png"))
    synthesize(
        out / "large",
        per_folder=1,
        image_size_range=(300, 520),
        formats=("jpeg", "png"),
        folders=list(REAL_COUNTS)[:8],
    )
    return sorted(p for p in out.rglob("*") if p.is_file())


def test_boxes_match_the_numpy_crop_on_the_synthetic_corpus(synthetic_corpus: list[Path]) -> None:
    assert len(synthetic_corpus) >= 50
    gaps = []
    for path in synthetic_corpus:
        img = read_image(path)
        for padding in (0, 4):
            want = crop_reference.brain_bbox(img, padding=padding)
            gaps.append(_box_gap(brain_bbox(img, padding=padding), want))
    assert max(gaps) <= 2, gaps


def test_boxes_match_the_numpy_crop_on_the_bad_input_corpus(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "bad", outside_root=tmp_path / "outside")
    compared = 0
    for entry in corpus:
        try:
            img = read_image(entry.path)
        except (ImageReadError, OSError):
            continue  # the decoder's business, not the crop's
        assert _box_gap(brain_bbox(img), crop_reference.brain_bbox(img)) <= 2, entry.kind
        fixed = crop_reference.brain_bbox(img, threshold=0.3)
        assert _box_gap(brain_bbox(img, threshold=0.3), fixed) <= 2, entry.kind
        compared += 1
    assert compared >= 10


def test_boxes_match_the_numpy_crop_on_noise_and_specks() -> None:
    # Many small components and ties between equal areas: the pick must follow the old order.
    rng = np.random.default_rng(5)
    for i in range(30):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        img = (rng.random((h, w)) < rng.uniform(0.2, 0.8)).astype(np.float32)
        img[rng.integers(0, h), :] = 1.0 if i % 2 else 0.0
        assert _box_gap(brain_bbox(img), crop_reference.brain_bbox(img)) <= 2, i
    twins = np.zeros((64, 64), dtype=np.float32)
    twins[20:40, 14:28] = 0.8  # two equal blobs, far apart: the first in raster order wins
    twins[20:40, 38:52] = 0.8
    assert brain_bbox(twins, padding=0) == crop_reference.brain_bbox(twins, padding=0)


def test_box_on_a_reduced_decode_maps_back_to_the_full_decode(tmp_path: Path) -> None:
    # A 512 px JPEG for a 224 px model decodes at 256 px: the box found there, scaled by 2,
    # is the full-size box (padding is in the pixels of the image it is cut from).
    out = tmp_path / "synth"
    synthesize(out, per_folder=1, image_size_range=(512, 512), formats=("jpeg",),
               folders=list(REAL_COUNTS)[:3])
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        full, reduced = read_image(path), read_image(path, min_decode_side=224)
        assert reduced.shape == (256, 256)
        box = brain_bbox(reduced, padding=0)
        assert box is not None
        scaled = tuple(2 * v for v in box)
        assert _box_gap(scaled, brain_bbox(full, padding=0)) <= 2  # type: ignore[arg-type]
