"""Reference copy of the numpy brain crop that core.cropping replaced (issue 14).

Kept only for the tests and ``bench.preprocess``: the OpenCV crop's boxes are checked
against this implementation's boxes (within +-2 px), and the bench times it as "before".
Not used by production code. What it exists to compare stands here as it was: the Pillow
downsample, the numpy blur, morphology and run-length labelling and the vectorised pick.
What did not change (input checks, the Otsu threshold, the box's mapping back to full
resolution, the constants) is imported from core.cropping instead of copied.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from core import cropping
from core.cropping import (
    _CORNER_FRACTION,
    _EDGE_FRACTION,
    _K5,
    _KEEP_FRACTION,
    _MIN_AREA_FRACTION,
    _NEAR_FRACTION,
    _OUTER_FRACTION,
    BrainBox,
    _full_box,
    _threshold,
    _too_small,
)

__all__ = ["brain_bbox", "crop_to_brain"]


def crop_to_brain(
    img: np.ndarray, *, threshold: float | None = None, padding: int = 4
) -> np.ndarray:
    """core.cropping.crop_to_brain with this module's box."""
    box = brain_bbox(img, threshold=threshold, padding=padding)
    return img if box is None else img[box[0] : box[1], box[2] : box[3]]


def brain_bbox(
    img: np.ndarray, *, threshold: float | None = None, padding: int = 4
) -> BrainBox | None:
    """The box the numpy crop cut, or ``None`` when it kept the whole image."""
    if _too_small(img, padding):
        return None
    work, scale_y, scale_x = _downsample(img)
    blurred = _gaussian5(work)
    mask = _dilate(_erode(blurred > _threshold(blurred, threshold), 2), 2)
    return _full_box(_pick_brain(mask), img.shape, scale_y, scale_x, padding)


# ------------------------------------------------------------------------------ internals


def _downsample(img: np.ndarray) -> tuple[np.ndarray, float, float]:
    return cropping._downsample(img, resize=_resize)


def _resize(src: np.ndarray, nh: int, nw: int) -> np.ndarray:
    h, w = src.shape
    if h == 2 * nh and w == 2 * nw:
        halved = _halve(src)
        if halved is not None:
            return halved
    return _box_resize(src, nh, nw)


def _box_resize(src: np.ndarray, nh: int, nw: int) -> np.ndarray:
    # BOX (area) filtering keeps thin bright structures from vanishing between samples.
    small = Image.fromarray(np.ascontiguousarray(src), mode="F").resize(
        (nw, nh), Image.Resampling.BOX
    )
    return np.asarray(small, dtype=np.float32)


_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
# Pass order Pillow uses to halve a mode "F" image of a given shape: 1 = columns first,
# 2 = rows first, 0 = neither reproduces it (keep calling Pillow). See _halve.
_HALVE_ORDER: dict[tuple[int, int], int] = {}


