"""Synthetic data factories shared by all tests (built on :mod:`core.synth`).

Everything is small by default (48 px images, a few per folder) because the test machine has
2 cores. All factories are deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.labels import parse_folder_name
from core.synth import FOLDERS_44C, SynthSummary, render_slice, synthesize

__all__ = [
    "FOLDERS_44C",
    "SMALL_FOLDERS",
    "make_dataset",
    "make_flat_dataset",
    "make_image",
    "make_split_dataset",
    "synth_summary",
]

# Three classes in both T1 and T2: enough for stratified splits and 2+ class checks.
SMALL_FOLDERS: tuple[str, ...] = (
    "Glioblastoma T1",
    "Glioblastoma T2",
    "Meningioma T1",
    "Meningioma T2",
    "_NORMAL T1",
    "_NORMAL T2",
)


def make_dataset(
    tmp_path: Path,
    *,
    per_folder: int = 3,
    size: int | tuple[int, int] = 48,
    folders: Sequence[str] | None = None,
    seed: int = 0,
    formats: Sequence[str] = ("jpeg", "png"),
    name: str = "data",
) -> Path:
    """A Kaggle-44c-layout data set under ``tmp_path/name``; returns its root.

    ``folders`` defaults to all 44 real folder names; ``size`` is one side length or a
    (min, max) range.
    """
    return synth_summary(tmp_path, per_folder=per_folder, size=size, folders=folders, seed=seed,
                         formats=formats, name=name).out


def synth_summary(
    tmp_path: Path,
    *,
    per_folder: int = 3,
    size: int | tuple[int, int] = 48,
    folders: Sequence[str] | None = None,
    seed: int = 0,
    formats: Sequence[str] = ("jpeg", "png"),
    name: str = "data",
) -> SynthSummary:
    """Like :func:`make_dataset` but returns the :class:`~core.synth.SynthSummary`."""
    size_range = (size, size) if isinstance(size, int) else size
    return synthesize(tmp_path / name, per_folder=per_folder, seed=seed,
                      image_size_range=size_range, formats=tuple(formats), folders=folders)


def make_image(
    path: Path,
    *,
    size: int = 48,
    seed: int = 0,
    cls: str = "Normal",
    sequence: str = "T1",
) -> Path:
    """Write one synthetic slice to ``path`` (format from the suffix); returns ``path``."""
    rng = np.random.default_rng(seed)
    arr = render_slice(cls, sequence, rng, size_range=(size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return path


def make_flat_dataset(
    tmp_path: Path,
    *,
    folders: Mapping[str, int] | Sequence[str] = ("Glioblastoma", "Meningioma", "Normal"),
    per_folder: int = 3,
    size: int = 48,
    seed: int = 0,
    name: str = "flat",
    suffix: str = ".png",
) -> Path:
    """Class folders with arbitrary names (plain 15-class names, messy hand-merged names...).

    ``folders`` is a list of folder names (``per_folder`` images each) or a mapping of folder
    name to image count. Each folder's images are drawn for the class its name parses to
    (Normal for names that parse to nothing, so unknown folders can be made too).
    """
    root = tmp_path / name
    plan = dict(folders) if isinstance(folders, Mapping) else dict.fromkeys(folders, per_folder)
    for f_index, (folder, count) in enumerate(plan.items()):
        parsed = parse_folder_name(folder)
        cls = parsed.cls if parsed is not None else "Normal"
        sequence = parsed.sequence if parsed is not None and parsed.sequence else "T1"
        if cls == "Normal" and sequence == "T1C+":
            sequence = "T1"
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            make_image(root / folder / f"{i:03d}_img{suffix}", size=size,
                       seed=seed * 100_003 + f_index * 1009 + i, cls=cls, sequence=sequence)
    return root


def make_split_dataset(
    tmp_path: Path,
    *,
    per_split: Mapping[str, int] | None = None,
    folders: Sequence[str] = SMALL_FOLDERS,
    size: int = 48,
    seed: int = 0,
    name: str = "splits",
) -> Path:
    """A ``train/ val/ test/`` layout, each split holding the 44c ``folders``.

    ``per_split`` maps split folder name to images per class folder (default train 4, val 2,
    test 2); the splits use different seeds so their images differ.
    """
    plan = dict(per_split) if per_split is not None else {"train": 4, "val": 2, "test": 2}
    root = tmp_path / name
    for k, (split, n) in enumerate(plan.items()):
        synthesize(root / split, per_folder=n, seed=seed * 10 + k + 1,
                   image_size_range=(size, size), formats=("png",), folders=folders)
    return root
