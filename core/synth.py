"""Synthetic brain-MRI-like slices in the Kaggle "brain-tumor-mri-images-44c" folder layout.

Tests and demos need a data set that looks like the real one to every part of the pipeline
(folder names, mixed JPEG/PNG, varying sizes, burnt-in corner text, dark background around a
bright head) and that a small CNN can actually learn, so that "training works" is testable
without the real (licensed, large) data. Each of the 14 tumour classes gets its own lesion
pattern built from geometry that survives the training augmentation (horizontal flips and
small rotations): vertical position, central vs peripheral, size, shape, count, ring vs solid,
cysts and calcifications. Left/right is deliberately random. Normal slices have no lesion.

The MRI sequence only changes contrast: T1 (fluid dark, lesions mildly dark), T1C+ (as T1,
but enhancing lesion parts turn bright) and T2 (fluid and oedema bright).

Every image is drawn from its own ``numpy.random.Generator`` seeded by (seed, folder, index),
so a folder's first images do not change when more images per folder are asked for.
"""

from __future__ import annotations

import argparse
import csv
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from core.labels import CLASSES_15, parse_folder_name

__all__ = [
    "FOLDERS_44C",
    "REAL_COUNTS",
    "SynthSummary",
    "main",
    "render_slice",
    "synthesize",
]

# The 44 folder names and image counts of the public data set (Kaggle
# "brain-tumor-mri-images-44c"), embedded so synthesis needs no external file.
REAL_COUNTS: Mapping[str, int] = MappingProxyType(
    {
        "Astrocitoma T1": 176,
        "Astrocitoma T1C+": 233,
        "Astrocitoma T2": 171,
        "Carcinoma T1": 66,
        "Carcinoma T1C+": 112,
        "Carcinoma T2": 73,
        "Ependimoma T1": 45,
        "Ependimoma T1C+": 48,
        "Ependimoma T2": 57,
        "Ganglioglioma T1": 20,
        "Ganglioglioma T1C+": 18,
        "Ganglioglioma T2": 23,
        "Germinoma T1": 27,
        "Germinoma T1C+": 40,
        "Germinoma T2": 33,
        "Glioblastoma T1": 55,
        "Glioblastoma T1C+": 94,
        "Glioblastoma T2": 55,
        "Granuloma T1": 30,
        "Granuloma T1C+": 31,
        "Granuloma T2": 17,
        "Meduloblastoma T1": 23,
        "Meduloblastoma T1C+": 67,
        "Meduloblastoma T2": 41,
        "Meningioma T1": 272,
        "Meningioma T1C+": 369,
        "Meningioma T2": 233,
        "Neurocitoma T1": 130,
        "Neurocitoma T1C+": 223,
        "Neurocitoma T2": 104,
        "Oligodendroglioma T1": 86,
        "Oligodendroglioma T1C+": 72,
        "Oligodendroglioma T2": 66,
        "Papiloma T1": 66,
        "Papiloma T1C+": 108,
        "Papiloma T2": 63,
        "Schwannoma T1": 148,
        "Schwannoma T1C+": 194,
        "Schwannoma T2": 123,
        "Tuberculoma T1": 28,
        "Tuberculoma T1C+": 84,
        "Tuberculoma T2": 33,
        "_NORMAL T1": 251,
        "_NORMAL T2": 271,
    }
)
FOLDERS_44C: tuple[str, ...] = tuple(REAL_COUNTS)