def _halve(src: np.ndarray) -> np.ndarray | None:
    """Pillow's BOX resize of a mode "F" image to exactly half its size, in numpy.

    For a factor of exactly 2 Pillow's BOX weights are 0.5 and 0.5, and each of its two
    passes (stored as float32 in between) computes ``float32(0.0 + a*0.5 + b*0.5)`` in
    double. For float32 ``a`` and ``b`` that equals ``float32(a + b) * 0.5`` in float32
    arithmetic: the products are exact in double, the double sum of two float32 values
    rounds to float32 as the exact sum does, and halving a float32 is exact unless the
    result is below the normal range, where ``a + b`` is itself exact. What differs is
    handled: a float32 sum can overflow where Pillow's halved terms do not (``None`` is
    returned when the result is not all finite, and the caller uses Pillow), and Pillow's
    double sum starts at +0.0, so a zero sum is +0.0 there, never -0.0 (adding +0.0 to the
    float32 sum maps -0.0 to +0.0 and leaves every other value alone; it is needed in the
    second pass only, as the first pass's zeros differ at most in sign, which a sum of two
    values carries into its result only when that result is zero). Halving a tiny negative
    sum rounds to -0.0 in both.

    Which pass Pillow runs first is its implementation detail (it depends on the shape), so
    it is found once per shape by comparing both orders with Pillow on a fixed random image.
    """
    h, w = src.shape
    order = _HALVE_ORDER.get((h, w))
    if order is None:
        probe = np.random.default_rng(h * 4099 + w).random((h, w), dtype=np.float32)
        expected = _box_resize(probe, h // 2, w // 2)
        order = next((o for o in (1, 2) if np.array_equal(_halve_passes(probe, o), expected)), 0)
        _HALVE_ORDER[(h, w)] = order
    if order == 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        out = _halve_passes(src, order)
        # A float64 sum of finite float32 values cannot overflow; inf and NaN propagate.
        finite = math.isfinite(float(out.sum(dtype=np.float64)))
    return out if finite else None


def _halve_passes(src: np.ndarray, order: int) -> np.ndarray:
    if order == 1:
        part = np.add(src[:, 0::2], src[:, 1::2])
        part *= _HALF
        out: np.ndarray = np.add(part[0::2], part[1::2])
    else:
        part = np.add(src[0::2], src[1::2])
        part *= _HALF
        out = np.add(part[:, 0::2], part[:, 1::2])
    out += _ZERO  # before halving: a tiny negative sum still halves to -0.0, as in Pillow
    out *= _HALF
    return out


# The kernel is symmetric bit for bit, so each product k[i] * pixel is computed once and
# used for both taps i and 4 - i.
_K5_SYMMETRIC = bool(_K5[0] == _K5[4] and _K5[1] == _K5[3])


def _gaussian5(img: np.ndarray) -> np.ndarray:
    """5x5 Gaussian blur with reflected borders (rows first, then columns).

    Every output is ``(((0 + k0*p0) + k1*p1) + k2*p2) + k3*p3) + k4*p4`` in float32, in
    that order, for the rows and then for the columns, as the straightforward
    pad-multiply-sum version computes it; float32 data takes a path that computes each
    distinct product once and reuses buffers.
    """
    h, w = img.shape
    if img.dtype != np.float32 or min(h, w) <= 2 or not _K5_SYMMETRIC:
        return _gaussian5_reference(img)
    k0, k1, k2 = _K5[0], _K5[1], _K5[2]
    # Products of the column-padded image: q[:, j + 2] = k * img[:, j], reflected borders.
    qs = []
    for k in (k0, k1, k2):
        q = np.empty((h, w + 4), dtype=np.float32)
        np.multiply(img, k, out=q[:, 2 : w + 2])
        q[:, 0] = q[:, 4]
        q[:, 1] = q[:, 3]
        q[:, w + 2] = q[:, w]
        q[:, w + 3] = q[:, w - 1]
        qs.append(q)
    q0, q1, q2 = qs
    # Horizontal pass into a row-padded buffer; the filter works on each row alone, so
    # reflecting the filtered rows equals filtering the reflected rows.
    rows = np.empty((h + 4, w), dtype=np.float32)
    body = rows[2 : h + 2]
    np.add(q0[:, 0:w], q1[:, 1 : w + 1], out=body)
    body += q2[:, 2 : w + 2]
    body += q1[:, 3 : w + 3]
    body += q0[:, 4 : w + 4]
    rows[0] = rows[4]
    rows[1] = rows[3]
    rows[h + 2] = rows[h]
    rows[h + 3] = rows[h - 1]
    # Vertical pass.
    v0 = np.multiply(rows, k0)
    v1 = np.multiply(rows, k1)
    v2 = np.multiply(rows, k2)
    out: np.ndarray = np.add(v0[0:h], v1[1 : h + 1])
    out += v2[2 : h + 2]
    out += v1[3 : h + 3]
    out += v0[4 : h + 4]
    # The sums above start from the first product rather than from 0, which only differs
    # in giving -0.0 where the reference gives +0.0; adding +0.0 changes nothing else.
    out += np.float32(0.0)
    return out


def _gaussian5_reference(img: np.ndarray) -> np.ndarray:
    k = _K5
    p = np.pad(img, 2, mode="reflect") if min(img.shape) > 2 else np.pad(img, 2, mode="edge")
    rows = sum(k[i] * p[:, i : i + img.shape[1]] for i in range(5))
    return np.asarray(sum(k[i] * rows[i : i + img.shape[0], :] for i in range(5)))


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    # Edge padding: the image border must not eat into objects touching it (as OpenCV).
    # A 3x3 square is separable (rows, then columns), and n erosions by it are one erosion
    # by a (2n+1)-square: with edge padding each pass is a minimum over a window clamped
    # to the image, and clamped windows compose. Shifted in-place ANDs, no padding copies.
    if iterations <= 0:
        return mask
    return _shift_reduce(mask, iterations, np.bitwise_and)


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    # As _erode; constant False padding simply leaves out-of-image neighbours out of the OR.
    if iterations <= 0:
        return mask
    return _shift_reduce(mask, iterations, np.bitwise_or)


def _shift_reduce(mask: np.ndarray, radius: int, op: np.ufunc) -> np.ndarray:
    """``op`` over each pixel's (2*radius+1)-square window, clipped to the image."""
    rows = mask.copy()
    for s in range(1, radius + 1):
        op(rows[:, s:], mask[:, :-s], out=rows[:, s:])
        op(rows[:, :-s], mask[:, s:], out=rows[:, :-s])
    out = rows.copy()
    for s in range(1, radius + 1):
        op(out[s:], rows[:-s], out=out[s:])
        op(out[:-s], rows[s:], out=out[:-s])
    return out


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components as rows of (area, top, bottom, left, right), inclusive."""
    h, w = mask.shape
    stride = w + 2
    # One False column either side keeps runs inside their row, so the transitions of the
    # flattened array alternate start, end, start, ... (ends exclusive).
    padded = np.zeros((h, stride), dtype=bool)
    padded[:, 1:-1] = mask
    flat = padded.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    if edges.size == 0:
        return np.zeros((0, 5), dtype=np.int64)
    key_starts, key_ends = edges[0::2], edges[1::2]
    run_rows = key_starts // stride
    row_base = run_rows * stride
    run_starts = key_starts - row_base
    run_ends = key_ends - row_base
    roots = _run_roots(run_rows, run_starts, run_ends, stride)
    # Every root is its own parent and is the smallest run index of its component, which
    # is what np.unique(roots, return_inverse=True) would give, without sorting.
    is_root = roots == np.arange(roots.size)
    uniq = np.flatnonzero(is_root)
    inverse = (np.cumsum(is_root) - 1)[roots]
    k = uniq.size
    area = np.bincount(inverse, weights=run_ends - run_starts, minlength=k).astype(np.int64)
    # Runs are in row-major order, so a component's first run (its root) is in its top row.
    top = run_rows[uniq].astype(np.int64)
    bottom = np.full(k, -1, dtype=np.int64)
    left = np.full(k, w, dtype=np.int64)
    right = np.full(k, -1, dtype=np.int64)
    np.maximum.at(bottom, inverse, run_rows)
    np.minimum.at(left, inverse, run_starts)
    np.maximum.at(right, inverse, run_ends - 1)
    return np.stack([area, top, bottom, left, right], axis=1)


def _run_roots(
    run_rows: np.ndarray, run_starts: np.ndarray, run_ends: np.ndarray, stride: int
) -> np.ndarray:
    """Component root of every run: the smallest run index of its component.

    Vectorised union-find (hooking plus pointer jumping): O(log n) numpy passes instead of a
    Python loop over every run, which was most of the crop's cost. Runs of row r touch runs
    of row r-1 when ``start_a <= end_b and start_b <= end_a`` (exclusive ends, so diagonal
    contact counts: 8-connectivity). Within a row runs are sorted and disjoint, so the
    touching runs of the row above form a contiguous range, found with two searchsorted
    calls on row-major keys (``row * stride + column``; ``stride`` exceeds every column).
    """
    n = run_rows.size
    key_starts = run_rows * stride + run_starts
    key_ends = run_rows * stride + run_ends
    above = (run_rows - 1) * stride
    lo = np.searchsorted(key_ends, above + run_starts, side="left")
    hi = np.searchsorted(key_starts, above + run_ends, side="right")
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    parent = np.arange(n, dtype=np.int64)
    if total == 0:
        return parent
    b = np.repeat(np.arange(n, dtype=np.int64), counts)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    a = np.repeat(lo.astype(np.int64), counts) + offsets
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            return parent
        pa, pb = pa[differ], pb[differ]
        # Hook the larger root under the smaller one: the minimum index of a component is
        # never re-parented, so it ends up as the root (as the sequential version had it).
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))
        while True:  # pointer jumping until every run points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _pick_brain(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    h, w = mask.shape
    comps = _components(mask)
    if comps.shape[0] == 0:
        return None
    area, top, bottom, left, right = (comps[:, i] for i in range(5))
    big = area >= _MIN_AREA_FRACTION * h * w
    cy, cx = _CORNER_FRACTION * h, _CORNER_FRACTION * w
    ey, ex = _EDGE_FRACTION * h, _EDGE_FRACTION * w
    in_top, in_bottom = bottom < cy, top >= h - cy
    in_left, in_right = right < cx, left >= w - cx
    in_corner = (in_top | in_bottom) & (in_left | in_right)
    in_band = (bottom < ey) | (top >= h - ey) | (right < ex) | (left >= w - ex)
    candidates = np.flatnonzero(big & ~in_corner & ~in_band)
    if candidates.size == 0:
        return None
    main = int(candidates[np.argmax(area[candidates])])
    y0, y1, x0, x1 = int(top[main]), int(bottom[main]), int(left[main]), int(right[main])
    my, mx = _NEAR_FRACTION * h, _NEAR_FRACTION * w
    near = (
        (area[candidates] >= _KEEP_FRACTION * area[main])
        & (top[candidates] <= y1 + my)
        & (bottom[candidates] >= y0 - my)
        & (left[candidates] <= x1 + mx)
        & (right[candidates] >= x0 - mx)
    )
    oy, ox = _OUTER_FRACTION * h, _OUTER_FRACTION * w
    central = (
        (top[candidates] < h - oy)
        & (bottom[candidates] >= oy)
        & (left[candidates] < w - ox)
        & (right[candidates] >= ox)
    )
    keep = candidates[near & central]
    keep = np.union1d(keep, [main])
    return (
        int(top[keep].min()),
        int(bottom[keep].max()),
        int(left[keep].min()),
        int(right[keep].max()),
    )
