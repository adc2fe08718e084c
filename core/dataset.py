"""Finding labelled images on disk, splitting them without leakage, and feeding them to torch.

Layouts understood by :func:`scan_folder` (class folders are mapped by
:func:`core.labels.parse_folder_name`):

- the Kaggle 44c layout: ``<root>/<Class> T1|T1C+|T2/`` and ``<root>/_NORMAL T1|T2/``;
- a plain 15-folder layout: ``<root>/<Class>/``;
- hand-merged copies with odd case, trailing spaces, ``Normal`` / ``_NORMAL`` / ``NORMAL``;
- any of these one level below ``<root>/train``, ``<root>/val`` and ``<root>/test``.

Splits are made over groups of near-duplicate images (close perceptual hashes) rather than over
single images: the public set holds re-encoded copies and neighbouring slices of one patient,
and a copy on each side of a split inflates test scores.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from core.errors import ImageReadError, OutsideDataRootsError
from core.imaging import is_image_path, read_image
from core.labels import (
    LabelMode,
    UnknownFolderError,
    as_label_mode,
    classes_for,
    label_index,
    parse_folder_name,
)
from core.near_duplicates import NEAR_DUPLICATE_DISTANCE, group_near_duplicates, perceptual_hash
from core.safefile import OUTSIDE_ROOTS_REASON, leads_inside
from core.transforms import TrainPreset

__all__ = [
    "SPLIT_DIR_NAMES",
    "ImageDataset",
    "MissingSequenceError",
    "Sample",
    "SplitSamples",
    "class_counts",
    "class_weights",
    "format_class_table",
    "load_splits",
    "make_weighted_sampler",
    "scan_folder",
    "split_samples",
]

WarningCallback = Callable[[str], None]
Transform = Callable[..., torch.Tensor]

# Accepted spellings of split folders, mapped to the split they hold.
SPLIT_DIR_NAMES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class Sample:
    """One labelled image: ``label`` indexes ``classes_for(mode)``; ``folder`` is the class
    folder's name as found on disk (untrimmed, so messages point at the real folder)."""

    path: Path
    label: int
    folder: str


@dataclass(frozen=True)
class SplitSamples:
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]


