"""Typed errors for input files that cannot be turned into an image.

Every error names the file and the reason, so a batch job can record one line per bad
file (``str(err) == "<path>: <reason>"``) and carry on with the rest of the batch.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CorruptImageError",
    "EmptyFileError",
    "ImageReadError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "NotAFileError",
    "OutsideDataRootsError",
    "UnreadableFileError",
    "UnsupportedFormatError",
]


class ImageReadError(Exception):
    """A file could not be read as an image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(path, reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    # Exceptions must survive pickling: DataLoader workers and Celery send them across
    # processes, and the default reduce would call __init__ with the wrong arguments.
    def __reduce__(self) -> tuple[type[ImageReadError], tuple[Path, str]]:
        return (type(self), (self.path, self.reason))


class EmptyFileError(ImageReadError):
    """The file has zero bytes."""


class UnsupportedFormatError(ImageReadError):
    """The file is readable but not in a format this system decodes."""


class CorruptImageError(ImageReadError):
    """The file claims a supported format but its data is damaged or truncated."""


class ImageTooLargeError(ImageReadError):
    """The image's declared size exceeds the pixel budget (decompression-bomb guard)."""


class ImageTooSmallError(ImageReadError):
    """The image is too small to hold a usable brain slice."""


class NotAFileError(ImageReadError):
    """The path exists but is not a regular file (a directory, for example)."""


class UnreadableFileError(ImageReadError):
    """The file exists but cannot be opened (missing, permission denied, I/O error)."""


class OutsideDataRootsError(ImageReadError):
    """The path leads (through a symbolic link) outside the data roots it was confined to;
    the reason never names where it leads."""
