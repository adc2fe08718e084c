"""Atomic file writes: a reader (an API download, a resume after a crash) sees the old file
or the new one, never half of one.

The data goes to a temporary sibling (same folder, so ``os.replace`` is a rename on one file
system), is fsynced and then replaces the target. A failed write removes the temporary (a
full disk stays full otherwise), and its ``OSError`` names the target file: ENOSPC names
none, and the temporary's name means nothing to the user.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomically", "write_text_atomically"]


@contextmanager
def atomic_path(path: Path | str, *, what: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block
    succeeds and is removed when it fails.

    The temporary keeps the target's suffix (``.best.pt.x1y2.partial.pt``) for writers that
    pick the format from it, and starts with a dot so folder walks skip it. An ``OSError``
    becomes ``OSError(errno, "cannot write <what> (<reason>)", <path>)``; ``what`` defaults
    to the file's name.
    """
    target = Path(path)
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".partial{target.suffix}", dir=target.parent
        )
    except OSError as exc:
        raise _naming_target(exc, target, what) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _naming_target(exc, target, what) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path | str, data: bytes, *, what: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path, what=what) as tmp:
        tmp.write_bytes(data)


def write_text_atomically(path: Path | str, text: str, *, what: str | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path, what=what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fsync(path: Path) -> None:
    # Without it a host crash right after the rename can leave an empty file under the real
    # name on ext4/xfs: the rename reached the journal before the data reached the disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _naming_target(exc: OSError, target: Path, what: str | None) -> OSError:
    reason = exc.strerror or str(exc)
    return OSError(exc.errno, f"cannot write {what or target.name} ({reason})", str(target))
