"""Opening an input file so that what is read is what was checked.

A path accepted at submission may change before a worker reads it: a file replaced by a
symbolic link to ``/etc/passwd``, a folder on its path swapped for a link, or a FIFO put in
its place. :func:`open_input` therefore judges the path again when it is opened and opens
it so that no swap after that judgement can be followed:

- with ``roots`` the path is resolved (symlinks inside the roots that stay inside them are
  legitimate), refused when the result lies outside every root, and then opened one
  component at a time from the root's descriptor with ``O_NOFOLLOW``: a component that
  became a symbolic link after the resolution fails to open instead of being followed;
- always non-blocking (``open`` on a FIFO otherwise waits for a writer for ever) and only
  regular files are returned, judged on the opened descriptor (``fstat``), not on the name.

Refusals are :class:`~core.errors.ImageReadError` subclasses whose reason never names the
target of a link: where a link points outside the roots is itself information about the
host.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from core.errors import (
    ImageReadError,
    NotAFileError,
    OutsideDataRootsError,
    UnreadableFileError,
)

__all__ = ["OUTSIDE_ROOTS_REASON", "leads_inside", "open_input", "resolve_roots"]

OUTSIDE_ROOTS_REASON = "leads outside the data roots"

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NOCTTY: opening a terminal device must never make it this process's controlling tty.
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC | getattr(os, "O_NOCTTY", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

_KINDS: tuple[tuple[int, str], ...] = (
    (stat.S_IFIFO, "FIFO"),
    (stat.S_IFCHR, "character device"),
    (stat.S_IFBLK, "block device"),
    (stat.S_IFSOCK, "socket"),
)


def resolve_roots(roots: Sequence[Path | str]) -> tuple[str, ...]:
    """The roots with every symlink resolved, as absolute path strings.

    Cached per process: the roots are the operator's folders, resolved for every file
    opened (a third of open_input's cost uncached), and they do not move under a worker.
    """
    return _resolve_roots(tuple(os.fspath(r) for r in roots))


@functools.lru_cache(maxsize=64)
def _resolve_roots(roots: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(os.path.realpath(os.path.expanduser(r)) for r in roots)


def leads_inside(path: Path | str, roots: Sequence[Path | str]) -> bool:
    """True when ``path``, every symlink resolved, is one of ``roots`` or below one."""
    resolved = os.path.realpath(os.path.abspath(os.fspath(path)))
    return _containing_root(resolved, resolve_roots(roots)) is not None


def open_input(
    path: Path | str, *, roots: Sequence[Path | str] | None = None
) -> io.BufferedReader:
    """Open ``path`` for reading and return a binary file object positioned at 0.

    ``roots=None`` means no confinement (``python -m core.predict``): symlinks are followed
    as usual, but the non-blocking open and the regular-file check still apply. Raises
    :class:`OutsideDataRootsError` ("leads outside the data roots"), :class:`NotAFileError`
    (a directory, or "not a regular file (FIFO)" and the like) and
    :class:`UnreadableFileError` (missing, permission denied, swapped while opening).
    """
    p = Path(path)
    if roots is None:
        try:
            fd = os.open(p, _FILE_FLAGS)
        except OSError as exc:
            raise _open_error(p, exc) from None
    else:
        fd = _open_confined(p, resolve_roots(roots))
    try:
        _check_regular(p, os.fstat(fd))
        return io.BufferedReader(io.FileIO(fd, "rb", closefd=True))
    except BaseException:
        os.close(fd)
        raise


def _containing_root(resolved: str, roots: Sequence[str]) -> str | None:
    for root in roots:
        if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
            return root
    return None


def _open_confined(p: Path, roots: Sequence[str]) -> int:
    try:
        resolved = os.path.realpath(os.path.abspath(p))
    except (OSError, ValueError) as exc:
        raise UnreadableFileError(p, f"cannot resolve path: {exc}") from None
    root = _containing_root(resolved, roots)
    if root is None:
        raise OutsideDataRootsError(p, OUTSIDE_ROOTS_REASON)
    parts = [part for part in resolved[len(root):].split("/") if part]
    if not parts:
        raise NotAFileError(p, "is a directory, not an image file")
    try:
        dir_fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise UnreadableFileError(p, f"cannot open its data root: {exc.strerror}") from None
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                raise _component_error(p, exc) from None
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            return os.open(parts[-1], _FILE_FLAGS | _NOFOLLOW, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP and not _is_loop(resolved):
                # Resolution left no link here, so one was swapped in since: not followed.
                raise UnreadableFileError(
                    p, "was replaced by a symbolic link while being opened; not followed"
                ) from None
            raise _open_error(p, exc) from None
    finally:
        os.close(dir_fd)


def _is_loop(resolved: str) -> bool:
    # realpath() stops at a link loop and hands the looping name back unresolved.
    try:
        os.stat(resolved)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _component_error(p: Path, exc: OSError) -> ImageReadError:
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        # Every folder was a real folder when resolved; a link or file there now is a swap.
        return UnreadableFileError(
            p, "a folder on its path was replaced (by a symbolic link or a file) while "
            "being opened"
        )
    return _open_error(p, exc)


def _open_error(p: Path, exc: OSError) -> ImageReadError:
    if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
        return UnreadableFileError(p, "permission denied")
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(p):  # ls shows it, so "not found" alone would be confusing
            return UnreadableFileError(
                p, "file not found: broken symbolic link (its target does not exist)"
            )
        return UnreadableFileError(p, "file not found")
    if exc.errno == errno.ENXIO:  # open() on a UNIX socket
        return NotAFileError(p, "not a regular file (socket)")
    if exc.errno == errno.ELOOP:
        return UnreadableFileError(p, "symbolic link loop (too many levels of symbolic links)")
    if isinstance(exc, IsADirectoryError):
        return NotAFileError(p, "is a directory, not an image file")
    return UnreadableFileError(p, f"cannot open file: {exc.strerror or exc}")


def _check_regular(p: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise NotAFileError(p, "is a directory, not an image file")
    kind = next((name for bits, name in _KINDS if stat.S_IFMT(st.st_mode) == bits), "special")
    raise NotAFileError(p, f"not a regular file ({kind})")
