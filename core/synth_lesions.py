"""The painting of :mod:`core.synth`'s slices: the brain canvas and the lesion patterns.

``Canvas`` holds a slice in brain coordinates, ``draw_brain`` paints the head and
``draw_lesion`` the pattern of one of the 14 tumour classes (see :mod:`core.synth` for why
the patterns look as they do). Every draw comes from the canvas' own generator, in a fixed
order, so an image depends only on its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
from PIL import Image

__all__ = ["TISSUE", "Canvas", "draw_brain", "draw_lesion"]

# --------------------------------------------------------------------------- contrast

# Tissue intensities per sequence, roughly as they look on real scans (fluid dark on T1,
# bright on T2; white matter brighter than grey matter on T1, darker on T2).
TISSUE: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "T1": {"fat": 0.85, "bone": 0.07, "gm": 0.45, "wm": 0.62, "csf": 0.10,
               "lesion": 0.26, "fluid": 0.08, "edema": 0.36, "calc": 0.02, "menin": 0.57},
        "T1C+": {"fat": 0.85, "bone": 0.07, "gm": 0.45, "wm": 0.62, "csf": 0.10,
                 "lesion": 0.26, "fluid": 0.08, "edema": 0.36, "calc": 0.02, "menin": 0.57},
        "T2": {"fat": 0.60, "bone": 0.06, "gm": 0.55, "wm": 0.38, "csf": 0.92,
               "lesion": 0.76, "fluid": 0.95, "edema": 0.72, "calc": 0.02, "menin": 0.62},
    }
)


class Canvas:
    """A slice being painted in brain coordinates: (u, v) is the unit circle of the brain,
    u to the image right, v downwards (v < 0 is anterior/top)."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, sequence: str) -> None:
        self.rng = rng
        self.sequence = sequence
        self.tissue = {k: float(np.clip(x + rng.normal(0.0, 0.025), 0.0, 1.0))
                       for k, x in TISSUE[sequence].items()}
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

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

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


def draw_brain(cv: Canvas, *, ventricle_scale: float = 1.0) -> None:
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


def _astrocitoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    # Single ill-defined, non-enhancing lateral mass, mid-height.
    r = 0.21 * k
    cv.solid(s * u(0.35, 0.48), u(-0.1, 0.15), r, 0.12, rv=r * u(0.8, 1.2),
             soft=0.4, wobble=0.12)


def _carcinoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    rng = cv.rng
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


def _ependimoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    rng = cv.rng
    t = cv.tissue
    # Vertically elongated midline mass low in the ventricular system, with small cysts.
    cu, cvv = u(-0.04, 0.04), u(0.22, 0.36)
    cv.solid(cu, cvv, 0.09 * k, 0.5, rv=0.27 * k, soft=0.15, wobble=0.05)
    for _ in range(int(rng.integers(2, 4))):
        cv.paint(cv.blob(cu + u(-0.04, 0.04), cvv + u(-0.15, 0.15), 0.03), t["fluid"])


def _ganglioglioma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    t = cv.tissue
    # Lateral temporal cyst with a brightly enhancing mural nodule on its outer wall.
    cu, cvv, r = s * u(0.45, 0.58), u(0.15, 0.38), 0.16 * k
    cv.paint(cv.blob(cu, cvv, r, soft=0.08), t["fluid"])
    cv.solid(cu + s * r * 0.85, cvv - r * 0.3, 0.07 * k, 1.0, soft=0.12)


def _germinoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    # Bifocal midline germinoma: pineal plus suprasellar, both small, solid, enhancing.
    cv.solid(u(-0.02, 0.02), u(0.05, 0.16), 0.085 * k, 1.0, soft=0.12)
    cv.solid(u(-0.02, 0.02), u(-0.36, -0.26), 0.075 * k, 1.0, soft=0.12)


def _glioblastoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    # Large, irregular, thick-walled ring with necrosis and surrounding oedema.
    r = 0.27 * k
    cv.ring(s * u(0.22, 0.38), u(-0.35, 0.0), r, wall=0.38, wobble=0.14, edema=1.45,
            enhancement=0.85)


def _granuloma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    t = cv.tissue
    # One small anterior ring lesion with a calcified (dark) centre.
    cu, cvv = s * u(0.35, 0.55), u(-0.62, -0.38)
    r = 0.12 * k
    cv.ring(cu, cvv, r, wall=0.4, edema=1.8)
    cv.paint(cv.blob(cu, cvv, r * 0.4, soft=0.15), t["calc"])


def _meduloblastoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    t = cv.tissue
    # Posterior-fossa midline solid mass with hydrocephalus (drawn with the brain).
    cu, cvv = u(-0.05, 0.05), u(0.6, 0.7)
    cv.solid(cu, cvv, 0.16 * k, 0.6, rv=0.14 * k, soft=0.12, wobble=0.06)
    cv.paint(cv.blob(cu + u(-0.05, 0.05), cvv, 0.04), t["fluid"])


