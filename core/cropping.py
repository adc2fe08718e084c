"""Crop a grayscale MRI slice to the brain.

Two croppers work on the HxW float arrays in [0, 1] that :func:`core.imaging.read_image`
returns; both return a view into the input (no copy) and fall back to the whole image when
they find nothing, so a crop can never raise on odd input.

``crop_to_brain`` follows the common public recipe (Gaussian blur 5x5, threshold 45/255,
erode x2, dilate x2, largest object, crop to its extreme points) with two changes that
matter on scanner exports:

- Text, rulers and orientation markers burnt into the corners or along the edges are not
  brain: components that lie wholly in a corner zone or an edge band are ignored, and tiny
  specks are dropped, before the largest component is chosen.
- A slice can fall apart into pieces after thresholding (cerebellum below a dark gap, the
  two hemispheres at the vertex); sizeable pieces next to the largest one are kept when
  they reach into the central part of the image (text labels hug the frame instead).

Blur, morphology and connected components run in OpenCV (issue 14: the hand-written numpy
version cost ~3 ms a 512 px slice in numpy call overhead; ``bench.preprocess`` has the
numbers, ``tests/core/crop_reference.py`` the old code the boxes are checked against).
Work happens on a copy downsampled to at most
``_WORK_SIDE`` pixels per side, which keeps the cost per image flat; the box is mapped back
to full resolution and ``padding`` absorbs the rounding.

``crop_profile`` is the reference notebook's "CropToContent": look along the middle row and
the middle column only, and take a centred crop of the extent found there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import cv2
import numpy as np

__all__ = [
    "CROP_MODES",
    "BrainBox",
    "CropMode",
    "apply_crop",
    "brain_bbox",
    "crop_profile",
    "crop_to_brain",
]

CropMode = Literal["brain", "profile", "none"]
CROP_MODES: tuple[str, ...] = get_args(CropMode)

# (top, bottom, left, right), bottom/right exclusive, in full-resolution pixels.
BrainBox = tuple[int, int, int, int]

# OpenCV's own thread pool is off for the whole process: on arrays of <= 256 px it costs
# more than it saves (the crop took twice as long with 2 threads on a 2-core host), the
# crop already runs one per decode thread or loader process, next to torch's threads, and
# a pool of threads that a prefork parent started does not survive the fork.
cv2.setNumThreads(1)

_WORK_SIDE = 256
_PADDING = 4  # pixels a side around the brain, at the file's resolution
# The public recipe's fixed threshold on 8-bit data; the upper bound of the automatic one.
_RECIPE_THRESHOLD = 45.0 / 255.0
# Below this, thresholding picks up JPEG ringing and scanner noise in the background.
_MIN_THRESHOLD = 8.0 / 255.0
_MIN_AREA_FRACTION = 0.01  # of the image: smaller objects are specks or glyphs
_CORNER_FRACTION = 0.3  # a component wholly inside a 30% x 30% corner is an annotation
_EDGE_FRACTION = 0.12  # ... and so is one wholly inside a 12% band along an edge
_KEEP_FRACTION = 0.05  # extra pieces at least 5% of the main one's area are kept ...
_NEAR_FRACTION = 0.1  # ... if they lie within 10% of the image size of the main one
_OUTER_FRACTION = 0.2  # ... and reach into the image's central 60% (labels hug the frame)
_MIN_CROP_SIDE = 8


def crop_to_brain(
    img: np.ndarray, *, threshold: float | None = None, padding: int = _PADDING
) -> np.ndarray:
    """Crop ``img`` (HxW, values in [0, 1]) to the brain, plus ``padding`` pixels a side.

    ``threshold`` is on the [0, 1] intensity scale (the public recipe's 45/255 is about
    0.176). ``None`` chooses it per image: Otsu's threshold, capped at 45/255 so dim slices
    keep their grey-matter rim, and floored to stay above background noise. Returns the
    whole image when no brain-sized object is found.
    """
    box = brain_bbox(img, threshold=threshold, padding=padding)
    if box is None:
        return img
    top, bottom, left, right = box
    return img[top:bottom, left:right]


def brain_bbox(
    img: np.ndarray, *, threshold: float | None = None, padding: int = _PADDING
) -> BrainBox | None:
    """The box :func:`crop_to_brain` would cut, or ``None`` when it keeps the whole image."""
    if _too_small(img, padding):
        return None
    work, scale_y, scale_x = _downsample(img)
    blurred = _gaussian5(work)
    picked = _pick_brain(_open_mask(blurred, _threshold(blurred, threshold)))
    return _full_box(picked, img.shape, scale_y, scale_x, padding)


def crop_profile(img: np.ndarray, *, threshold: float = 0.1, frame: int = 5) -> np.ndarray:
    """The reference notebook's crop: a centred crop sized by the middle row/column profile.

    Along the middle row and the middle column (ignoring ``frame`` pixels at each end, where
    scanners draw borders), find the first and last pixel brighter than ``threshold`` times
    the image maximum. The crop is that many rows and columns, centred on the image centre
    (as torchvision's ``CenterCrop``), not on the object: this matches the notebook.
    """
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    h, w = img.shape
    if h <= 2 * frame or w <= 2 * frame:
        return img
    peak = float(np.max(img))
    if not peak > 0.0:
        return img
    cut = threshold * peak
    xs = np.flatnonzero(img[h // 2, frame : w - frame] > cut)
    ys = np.flatnonzero(img[frame : h - frame, w // 2] > cut)
    if xs.size == 0 or ys.size == 0:
        return img
    crop_w = int(xs[-1] - xs[0] + 1)
    crop_h = int(ys[-1] - ys[0] + 1)
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img[top : top + crop_h, left : left + crop_w]


def apply_crop(img: np.ndarray, mode: CropMode, *, reduction: float = 1.0) -> np.ndarray:
    """Crop ``img`` with the named strategy, using each cropper's defaults.

    ``reduction``: ``img`` was decoded at 1/reduction of the file's size (a reduced-scale
    JPEG decode, :class:`core.imaging.DecodedImage`); the brain crop's padding shrinks with
    it, so the margin stays the same fraction of the brain as on a full-size decode.
    """
    if mode == "brain":
        if reduction <= 0:
            raise ValueError(f"reduction must be > 0, got {reduction}")
        return crop_to_brain(img, padding=round(_PADDING / reduction))
    if mode == "profile":
        return crop_profile(img)
    if mode == "none":
        return img
    raise ValueError(f"unknown crop mode {mode!r}; expected one of {CROP_MODES}")


# ------------------------------------------------------------------------------ internals


def _too_small(img: np.ndarray, padding: int) -> bool:
    """Raise on input no crop can take; True when the image is too small to crop."""
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    h, w = img.shape
    return bool(h < 3 or w < 3)


def _threshold(blurred: np.ndarray, threshold: float | None) -> float:
    if threshold is None:
        return min(max(_otsu(blurred), _MIN_THRESHOLD), _RECIPE_THRESHOLD)
    return float(threshold)


def _full_box(
    picked: tuple[int, int, int, int] | None,
    shape: tuple[int, ...],
    scale_y: float,
    scale_x: float,
    padding: int,
) -> BrainBox | None:
    """The inclusive working-resolution box ``picked``, padded, at full resolution."""
    if picked is None:
        return None
    h, w = shape
    y0, y1, x0, x1 = picked
    top = max(0, math.floor(y0 * scale_y) - padding)
    bottom = min(h, math.ceil((y1 + 1) * scale_y) + padding)
    left = max(0, math.floor(x0 * scale_x) - padding)
    right = min(w, math.ceil((x1 + 1) * scale_x) + padding)
    if bottom - top < _MIN_CROP_SIDE or right - left < _MIN_CROP_SIDE:
        return None
    return top, bottom, left, right


def _downsample(
    img: np.ndarray, resize: Callable[[np.ndarray, int, int], np.ndarray] | None = None
) -> tuple[np.ndarray, float, float]:
    """``img`` as float32 at most ``_WORK_SIDE`` a side, and the scale back per axis.

    ``resize(src, height, width)`` shrinks it (default: OpenCV's area filter); the numpy
    crop kept for the tests passes its own.
    """
    h, w = img.shape
    side = max(h, w)
    src = np.asarray(img, dtype=np.float32)
    if side <= _WORK_SIDE:
        return src, 1.0, 1.0
    f = _WORK_SIDE / side
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    small = (resize or _area_resize)(src, nh, nw)
    return small, h / nh, w / nw


def _area_resize(src: np.ndarray, nh: int, nw: int) -> np.ndarray:
    # Area (box) filtering keeps thin bright structures from vanishing between samples.
    out: np.ndarray = cv2.resize(src, (nw, nh), interpolation=cv2.INTER_AREA)
    return out


def _gaussian_kernel() -> np.ndarray:
    # sigma 1.1 is what OpenCV derives for a 5x5 kernel with sigma=0, as in the recipe.
    x = np.arange(-2, 3, dtype=np.float32)
    k: np.ndarray = np.exp(-(x**2) / (2 * 1.1**2))
    k /= k.sum()
    return k


_K5 = _gaussian_kernel()
_SQUARE3 = np.ones((3, 3), dtype=np.uint8)


def _gaussian5(img: np.ndarray) -> np.ndarray:
    # Reflect-101 borders (numpy's "reflect"), as the numpy version had them.
    out: np.ndarray = cv2.sepFilter2D(img, cv2.CV_32F, _K5, _K5, borderType=cv2.BORDER_REFLECT_101)
    return out


# np.histogram(bins=256, range=(0, 1))'s edges for float32 data.
_EDGES_256 = np.linspace(0.0, 1.0, 257, dtype=np.float32)
_CENTRES_256 = (_EDGES_256[:-1] + _EDGES_256[1:]) / 2


def _histogram256(img: np.ndarray) -> np.ndarray:
    """``np.histogram(np.clip(img, 0, 1), bins=256, range=(0, 1))[0]`` as float64.

    ``v * 256`` is exact in float32 (a power of two) and so are the edges ``i / 256``:
    truncating ``clip(v * 256, 0, 255)`` gives np.histogram's bin, 1.0 in the last one as
    there, and an 8-bit histogram in OpenCV is ten times cheaper than a float one.
    """
    scaled = np.multiply(img, np.float32(256.0))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    hist = cv2.calcHist([scaled.astype(np.uint8)], [0], None, [256], [0, 256])
    out: np.ndarray = hist.ravel().astype(np.float64)
    return out


def _otsu(img: np.ndarray) -> float:
    # On the float histogram rather than cv2.THRESH_OTSU: OpenCV's Otsu needs 8-bit input,
    # and rounding to 8 bits first would move the threshold (and the boxes) on dim slices.
    hist = _histogram256(img)
    total = hist.sum()
    if total == 0:
        return _RECIPE_THRESHOLD
    w0 = np.cumsum(hist)
    w1 = total - w0
    s0 = np.cumsum(hist * _CENTRES_256)
    m0 = np.divide(s0, w0, out=np.zeros_like(s0), where=w0 > 0)
    m1 = np.divide(s0[-1] - s0, w1, out=np.zeros_like(s0), where=w1 > 0)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(_EDGES_256[int(np.argmax(between)) + 1])


def _open_mask(blurred: np.ndarray, t: float) -> np.ndarray:
    """``blurred > t``, eroded twice and dilated twice by a 3x3 square, as uint8 0/1.

    OpenCV's default morphology border leaves out-of-image pixels out of the min/max, which
    is the edge padding the recipe needs: the frame never eats into an object touching it.
    """
    mask = (blurred > np.float32(t)).view(np.uint8)
    eroded = cv2.erode(mask, _SQUARE3, iterations=2)
    out: np.ndarray = cv2.dilate(eroded, _SQUARE3, iterations=2)
    return out


def _components(mask: np.ndarray, min_area: float = 0.0) -> np.ndarray:
    """8-connected components of at least ``min_area`` pixels, as rows of (area, top,
    bottom, left, right), inclusive, in the row-major order of their first pixel.

    That order is the numpy crop's (np.argmax's tie-break between equal areas depends on
    it); OpenCV numbers components in the order of its 2x2 block scan instead, so the rows
    are sorted by their first pixel, found in each component's top row.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
    ids = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_area) + 1  # 0 is the background
    if n <= 1 or ids.size == 0:
        return np.zeros((0, 5), dtype=np.int64)
    s = stats[ids].astype(np.int64)
    left, top = s[:, cv2.CC_STAT_LEFT], s[:, cv2.CC_STAT_TOP]
    right = left + s[:, cv2.CC_STAT_WIDTH] - 1
    bottom = top + s[:, cv2.CC_STAT_HEIGHT] - 1
    first_x = np.argmax(labels[top] == ids[:, None], axis=1)
    order = np.argsort(top * mask.shape[1] + first_x, kind="stable")
    rows = np.stack([s[:, cv2.CC_STAT_AREA], top, bottom, left, right], axis=1)
    out: np.ndarray = rows[order]
    return out