class MissingSequenceError(ValueError):
    """A 44-label scan met class folders that carry no (valid) MRI sequence in their name."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        listed = ", ".join(repr(n) for n in self.names)
        super().__init__(
            f"{len(self.names)} folder(s) have no 44-class label (the 44-label mode needs "
            f"'<Class> T1|T1C+|T2' or '_NORMAL T1|T2'): {listed}. Use the 15-label mode for "
            f"folders without a sequence."
        )


# --------------------------------------------------------------------------- scanning


def _is_hidden(name: str) -> bool:
    # Finder/zip debris (".DS_Store", "._x.jpg", "__MACOSX") is never data.
    return name.startswith(".") or name == "__MACOSX"


Keep = Callable[[Path], bool]


def _keep_all(_path: Path) -> bool:
    return True


def _confined(roots: Sequence[Path | str] | None, warn: WarningCallback) -> Keep:
    """``keep(path)``: False (with a warning naming the link, not its target) for a symbolic
    link that leads outside ``roots``; a training set must not pull files from elsewhere."""
    if roots is None:
        return _keep_all

    def keep(path: Path) -> bool:
        if not os.path.islink(path) or leads_inside(path, roots):
            return True
        warn(f"{path}: skipped: a symbolic link that {OUTSIDE_ROOTS_REASON}")
        return False

    return keep


def _subdirs(folder: Path, keep: Keep = _keep_all) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name) and keep(p)),
        key=lambda p: p.name,
    )


def _image_files(folder: Path, keep: Keep = _keep_all) -> list[Path]:
    """Image files in ``folder`` and below, in a stable order (nested folders belong to it).

    Symlinked folders below ``folder`` are not descended into (``os.walk``'s default)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        base = Path(dirpath)
        found.extend(
            base / f
            for f in sorted(filenames)
            if not _is_hidden(f) and is_image_path(f) and keep(base / f)
        )
    return found


def _split_dirs(root: Path, keep: Keep = _keep_all) -> dict[str, Path]:
    """The ``train``/``val``/``test`` folders directly under ``root`` (by split)."""
    found: dict[str, Path] = {}
    for d in _subdirs(root, keep):
        split = SPLIT_DIR_NAMES.get(d.name.strip().casefold())
        if split is not None:
            if split in found:
                raise ValueError(f"{root}: two folders hold the {split} split: "
                                 f"{found[split].name!r} and {d.name!r}")
            found[split] = d
    return found


def _scan_class_dirs(
    parents: Sequence[Path], mode: LabelMode, warn: WarningCallback, keep: Keep = _keep_all
) -> tuple[dict[Path, list[Sample]], list[str], list[str]]:
    """Samples per parent folder, plus the unknown and sequence-less folder names found."""
    unknown: list[str] = []
    no_sequence: list[str] = []
    per_parent: dict[Path, list[Sample]] = {}
    for parent in parents:
        samples: list[Sample] = []
        loose = [f for f in parent.iterdir() if is_image_path(f) and f.is_file() and keep(f)]
        if loose:
            warn(f"{parent}: {len(loose)} image(s) directly in this folder are ignored "
                 f"(images must be inside class folders)")
        for d in _subdirs(parent, keep):
            parsed = parse_folder_name(d.name)
            if parsed is None:
                unknown.append(d.name)
                continue
            label = parsed.label(mode)
            if label is None:
                no_sequence.append(d.name)
                continue
            files = _image_files(d, keep)
            if not files:
                warn(f"{d}: class folder has no images")
                continue
            idx = label_index(label, mode)
            samples.extend(Sample(path=f, label=idx, folder=d.name) for f in files)
        per_parent[parent] = samples
    return per_parent, unknown, no_sequence


def _sorted_samples(samples: Iterable[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: (s.label, s.path.as_posix()))


def _scan(
    root: Path,
    *,
    mode: LabelMode | str | int,
    skip_unknown: bool,
    on_warning: WarningCallback | None,
    roots: Sequence[Path | str] | None = None,
) -> tuple[dict[str, list[Sample]] | None, list[Sample]]:
    """(samples per split when the root uses split folders else None, all samples)."""
    root = Path(root)
    label_mode = as_label_mode(mode)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")

    def warn(message: str) -> None:
        if on_warning is not None:
            on_warning(message)

    if roots is not None and not leads_inside(root, roots):
        raise OutsideDataRootsError(root, OUTSIDE_ROOTS_REASON)
    keep = _confined(roots, warn)
    splits = _split_dirs(root, keep)
    if splits:
        # Other folders beside train/val/test are not scanned; report them like unknown
        # folders rather than silently ignoring data.
        extra = [d.name for d in _subdirs(root, keep) if d not in splits.values()]
        per_parent, unknown, no_sequence = _scan_class_dirs(
            list(splits.values()), label_mode, warn, keep
        )
        unknown = [*unknown, *extra]
    else:
        per_parent, unknown, no_sequence = _scan_class_dirs([root], label_mode, warn, keep)
    if unknown:
        if not skip_unknown:
            raise UnknownFolderError(unknown)
        warn(f"{root}: skipping {len(set(unknown))} unknown folder(s): "
             + ", ".join(repr(n) for n in sorted(set(unknown))))
    if no_sequence:
        raise MissingSequenceError(no_sequence)

    everything = _sorted_samples(s for samples in per_parent.values() for s in samples)
    if not everything:
        raise ValueError(f"{root}: no images found in any class folder")
    present = sorted({s.label for s in everything})
    if len(present) < 2:
        name = classes_for(label_mode)[present[0]]
        raise ValueError(f"{root}: a classifier needs at least 2 classes; found only {name!r}")
    by_split = (
        {split: _sorted_samples(per_parent[d]) for split, d in splits.items()} if splits else None
    )
    return by_split, everything


def scan_folder(
    root: Path,
    *,
    mode: LabelMode | str | int,
    skip_unknown: bool = False,
    on_warning: WarningCallback | None = None,
    roots: Sequence[Path | str] | None = None,
) -> list[Sample]:
    """Every labelled image under ``root``, sorted by (label, path).

    With ``roots``, class folders and files that are symbolic links leading outside them
    are skipped (``on_warning`` names each) and ``root`` itself must resolve inside them
    (else :class:`~core.errors.OutsideDataRootsError`).

    Raises :class:`~core.labels.UnknownFolderError` listing every folder that names no class
    (unless ``skip_unknown``: then ``on_warning`` is told), :class:`MissingSequenceError` in
    the 44-label mode for folders without a sequence, and ``ValueError`` when there are no
    images or fewer than 2 classes. Empty class folders are reported through ``on_warning``.
    """
    return _scan(
        root, mode=mode, skip_unknown=skip_unknown, on_warning=on_warning, roots=roots
    )[1]


# --------------------------------------------------------------------------- splitting


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError("val_fraction and test_fraction must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must be < 1 (training needs data)")


def split_samples(
    samples: Sequence[Sample],
    *,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    max_hash_distance: int = NEAR_DUPLICATE_DISTANCE,
    hash_fn: Callable[[Path], int] = perceptual_hash,
    on_warning: WarningCallback | None = None,
) -> SplitSamples:
    """Stratified train/val/test split over near-duplicate groups, deterministic for ``seed``.

    Images whose perceptual hashes differ in at most ``max_hash_distance`` bits (0: equal
    hashes only) form a group that always lands in one split. Groups are stratified by class
    (a group's class is its most common label); within a class they are shuffled with a
    per-(seed, class) generator and the val/test splits take groups until they hold their
    fraction of the class's images.
    A class with >= 3 groups gets at least one group in each non-zero split; with 2 groups,
    one goes to val (test when ``val_fraction`` is 0); with 1, it trains. Files that cannot
    be hashed are kept as their own group (they fail later, with their name, when read).
    """
    _check_fractions(val_fraction, test_fraction)
    items = list(samples)
    if not items:
        raise ValueError("cannot split an empty sample list")
    hashes: list[int | None] = []
    for s in items:
        try:
            hashes.append(hash_fn(s.path))
        except ImageReadError as exc:
            hashes.append(None)
            if on_warning is not None:
                on_warning(f"cannot hash {exc}")
    group_of = group_near_duplicates(hashes, max_distance=max_hash_distance)
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s, g in zip(items, group_of, strict=True):
        groups[g].append(s)

    by_class: dict[int, list[list[Sample]]] = defaultdict(list)
    for members in groups.values():
        votes = Counter(s.label for s in members)
        label = min(votes, key=lambda lab: (-votes[lab], lab))
        by_class[label].append(sorted(members, key=lambda s: s.path.as_posix()))

    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for label in sorted(by_class):
        # Order groups canonically before shuffling so the result depends only on the
        # seed and the set of samples, not on the input order.
        class_groups = sorted(by_class[label], key=lambda g: g[0].path.as_posix())
        rng = np.random.default_rng([seed, label])
        order = [class_groups[i] for i in rng.permutation(len(class_groups))]
        n_images = sum(len(g) for g in order)
        wanted = {"test": test_fraction, "val": val_fraction}
        targets = {name: frac * n_images for name, frac in wanted.items()}
        taken: dict[str, list[Sample]] = {"test": [], "val": []}
        if len(order) >= 3:
            # One group per non-zero split first, then fill up to each fraction, always
            # leaving at least one group for training.
            for name in ("test", "val"):
                if wanted[name] > 0:
                    taken[name].extend(order.pop())
            for name in ("test", "val"):
                while order[1:] and len(taken[name]) + len(order[-1]) / 2 < targets[name]:
                    taken[name].extend(order.pop())
        elif len(order) == 2:
            name = "val" if val_fraction > 0 else ("test" if test_fraction > 0 else "")
            if name:
                taken[name].extend(order.pop())
        test.extend(taken["test"])
        val.extend(taken["val"])
        train.extend(s for g in order for s in g)
    return SplitSamples(
        train=tuple(_sorted_samples(train)),
        val=tuple(_sorted_samples(val)),
        test=tuple(_sorted_samples(test)),
    )


def load_splits(
    root: Path,
    *,
    mode: LabelMode | str | int,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    skip_unknown: bool = False,
    on_warning: WarningCallback | None = None,
    max_hash_distance: int = NEAR_DUPLICATE_DISTANCE,
    roots: Sequence[Path | str] | None = None,
) -> SplitSamples:
    """Train/val/test samples of the data set under ``root`` (``roots``: see
    :func:`scan_folder`).

    With ``train/ val/ test/`` folders those splits are used as given; a missing val or test
    folder is carved out of train with :func:`split_samples`. Otherwise the whole set is
    split with :func:`split_samples`.
    """
    by_split, everything = _scan(root, mode=mode, skip_unknown=skip_unknown,
                                 on_warning=on_warning, roots=roots)
    if by_split is None:
        return split_samples(everything, seed=seed, val_fraction=val_fraction,
                             test_fraction=test_fraction, max_hash_distance=max_hash_distance,
                             on_warning=on_warning)
    train = by_split.get("train", [])
    val = by_split.get("val")
    test = by_split.get("test")
    if not train:
        raise ValueError(f"{Path(root)}: split layout without training images (train/ folder)")
    if val is None or test is None:
        missing_val = val_fraction if val is None else 0.0
        missing_test = test_fraction if test is None else 0.0
        carved = split_samples(train, seed=seed, val_fraction=missing_val,
                               test_fraction=missing_test, max_hash_distance=max_hash_distance,
                               on_warning=on_warning)
        train = list(carved.train)
        val = list(carved.val) if val is None else val
        test = list(carved.test) if test is None else test
        if on_warning is not None:
            missing = [name for name, gone in (("val/", by_split.get("val") is None),
                                               ("test/", by_split.get("test") is None)) if gone]
            on_warning(f"{Path(root)}: no {' or '.join(missing)} folder; carved out of train/")
    return SplitSamples(train=tuple(train), val=tuple(val), test=tuple(test))


# --------------------------------------------------------------------------- torch side


def _item_seed(seed: int, epoch: int, index: int) -> int:
    # SeedSequence mixes the three numbers well; a plain sum would repeat across epochs.
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples decoded with :func:`core.imaging.read_image` and passed through ``transform``.

    A :class:`core.transforms.TrainPreset` gets a ``torch.Generator`` seeded from
    (seed, epoch, index): augmentation is reproducible and independent of DataLoader worker
    scheduling. Call :meth:`set_epoch` before each epoch (with worker processes, before the
    DataLoader iterator is created, i.e. without ``persistent_workers``). ``roots`` confines
    every read (:func:`core.imaging.read_image`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Transform,
        *,
        seed: int = 0,
        roots: Sequence[Path | str] | None = None,
    ) -> None:
        self.samples: tuple[Sample, ...] = tuple(samples)
        # Confines every read, not only the scan: files can be swapped between epochs.
        self.roots = None if roots is None else tuple(roots)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._needs_generator = isinstance(transform, TrainPreset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        # ImageReadError names the file already.
        img = read_image(sample.path, roots=self.roots)
        try:
            if self._needs_generator:
                gen = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
                tensor = self.transform(img, generator=gen)
            else:
                tensor = self.transform(img)
        except Exception as exc:
            raise RuntimeError(f"{sample.path}: transform failed: {exc}") from exc
        return tensor, sample.label


def class_counts(samples: Iterable[Sample], n_classes: int) -> list[int]:
    """Images per class index (length ``n_classes``)."""
    counts = [0] * n_classes
    for s in samples:
        if not 0 <= s.label < n_classes:
            raise ValueError(f"{s.path}: label {s.label} outside 0..{n_classes - 1}")
        counts[s.label] += 1
    return counts


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """1/count per class in class-index order; classes without images get weight 0."""
    return torch.tensor([1.0 / c if c > 0 else 0.0 for c in counts], dtype=torch.float32)


def make_weighted_sampler(
    samples: Sequence[Sample],
    n_classes: int,
    *,
    oversample: float = 2.0,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler:
    """Class-balanced sampling with replacement: each sample weighs 1/count(its class),
    and an epoch draws ``round(oversample * len(samples))`` samples."""
    if not samples:
        raise ValueError("cannot sample from an empty sample list")
    if oversample <= 0:
        raise ValueError(f"oversample must be > 0, not {oversample}")
    counts = class_counts(samples, n_classes)
    weights = [1.0 / counts[s.label] for s in samples]
    return WeightedRandomSampler(
        weights, num_samples=max(1, round(oversample * len(samples))), replacement=True,
        generator=generator,
    )


def format_class_table(splits: SplitSamples, classes: Sequence[str]) -> str:
    """A plain-text table of images per class and split, with a total row."""
    n = len(classes)
    columns = {name: class_counts(getattr(splits, name), n) for name in ("train", "val", "test")}
    header = ("class", "train", "val", "test", "total")
    rows: list[tuple[Any, ...]] = []
    for i, name in enumerate(classes):
        per = [columns[c][i] for c in ("train", "val", "test")]
        rows.append((name, *per, sum(per)))
    totals = [sum(columns[c]) for c in ("train", "val", "test")]
    rows.append(("TOTAL", *totals, sum(totals)))
    width = max(len(header[0]), *(len(str(r[0])) for r in rows))
    lines = [f"{header[0]:<{width}}" + "".join(f" {h:>6}" for h in header[1:])]
    lines.append("-" * len(lines[0]))
    for r in rows[:-1]:
        lines.append(f"{r[0]:<{width}}" + "".join(f" {v:>6}" for v in r[1:]))
    lines.append("-" * len(lines[0]))
    r = rows[-1]
    lines.append(f"{r[0]:<{width}}" + "".join(f" {v:>6}" for v in r[1:]))
    return "\n".join(lines)
