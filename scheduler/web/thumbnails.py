"""Images the dashboard serves: thumbnails of inputs (cached on disk) and artifact files.

Confinement is the API's: an input is read only inside ``settings.data_roots`` (through
:func:`core.imaging.read_image` with ``roots``, which re-checks every component while it
opens the file), an artifact only inside the job and model folders. Thumbnails are PNGs
under ``<data_dir>/web-cache/thumbs``, keyed by the file's resolved path, size and mtime
plus the rendering, so a replaced file gets a fresh one. Pillow and numpy only: no torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from core.cropping import crop_to_brain
from core.imaging import read_image
from scheduler.paths import InvalidPathError, PathOutsideRootsError, confine
from scheduler.pathtext import filesystem_path
from scheduler.settings import Settings

__all__ = [
    "MAX_THUMB_SIDE",
    "THUMB_SIDES",
    "FileRefusedError",
    "Rendering",
    "artifact_file",
    "thumbnail",
]

Rendering = Literal["slice", "cropped"]
#: Sizes the pages ask for; anything else is refused, so the cache stays bounded.
THUMB_SIDES: frozenset[int] = frozenset({64, 128, 512})
MAX_THUMB_SIDE = max(THUMB_SIDES)


@dataclass(frozen=True)
class FileRefusedError(Exception):
    """A file the dashboard will not serve: ``status`` 403 (outside) or 404 (missing)."""

    status: int
    reason: str

    def __str__(self) -> str:
        return self.reason


def cache_dir(settings: Settings) -> Path:
    return settings.data_dir / "web-cache" / "thumbs"


def _confined_input(settings: Settings, stored_path: str) -> Path:
    try:
        return confine(Path(filesystem_path(stored_path)), list(settings.data_roots))
    except PathOutsideRootsError:
        raise FileRefusedError(403, "the input lies outside the data roots") from None
    except InvalidPathError as exc:
        raise FileRefusedError(404, f"not a valid file path: {exc.reason}") from None


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")


def thumbnail(settings: Settings, stored_path: str, *, side: int,
              rendering: Rendering = "slice") -> Path:
    """A PNG at most ``side`` pixels a side of an input (``cropped``: what the model's
    brain crop keeps); made once, then served from the cache.

    Raises FileRefusedError (403 outside the roots, 404 missing or unreadable).
    """
    if side not in THUMB_SIDES:
        raise FileRefusedError(404, f"no thumbnail size {side}")
    path = _confined_input(settings, stored_path)
    try:
        stat = path.stat()
    except OSError:
        raise FileRefusedError(404, "the input file is gone") from None
    key = hashlib.sha256(
        f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\0{side}\0{rendering}".encode(
            "utf-8", "surrogateescape")
    ).hexdigest()
    target = cache_dir(settings) / key[:2] / f"{key}.png"
    if target.is_file():
        return target
    try:
        img = read_image(path, roots=list(settings.data_roots))
    except Exception as exc:  # ImageReadError and its kin: the reason names the problem
        raise FileRefusedError(404, f"cannot read the image: {exc}") from None
    if rendering == "cropped":
        img = crop_to_brain(img)
    picture = _to_pil(img)
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    _write_png(picture, target)
    return target


def _write_png(picture: Image.Image, target: Path) -> None:
    # Written beside and renamed: two requests for the same thumbnail never serve half a file.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            picture.save(fh, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def artifact_file(settings: Settings, stored_path: str) -> Path:
    """An artifact's file, confined to the job and model folders like the API's download
    (never the database or the broker's files that also live in the data dir)."""
    try:
        path = confine(Path(stored_path), [settings.jobs_dir, settings.models_dir])
    except PathOutsideRootsError:
        raise FileRefusedError(403, "the artifact lies outside the data folder") from None
    except InvalidPathError:
        raise FileRefusedError(404, "the artifact is not a valid file path") from None
    if not path.is_file():
        raise FileRefusedError(404, "the artifact file is missing")
    return path