def _pick_brain(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    h, w = mask.shape
    # Specks go first, in numpy; the few sizeable components left are ruled on in Python,
    # which beats a dozen numpy calls on arrays of two or three rows.
    big = _components(mask, _MIN_AREA_FRACTION * h * w).tolist()
    cy, cx = _CORNER_FRACTION * h, _CORNER_FRACTION * w
    ey, ex = _EDGE_FRACTION * h, _EDGE_FRACTION * w
    candidates = []
    for area, top, bottom, left, right in big:
        in_corner = (bottom < cy or top >= h - cy) and (right < cx or left >= w - cx)
        in_band = bottom < ey or top >= h - ey or right < ex or left >= w - ex
        if not (in_corner or in_band):
            candidates.append((area, top, bottom, left, right))
    if not candidates:
        return None
    main = max(candidates, key=lambda c: c[0])  # the first of equals, as np.argmax
    _, y0, y1, x0, x1 = main
    my, mx = _NEAR_FRACTION * h, _NEAR_FRACTION * w
    oy, ox = _OUTER_FRACTION * h, _OUTER_FRACTION * w
    keep = [main] + [
        c
        for c in candidates
        if c[0] >= _KEEP_FRACTION * main[0]
        and c[1] <= y1 + my
        and c[2] >= y0 - my
        and c[3] <= x1 + mx
        and c[4] >= x0 - mx
        and c[1] < h - oy
        and c[2] >= oy
        and c[3] < w - ox
        and c[4] >= ox
    ]
    return (
        min(c[1] for c in keep),
        max(c[2] for c in keep),
        min(c[3] for c in keep),
        max(c[4] for c in keep),
    )
