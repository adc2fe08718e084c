"""Confinement of user-supplied input paths to the configured data roots.

The API runs with the server's file permissions, so a submitted path must not reach outside
the folders the operator allowed (``MRIQ_DATA_ROOTS``): ``..`` segments, absolute paths and
symlinks pointing elsewhere are all resolved before the check.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["InvalidPathError", "PathOutsideRootsError", "confine", "is_inside"]

#: Longer paths are refused outright (PATH_MAX on Linux is 4096).
MAX_PATH_LENGTH = 4096


class InvalidPathError(ValueError):
    """A submitted path that cannot be accepted; ``str()`` names the path and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path!r}: {reason}")


class PathOutsideRootsError(InvalidPathError):
    """The path (after resolving ``..`` and symlinks) lies outside every allowed root."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        roots: Sequence[Path],
        resolved: Path | None = None,
    ) -> None:
        self.roots = tuple(roots)
        self.resolved = resolved
        shown_roots = ", ".join(str(root) for root in self.roots) or "(none configured)"
        via = (
            f" (resolves to {resolved})"
            if resolved is not None and str(resolved) != os.fspath(path)
            else ""
        )
        super().__init__(
            path,
            f"outside the allowed data roots{via}; allowed: {shown_roots} "
            "(set MRIQ_DATA_ROOTS to change them)",
        )


def _resolve(path: Path) -> Path:
    # resolve() follows every symlink that exists, so a link inside a root that points out of
    # it is judged by its target; strict=False accepts paths that do not exist (yet).
    return path.expanduser().resolve(strict=False)


def is_inside(path: Path, roots: Sequence[Path]) -> bool:
    """True if the already-resolved ``path`` is one of, or below one of, the resolved roots."""
    return any(path.is_relative_to(_resolve(Path(root))) for root in roots)


def confine(path: str | os.PathLike[str], roots: Sequence[Path]) -> Path:
    """Return ``path`` resolved (``~`` expanded, symlinks followed, made absolute against the
    working directory) if it lies inside one of ``roots``, else raise.

    Raises :class:`InvalidPathError` for empty paths, NUL bytes, control characters or
    over-long paths, and :class:`PathOutsideRootsError` (a subclass) when the resolved path is
    outside every root. Existence is not checked here: reading the file reports that.
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidPathError(repr(text), "path must be text, not bytes")
    if not text.strip():
        raise InvalidPathError(text, "empty path")
    if "\x00" in text:
        raise InvalidPathError(text, "path contains a NUL byte")
    if any(ord(ch) < 32 for ch in text):
        # Newlines and other control characters break list files, CSV exports and logs.
        raise InvalidPathError(text, "path contains a control character")
    if len(text) > MAX_PATH_LENGTH:
        raise InvalidPathError(text[:80] + "...", f"path longer than {MAX_PATH_LENGTH} characters")
    try:
        resolved = _resolve(Path(text))
    except (OSError, RuntimeError) as exc:
        # RuntimeError: a symlink loop (Python 3.11) or an unknown user in "~user".
        raise InvalidPathError(text, f"cannot resolve path: {exc}") from exc
    if not is_inside(resolved, roots):
        raise PathOutsideRootsError(text, roots, resolved)
    return resolved
