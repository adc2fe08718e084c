"""Reviewed items written out as a dataset ``core.train`` reads (``mriq review export``).

Layout: one class folder per label, named so :func:`core.labels.parse_folder_name` reads it
back (see :func:`export_folder_name`), holding a symbolic link to (or, with ``copy``, a copy
of) each reviewed image, named ``<item id>-<file name>`` so two files called ``0001.png``
never collide; plus ``manifest.csv`` (path,label,reviewer,decided_at,source_job; ``path``
relative to the export folder). With ``base``, the image files of an existing dataset folder
are linked in too, at their relative paths (reviewed items then go to its ``train/`` split
when it has one): the folder ``mriq train --with-reviews`` trains on.

The export is built in a sibling staging folder and swapped in with renames, so a reader
never sees half an export, and re-exporting the same items gives the same folder. An
existing non-empty folder that is not an earlier export is refused, never overwritten.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.formats import IMAGE_SUFFIXES
from core.labels import CLASSES_15, CLASSES_44, parse_folder_name
from scheduler.paths import InvalidPathError, confine
from scheduler.schema import ReviewStatus

__all__ = [
    "EXPORT_MARKER",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "ExportError",
    "ExportSummary",
    "export_dataset",
    "export_folder_name",
]

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("path", "label", "reviewer", "decided_at", "source_job")
#: Present in every export: tells an earlier export (replaced) from a user's folder (refused).
EXPORT_MARKER = ".mriq-review-export"
_SPLITS = ("train", "val", "test")


class ExportError(ValueError):
    """The export cannot be written where asked; ``str()`` names the folder and why."""


@dataclass(frozen=True)
class ExportSummary:
    out_dir: Path
    manifest: Path
    written: int
    #: (source path, reason) of every reviewed item not exported.
    skipped: tuple[tuple[str, str], ...]
    per_label: tuple[tuple[str, int], ...]
    #: Image files linked in from ``base``.
    base_files: int = 0


@dataclass(frozen=True)
class ReviewedItem:
    """The current decision on an item: the label a retrained model learns for its file."""

    review_id: int
    item_id: int
    job_id: int
    path: str
    label: str
    decision: ReviewStatus
    reviewer: str
    decided_at: datetime


def export_folder_name(label: str, source: str | Path) -> str | None:
    """The class folder a reviewed image goes to; None when the label names no class.

    A 44-class label (``"Glioma T1C+"``) is its own folder. A 15-class label keeps the MRI
    sequence of the source file's folder when that folder's name has one (an image from
    ``.../Glioblastoma T2/`` relabelled Meningioma goes to ``Meningioma T2``), so the export
    serves 44-label training too; otherwise it is the bare class name, which the 44-label
    mode refuses by name (MissingSequenceError) rather than being given an invented sequence.
    """
    if label in CLASSES_44:
        return label
    if label not in CLASSES_15:
        parsed = parse_folder_name(label)
        return None if parsed is None else label
    origin = parse_folder_name(Path(source).parent.name)
    if origin is not None and origin.sequence is not None:
        candidate = f"{label} {origin.sequence}"
        if candidate in CLASSES_44:
            return candidate
    return label


def _place(source: Path, target: Path, *, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(source, target)
    else:
        os.symlink(source, target)


def _check_destination(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_MARKER).exists():
        raise ExportError(
            f"{out_dir}: folder is not empty and is not an earlier review export; "
            "choose a new or empty folder"
        )


def _link_base(base: Path, staging: Path, roots: Sequence[Path], *, copy: bool) -> int:
    base = confine(base, roots)
    if not base.is_dir():
        raise ExportError(f"{base}: not a folder")
    count = 0
    for dirpath, _dirs, files in os.walk(base):
        for name in sorted(files):
            source = Path(dirpath) / name
            if source.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                resolved = confine(source, roots)
            except InvalidPathError:
                continue  # a link out of the roots: scan_folder would skip it too
            _place(resolved, staging / source.relative_to(base), copy=copy)
            count += 1
    return count


def _write_manifest(path: Path, rows: Iterable[Sequence[str]]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def _swap_in(staging: Path, out_dir: Path) -> None:
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_dataset(
    items: Iterable[ReviewedItem],
    out_dir: Path,
    *,
    roots: Sequence[Path],
    copy: bool = False,
    base: Path | None = None,
) -> ExportSummary:
    """Write ``items`` (from :func:`scheduler.review.reviewed_items`) to ``out_dir``.

    Sources must lie inside ``roots`` (resolved, like every input path); missing files and
    files outside are skipped and listed in the summary. Links point at the resolved file.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    _check_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        (staging / EXPORT_MARKER).write_text("written by mriq review export\n")
        base_files = 0
        prefix = Path()
        if base is not None:
            base_files = _link_base(Path(base), staging, roots, copy=copy)
            if (staging / "train").is_dir():
                prefix = Path("train")
        rows: list[tuple[str, str, str, str, str]] = []
        skipped: list[tuple[str, str]] = []
        per_label: dict[str, int] = {}
        for item in sorted(items, key=lambda i: i.item_id):
            folder = export_folder_name(item.label, item.path)
            if folder is None:
                skipped.append((item.path, f"label {item.label!r} names no class folder"))
                continue
            try:
                source = confine(Path(item.path), roots)
            except InvalidPathError as exc:
                skipped.append((item.path, exc.reason))
                continue
            if not source.is_file():
                skipped.append((item.path, "file missing"))
                continue
            relative = prefix / folder / f"{item.item_id}-{source.name}"
            _place(source, staging / relative, copy=copy)
            rows.append((relative.as_posix(), item.label, item.reviewer,
                         item.decided_at.isoformat(), str(item.job_id)))
            per_label[item.label] = per_label.get(item.label, 0) + 1
        _write_manifest(staging / MANIFEST_NAME, rows)
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportSummary(
        out_dir=out_dir, manifest=out_dir / MANIFEST_NAME, written=len(rows),
        skipped=tuple(skipped), per_label=tuple(sorted(per_label.items())),
        base_files=base_files,
    )
