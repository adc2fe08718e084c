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
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from core.labels import CLASSES_15, parse_folder_name
from core.synth_lesions import TISSUE, Canvas, draw_brain, draw_lesion

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
    if sequence not in TISSUE:
        raise ValueError(f"unknown sequence {sequence!r}")
    lo, hi = size_range
    width = int(rng.integers(lo, hi + 1))
    height = int(np.clip(round(width * rng.uniform(0.88, 1.14)), lo, hi))
    cv = Canvas(height, width, rng, sequence)
    draw_brain(cv, ventricle_scale=1.45 if cls == "Meduloblastoma" else 1.0)
    # Tissue texture: only inside the head, so the background stays dark.
    head = cv.r < 1.08
    texture = 0.07 * cv.noise_field(6) + 0.035 * cv.noise_field(max(8, width // 6))
    cv.img = np.where(head, cv.img * (1.0 + texture), cv.img)
    draw_lesion(cv, cls)
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