_FORMAT_SUFFIXES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # The real set mixes .jpg and .jpeg spellings; readers must accept both.
        "jpeg": (".jpg", ".jpg", ".jpeg"),
        "png": (".png",),
    }
)
# Filler words for file names; the real set has names like "005_big_gallery.jpeg".
_NAME_TAGS: tuple[str, ...] = (
    "big_gallery", "gallery", "axial", "slice", "scan", "img", "mri", "image", "ax_t1",
    "thumb", "large", "case", "exam", "study",
)
_ANNOTATIONS: tuple[str, ...] = (
    "L", "R", "A", "P", "T1", "T2", "T1C+", "FLAIR", "AX", "SE", "1cm", "5mm", "+C",
)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize` wrote: the root, the image total and the count per folder."""

    out: Path
    n_images: int
    counts: Mapping[str, int]
    seed: int


# --------------------------------------------------------------------------- contrast

# Tissue intensities per sequence, roughly as they look on real scans (fluid dark on T1,
# bright on T2; white matter brighter than grey matter on T1, darker on T2).
_TISSUE: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "T1": {"fat": 0.85, "bone": 0.07, "gm": 0.45, "wm": 0.62, "csf": 0.10,
               "lesion": 0.26, "fluid": 0.08, "edema": 0.36, "calc": 0.02, "menin": 0.57},
        "T1C+": {"fat": 0.85, "bone": 0.07, "gm": 0.45, "wm": 0.62, "csf": 0.10,
                 "lesion": 0.26, "fluid": 0.08, "edema": 0.36, "calc": 0.02, "menin": 0.57},
        "T2": {"fat": 0.60, "bone": 0.06, "gm": 0.55, "wm": 0.38, "csf": 0.92,
               "lesion": 0.76, "fluid": 0.95, "edema": 0.72, "calc": 0.02, "menin": 0.62},
    }
)


class _Canvas:
    """A slice being painted in brain coordinates: (u, v) is the unit circle of the brain,
    u to the image right, v downwards (v < 0 is anterior/top)."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, sequence: str) -> None:
        self.rng = rng
        self.sequence = sequence
        self.tissue = {k: float(np.clip(x + rng.normal(0.0, 0.025), 0.0, 1.0))
                       for k, x in _TISSUE[sequence].items()}
        cx = width / 2 + rng.uniform(-0.04, 0.04) * width
        cy = height / 2 + rng.uniform(-0.03, 0.03) * height
        ax = width * rng.uniform(0.33, 0.41)
        ay = height * rng.uniform(0.38, 0.43)
        theta = math.radians(rng.uniform(-10.0, 10.0))
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        dx, dy = xs - cx, ys - cy
        c, s = math.cos(theta), math.sin(theta)
        self.u = (dx * c + dy * s) / ax
        self.v = (-dx * s + dy * c) / ay
        self.r = np.sqrt(self.u**2 + self.v**2)
        self.phi = np.arctan2(self.v, self.u)
        self.img: np.ndarray = np.zeros((height, width), dtype=np.float32)
        self.height, self.width = height, width

    def noise_field(self, cells: int) -> np.ndarray:
        """Smooth random field in [-1, 1]: random cells upsampled bicubically."""
        grid = self.rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize(
            (self.width, self.height), Image.Resampling.BICUBIC
        )
        return np.asarray(up, dtype=np.float32)

    def paint(self, alpha: np.ndarray, value: float | np.ndarray) -> None:
        self.img = self.img * (1.0 - alpha) + np.float32(value) * alpha

    def blob(
        self,
        cu: float,
        cv: float,
        ru: float,
        rv: float | None = None,
        *,
        angle: float = 0.0,
        soft: float = 0.12,
        wobble: float = 0.0,
    ) -> np.ndarray:
        """Soft-edged ellipse alpha in [0, 1]; ``wobble`` makes the outline irregular."""
        rv = ru if rv is None else rv
        du, dv = self.u - cu, self.v - cv
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            du, dv = du * c + dv * s, -du * s + dv * c
        d = np.sqrt((du / ru) ** 2 + (dv / rv) ** 2)
        if wobble:
            a = np.arctan2(dv, du)
            p1, p2 = self.rng.uniform(0, 2 * math.pi, size=2)
            k = int(self.rng.integers(3, 6))
            d = d * (1.0 + wobble * (0.6 * np.sin(k * a + p1) + 0.4 * np.sin((k + 2) * a + p2)))
        mask: np.ndarray = np.clip(0.5 + (1.0 - d) / (2.0 * soft), 0.0, 1.0).astype(np.float32)
        return mask

    def lesion_value(self, enhancement: float) -> float:
        """Solid tumour tissue; on T1C+ it brightens in proportion to its enhancement."""
        base = self.tissue["lesion"]
        if self.sequence == "T1C+":
            return min(1.0, base + 0.68 * enhancement)
        return base

    # Compound structures --------------------------------------------------------------

    def solid(self, cu: float, cv: float, r: float, enhancement: float, **kw: float) -> None:
        self.paint(self.blob(cu, cv, r, **kw), self.lesion_value(enhancement))

    def ring(self, cu: float, cv: float, r: float, *, wall: float = 0.4,
             enhancement: float = 0.95, core: str = "fluid", wobble: float = 0.0,
             edema: float = 0.0) -> None:
        """A ring-enhancing lesion: enhancing wall around a necrotic/fluid (or caseous) core."""
        if edema:
            self.paint(0.8 * self.blob(cu, cv, r * edema, soft=0.35, wobble=0.15),
                       self.tissue["edema"])
        self.paint(self.blob(cu, cv, r, wobble=wobble), self.lesion_value(enhancement))
        # The ring wall stands out on T1/T2 too: a slightly different rim value.
        inner = self.blob(cu, cv, r * (1.0 - wall), soft=0.18, wobble=wobble * 0.5)
        if core == "caseous":
            # Tuberculoma "target": solid caseous core, dark on T2.
            value = 0.15 if self.sequence == "T2" else 0.55
        else:
            value = self.tissue["fluid"]
        self.paint(inner, value)


def _mirror(rng: np.random.Generator) -> float:
    # Left/right is random so that horizontal flips never change a class.
    return 1.0 if rng.random() < 0.5 else -1.0


def _draw_brain(cv: _Canvas, *, ventricle_scale: float = 1.0) -> None:
    t, rng = cv.tissue, cv.rng
    # Scalp fat, then skull bone, then the brain inside it.
    cv.paint(np.clip((1.10 - cv.r) / 0.03, 0, 1), t["fat"])
    cv.paint(np.clip((1.015 - cv.r) / 0.02, 0, 1), t["bone"])
    gyri = (0.035 * np.sin(11 * cv.phi + rng.uniform(0, 6.3))
            + 0.02 * np.sin(19 * cv.phi + rng.uniform(0, 6.3)))
    cv.paint(np.clip((0.94 - cv.r + 0.3 * gyri) / 0.02, 0, 1), t["csf"] * 0.6 + t["gm"] * 0.4)
    cv.paint(np.clip((0.92 - cv.r + gyri * 0.3) / 0.02, 0, 1), t["gm"])
    wm_edge = 0.76 + 2.0 * gyri + 0.04 * cv.noise_field(5)
    cv.paint(np.clip((wm_edge - cv.r) / 0.05, 0, 1), t["wm"])
    # Interhemispheric fissure.
    fissure = np.clip((0.018 - np.abs(cv.u)) / 0.01, 0, 1) * (np.abs(cv.v) > 0.45) * (cv.r < 0.9)
    cv.paint(fissure.astype(np.float32), t["csf"])
    # Lateral ventricles: two tilted crescents either side of the midline.
    vs = ventricle_scale * rng.uniform(0.8, 1.2)
    for side in (-1.0, 1.0):
        cv.paint(cv.blob(side * 0.12 * vs, -0.06, 0.06 * vs, 0.22 * vs, angle=side * 0.3,
                         soft=0.2), t["csf"])


def _draw_lesion(cv: _Canvas, cls: str) -> None:
    rng, t = cv.rng, cv.tissue
    s = _mirror(rng)
    k = float(rng.uniform(0.85, 1.2))  # lesion size jitter

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    if cls == "Astrocitoma":
        # Single ill-defined, non-enhancing lateral mass, mid-height.
        r = 0.21 * k
        cv.solid(s * u(0.35, 0.48), u(-0.1, 0.15), r, 0.12, rv=r * u(0.8, 1.2),
                 soft=0.4, wobble=0.12)
    elif cls == "Carcinoma":
        # Metastases: 3-5 scattered ring lesions of varying size with oedema.
        centres: list[tuple[float, float]] = []
        n = int(rng.integers(3, 6))
        while len(centres) < n:
            a, rad = u(0, 2 * math.pi), math.sqrt(u(0.02, 0.55))
            c = (rad * math.cos(a), rad * math.sin(a))
            if all(math.dist(c, o) > 0.33 for o in centres):
                centres.append(c)
        for cu, cvv in centres:
            cv.ring(cu, cvv, u(0.08, 0.12), wall=0.45, edema=2.0)
    elif cls == "Ependimoma":
        # Vertically elongated midline mass low in the ventricular system, with small cysts.
        cu, cvv = u(-0.04, 0.04), u(0.22, 0.36)
        cv.solid(cu, cvv, 0.09 * k, 0.5, rv=0.27 * k, soft=0.15, wobble=0.05)
        for _ in range(int(rng.integers(2, 4))):
            cv.paint(cv.blob(cu + u(-0.04, 0.04), cvv + u(-0.15, 0.15), 0.03), t["fluid"])
    elif cls == "Ganglioglioma":
        # Lateral temporal cyst with a brightly enhancing mural nodule on its outer wall.
        cu, cvv, r = s * u(0.45, 0.58), u(0.15, 0.38), 0.16 * k
        cv.paint(cv.blob(cu, cvv, r, soft=0.08), t["fluid"])
        cv.solid(cu + s * r * 0.85, cvv - r * 0.3, 0.07 * k, 1.0, soft=0.12)
    elif cls == "Germinoma":
        # Bifocal midline germinoma: pineal plus suprasellar, both small, solid, enhancing.
        cv.solid(u(-0.02, 0.02), u(0.05, 0.16), 0.085 * k, 1.0, soft=0.12)
        cv.solid(u(-0.02, 0.02), u(-0.36, -0.26), 0.075 * k, 1.0, soft=0.12)
    elif cls == "Glioblastoma":
        # Large, irregular, thick-walled ring with necrosis and surrounding oedema.
        r = 0.27 * k
        cv.ring(s * u(0.22, 0.38), u(-0.35, 0.0), r, wall=0.38, wobble=0.14, edema=1.45,
                enhancement=0.85)
    elif cls == "Granuloma":
        # One small anterior ring lesion with a calcified (dark) centre.
        cu, cvv = s * u(0.35, 0.55), u(-0.62, -0.38)
        r = 0.12 * k
        cv.ring(cu, cvv, r, wall=0.4, edema=1.8)
        cv.paint(cv.blob(cu, cvv, r * 0.4, soft=0.15), t["calc"])
    elif cls == "Meduloblastoma":
        # Posterior-fossa midline solid mass with hydrocephalus (drawn with the brain).
        cu, cvv = u(-0.05, 0.05), u(0.6, 0.7)
        cv.solid(cu, cvv, 0.16 * k, 0.6, rv=0.14 * k, soft=0.12, wobble=0.06)
        cv.paint(cv.blob(cu + u(-0.05, 0.05), cvv, 0.04), t["fluid"])
    elif cls == "Meningioma":
        # Extra-axial dome on the convexity: broad base on the skull, homogeneous, bright
        # enhancement, a CSF cleft around it and a dural tail.
        a = s * math.radians(u(20.0, 65.0))
        bu, bv = 0.9 * math.sin(a), -0.9 * math.cos(a)
        tangent = a  # rotate the dome so its long axis lies along the skull
        cv.paint(cv.blob(bu, bv, 0.26 * k, 0.15 * k, angle=tangent, soft=0.1), t["csf"])
        value = min(1.0, t["menin"] + (0.4 if cv.sequence == "T1C+" else 0.0))
        cv.paint(cv.blob(bu, bv, 0.23 * k, 0.13 * k, angle=tangent, soft=0.08), value)
        tail = cv.blob(bu, bv, 0.4 * k, 0.025, angle=tangent, soft=0.3) * (cv.r > 0.84)
        cv.paint(tail.astype(np.float32) * 0.8, value)
    elif cls == "Neurocitoma":
        # Intraventricular lobulated mass with a "soap bubble" of small cysts.
        cu, cvv, r = s * u(0.06, 0.14), u(-0.18, -0.02), 0.17 * k
        cv.solid(cu, cvv, r, 0.45, soft=0.1, wobble=0.08)
        for _ in range(int(rng.integers(5, 9))):
            a, d = u(0, 2 * math.pi), u(0.0, 0.7) * r
            cv.paint(cv.blob(cu + d * math.cos(a), cvv + d * math.sin(a), u(0.035, 0.05),
                             soft=0.15), t["fluid"])
    elif cls == "Oligodendroglioma":
        # Frontal cortical mass with coarse dark calcification specks.
        cu, cvv, r = s * u(0.2, 0.42), u(-0.68, -0.55), 0.19 * k
        cv.solid(cu, cvv, r, 0.2, rv=r * 0.8, soft=0.25, wobble=0.15)
        for _ in range(int(rng.integers(5, 9))):
            a, d = u(0, 2 * math.pi), u(0.0, 0.7) * r
            cv.paint(cv.blob(cu + d * math.cos(a), cvv + 0.8 * d * math.sin(a), u(0.03, 0.045),
                             soft=0.2), t["calc"])
    elif cls == "Papiloma":
        # Choroid plexus papilloma: cauliflower cluster of enhancing fronds in a dilated
        # ventricular atrium.
        cu, cvv = s * u(0.2, 0.3), u(0.08, 0.25)
        cv.paint(cv.blob(cu, cvv, 0.19 * k, soft=0.12), t["csf"])
        for _ in range(int(rng.integers(8, 13))):
            a, d = u(0, 2 * math.pi), u(0.0, 0.1) * k
            cv.solid(cu + d * math.cos(a), cvv + d * math.sin(a), u(0.035, 0.055), 1.0,
                     soft=0.2)
    elif cls == "Schwannoma":
        # Cerebellopontine-angle "ice cream cone": round mass plus a tapered extension into
        # the internal auditory canal (towards the lateral skull).
        cu, cvv, r = s * u(0.32, 0.42), u(0.55, 0.68), 0.12 * k
        cv.solid(cu, cvv, r, 0.85, rv=r * 0.9, soft=0.1)
        cv.solid(cu + s * r * 1.4, cvv - 0.03, r * 0.75, 0.85, rv=r * 0.3, angle=-s * 0.2,
                 soft=0.15)
        if rng.random() < 0.4:
            cv.paint(cv.blob(cu, cvv, r * 0.35), t["fluid"])
    elif cls == "Tuberculoma":
        # Conglomerate of 3-4 "target" ring lesions touching each other, little oedema.
        a, rad = u(0, 2 * math.pi), math.sqrt(u(0.0, 0.2))
        ccu, ccv = rad * math.cos(a), rad * math.sin(a)
        n = int(rng.integers(3, 5))
        for i in range(n):
            b = a + 2 * math.pi * i / n + u(-0.25, 0.25)
            cv.ring(ccu + 0.16 * math.cos(b), ccv + 0.16 * math.sin(b), u(0.1, 0.12) * k,
                    wall=0.4, core="caseous")
    elif cls != "Normal":
        raise ValueError(f"no lesion pattern for class {cls!r}")


def render_slice(
    cls: str,
    sequence: str,
    rng: np.random.Generator,
    *,
    size_range: tuple[int, int] = (96, 160),
) -> np.ndarray:
    """One synthetic slice of class ``cls`` in ``sequence`` as a uint8 HxW array."""
    if cls not in CLASSES_15:
        raise ValueError(f"unknown class {cls!r}")
    if sequence not in _TISSUE:
        raise ValueError(f"unknown sequence {sequence!r}")
    lo, hi = size_range
    width = int(rng.integers(lo, hi + 1))
    height = int(np.clip(round(width * rng.uniform(0.88, 1.14)), lo, hi))
    cv = _Canvas(height, width, rng, sequence)
    _draw_brain(cv, ventricle_scale=1.45 if cls == "Meduloblastoma" else 1.0)
    # Tissue texture: only inside the head, so the background stays dark.
    head = cv.r < 1.08
    texture = 0.07 * cv.noise_field(6) + 0.035 * cv.noise_field(max(8, width // 6))
    cv.img = np.where(head, cv.img * (1.0 + texture), cv.img)
    _draw_lesion(cv, cls)
    # Scanner effects: smooth bias field, contrast/gamma, noise.
    img = cv.img * (1.0 + 0.15 * cv.noise_field(3))
    img = img * rng.uniform(0.85, 1.1)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    img = img + rng.normal(0.0, rng.uniform(0.008, 0.035), size=img.shape).astype(np.float32)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _annotate(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Burn 1-3 text labels into random corners, as scanner exports and figures often have."""
    draw = ImageDraw.Draw(im)
    w, h = im.size
    font = ImageFont.load_default(size=max(8, int(min(w, h) * rng.uniform(0.07, 0.11))))
    corners = rng.permutation(4)[: int(rng.integers(1, 4))]
    fill = int(rng.integers(180, 256))
    for corner in corners:
        if rng.random() < 0.3:
            text = f"{int(rng.integers(1, 400))}"
        else:
            text = str(_ANNOTATIONS[int(rng.integers(len(_ANNOTATIONS)))])
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        x = 2 if corner in (0, 2) else max(0, w - tw - 3)
        y = 1 if corner in (0, 1) else max(0, h - th - 4)
        draw.text((x - left, y - top), text, fill=fill, font=font)
    return im


def _save(arr: np.ndarray, path: Path, fmt: str, rng: np.random.Generator) -> None:
    im = Image.fromarray(arr, mode="L")
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 0.8))))
    if rng.random() < 0.55:
        im = _annotate(im, rng)
    # Many real files are RGB with equal channels; readers must handle both.
    if rng.random() < 0.35:
        im = im.convert("RGB")
    if fmt == "jpeg":
        im.save(path, format="JPEG", quality=int(rng.integers(72, 96)))
    else:
        im.save(path, format="PNG")


def _read_counts_csv(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"folder", "images"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs 'folder' and 'images' columns")
        for row in reader:
            counts[row["folder"]] = int(row["images"])
    if not counts:
        raise ValueError(f"{path}: no folders listed")
    return counts


def _folder_seed(folder: str) -> int:
    # A stable per-folder seed component that does not depend on which folders are drawn.
    return zlib.crc32(folder.encode("utf-8"))


def synthesize(
    out: Path,
    *,
    per_folder: int | None = 30,
    real_counts_scale: float | None = None,
    seed: int = 0,
    image_size_range: tuple[int, int] = (96, 160),
    formats: Sequence[str] = ("jpeg", "png"),
    folders_csv: Path | None = None,
    folders: Sequence[str] | None = None,
    on_progress: ProgressCallback | None = None,
) -> SynthSummary:
    """Write a synthetic data set in the 44c layout under ``out`` and say what was written.

    ``real_counts_scale`` (when given) overrides ``per_folder``: each folder gets
    ``max(1, round(real_count * scale))`` images. ``folders_csv`` (columns ``folder`` and
    ``images``, like ``shared/kaggle44c-folders.csv``) replaces the embedded names and counts;
    ``folders`` restricts the output to some of the folders (handy for small tests).
    ``on_progress(done, total)`` is called after each image.
    """
    out = Path(out)
    counts_source = _read_counts_csv(Path(folders_csv)) if folders_csv else dict(REAL_COUNTS)
    if folders is not None:
        missing = [f for f in folders if f not in counts_source]
        if missing:
            raise ValueError(f"unknown folder(s) for synthesis: {missing}")
        counts_source = {f: counts_source[f] for f in folders}
    if real_counts_scale is not None:
        if real_counts_scale <= 0:
            raise ValueError(f"real_counts_scale must be > 0, not {real_counts_scale}")
        plan = {f: max(1, round(n * real_counts_scale)) for f, n in counts_source.items()}
    elif per_folder is not None:
        if per_folder < 0:
            raise ValueError(f"per_folder must be >= 0, not {per_folder}")
        plan = dict.fromkeys(counts_source, per_folder)
    else:
        raise ValueError("give per_folder or real_counts_scale")
    lo, hi = image_size_range
    if not 16 <= lo <= hi:
        raise ValueError(f"image_size_range must satisfy 16 <= min <= max, not {image_size_range}")
    fmts = tuple(formats)
    bad = [f for f in fmts if f not in _FORMAT_SUFFIXES]
    if not fmts or bad:
        raise ValueError(f"formats must be a non-empty subset of {tuple(_FORMAT_SUFFIXES)}")

    labels: dict[str, tuple[str, str]] = {}
    for folder in plan:
        parsed = parse_folder_name(folder)
        if parsed is None:
            raise ValueError(f"folder {folder!r} names no known class")
        labels[folder] = (parsed.cls, parsed.sequence or "T1")

    total = sum(plan.values())
    done = 0
    out.mkdir(parents=True, exist_ok=True)
    for folder, n in plan.items():
        cls, sequence = labels[folder]
        folder_dir = out / folder
        folder_dir.mkdir(exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, _folder_seed(folder), i])
            arr = render_slice(cls, sequence, rng, size_range=(lo, hi))
            fmt = fmts[int(rng.integers(len(fmts)))]
            suffixes = _FORMAT_SUFFIXES[fmt]
            suffix = suffixes[int(rng.integers(len(suffixes)))]
            tag = _NAME_TAGS[int(rng.integers(len(_NAME_TAGS)))]
            _save(arr, folder_dir / f"{i:03d}_{tag}{suffix}", fmt, rng)
            done += 1
            if on_progress is not None:
                on_progress(done, total)
    return SynthSummary(out=out, n_images=total, counts=MappingProxyType(plan), seed=seed)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m core.synth",
        description="Write a synthetic brain-MRI data set in the Kaggle 44c folder layout.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--per-folder", type=int, default=30,
                        help="images per folder (default 30)")
    amount.add_argument("--real-counts", type=float, metavar="SCALE", default=None,
                        help="use the real per-folder counts times SCALE instead")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size-min", type=int, default=96, help="smallest image side (default 96)")
    p.add_argument("--size-max", type=int, default=160, help="largest image side (default 160)")
    p.add_argument("--formats", default="jpeg,png",
                   help="comma-separated formats among jpeg,png (default jpeg,png)")
    p.add_argument("--folders-csv", type=Path, default=None,
                   help="CSV with 'folder' and 'images' columns replacing the embedded list")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    args = _build_parser().parse_args(argv)
    with tqdm(unit="img", desc="synthesizing") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        summary = synthesize(
            args.out,
            per_folder=args.per_folder,
            real_counts_scale=args.real_counts,
            seed=args.seed,
            image_size_range=(args.size_min, args.size_max),
            formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
            folders_csv=args.folders_csv,
            on_progress=progress,
        )
    print(f"wrote {summary.n_images} images in {len(summary.counts)} folders to {summary.out}")
    for folder, n in summary.counts.items():
        print(f"  {folder:<24} {n:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