def _meningioma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    t = cv.tissue
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


def _neurocitoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    rng = cv.rng
    t = cv.tissue
    # Intraventricular lobulated mass with a "soap bubble" of small cysts.
    cu, cvv, r = s * u(0.06, 0.14), u(-0.18, -0.02), 0.17 * k
    cv.solid(cu, cvv, r, 0.45, soft=0.1, wobble=0.08)
    for _ in range(int(rng.integers(5, 9))):
        a, d = u(0, 2 * math.pi), u(0.0, 0.7) * r
        cv.paint(cv.blob(cu + d * math.cos(a), cvv + d * math.sin(a), u(0.035, 0.05),
                         soft=0.15), t["fluid"])


def _oligodendroglioma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    rng = cv.rng
    t = cv.tissue
    # Frontal cortical mass with coarse dark calcification specks.
    cu, cvv, r = s * u(0.2, 0.42), u(-0.68, -0.55), 0.19 * k
    cv.solid(cu, cvv, r, 0.2, rv=r * 0.8, soft=0.25, wobble=0.15)
    for _ in range(int(rng.integers(5, 9))):
        a, d = u(0, 2 * math.pi), u(0.0, 0.7) * r
        cv.paint(cv.blob(cu + d * math.cos(a), cvv + 0.8 * d * math.sin(a), u(0.03, 0.045),
                         soft=0.2), t["calc"])


def _papiloma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    rng = cv.rng
    t = cv.tissue
    # Choroid plexus papilloma: cauliflower cluster of enhancing fronds in a dilated
    # ventricular atrium.
    cu, cvv = s * u(0.2, 0.3), u(0.08, 0.25)
    cv.paint(cv.blob(cu, cvv, 0.19 * k, soft=0.12), t["csf"])
    for _ in range(int(rng.integers(8, 13))):
        a, d = u(0, 2 * math.pi), u(0.0, 0.1) * k
        cv.solid(cu + d * math.cos(a), cvv + d * math.sin(a), u(0.035, 0.055), 1.0,
                 soft=0.2)


def _schwannoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    rng = cv.rng
    t = cv.tissue
    # Cerebellopontine-angle "ice cream cone": round mass plus a tapered extension into
    # the internal auditory canal (towards the lateral skull).
    cu, cvv, r = s * u(0.32, 0.42), u(0.55, 0.68), 0.12 * k
    cv.solid(cu, cvv, r, 0.85, rv=r * 0.9, soft=0.1)
    cv.solid(cu + s * r * 1.4, cvv - 0.03, r * 0.75, 0.85, rv=r * 0.3, angle=-s * 0.2,
             soft=0.15)
    if rng.random() < 0.4:
        cv.paint(cv.blob(cu, cvv, r * 0.35), t["fluid"])


def _tuberculoma(cv: Canvas, s: float, k: float) -> None:
    u = cv.uniform
    rng = cv.rng
    # Conglomerate of 3-4 "target" ring lesions touching each other, little oedema.
    a, rad = u(0, 2 * math.pi), math.sqrt(u(0.0, 0.2))
    ccu, ccv = rad * math.cos(a), rad * math.sin(a)
    n = int(rng.integers(3, 5))
    for i in range(n):
        b = a + 2 * math.pi * i / n + u(-0.25, 0.25)
        cv.ring(ccu + 0.16 * math.cos(b), ccv + 0.16 * math.sin(b), u(0.1, 0.12) * k,
                wall=0.4, core="caseous")


_LESIONS: Mapping[str, Callable[[Canvas, float, float], None]] = MappingProxyType(
    {
        "Astrocitoma": _astrocitoma,
        "Carcinoma": _carcinoma,
        "Ependimoma": _ependimoma,
        "Ganglioglioma": _ganglioglioma,
        "Germinoma": _germinoma,
        "Glioblastoma": _glioblastoma,
        "Granuloma": _granuloma,
        "Meduloblastoma": _meduloblastoma,
        "Meningioma": _meningioma,
        "Neurocitoma": _neurocitoma,
        "Oligodendroglioma": _oligodendroglioma,
        "Papiloma": _papiloma,
        "Schwannoma": _schwannoma,
        "Tuberculoma": _tuberculoma,
    }
)


def draw_lesion(cv: Canvas, cls: str) -> None:
    """Paint the lesion pattern of class ``cls`` (none for "Normal") onto ``cv``."""
    # The side and the size jitter are drawn first for every class, Normal included, so
    # each image's random stream is what it always was.
    s = _mirror(cv.rng)
    k = float(cv.rng.uniform(0.85, 1.2))  # lesion size jitter
    pattern = _LESIONS.get(cls)
    if pattern is not None:
        pattern(cv, s, k)
    elif cls != "Normal":
        raise ValueError(f"no lesion pattern for class {cls!r}")
