"""Input expansion of a submission: what files the user's inputs name, confined and bounded.

Files, folders, globs and ``@list.txt`` files become one absolute path per item, every path
the user names confined to the data roots, within ``settings.expansion_time_limit`` seconds
and ``settings.max_paths_per_job`` items. The expansion itself is
:mod:`core.inputs`' (the one expansion of mriq); this module adds the job system's limits.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from core import inputs as core_inputs
from scheduler.paths import (
    MAX_PATH_LENGTH,
    InvalidPathError,
    PathOutsideRootsError,
    confine,
    is_inside,
)
from scheduler.pathtext import check_text, storable_path
from scheduler.refusals import (
    ExpansionTimeoutError,
    InvalidInputError,
    InvalidOptionsError,
    NoInputsError,
    TooManyInputsError,
)
from scheduler.settings import Settings

__all__ = ["data_folder", "expand_inputs", "read_spool", "spool_inputs"]

# What confine() refuses as control characters (code points below 32).
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


class _Confiner:
    """``confine`` for the many paths of one submission, at one ``lstat`` per path.

    ``confine`` resolves every component of every path (an ``lstat`` each), then the roots
    again for each path, then ``stat``s the result: about ten system calls and a dozen
    ``Path`` objects per path, 7-9 s for a 100,000-line list. The items of a job share a few
    folders, so this resolves each folder once (cached, bounded), resolves the roots once,
    and ``lstat``s only the last component. Anything unusual (a symlink as the last
    component, a relative or odd path, an error other than "does not exist") takes the
    exact ``confine`` path, so results and refusals are the same.
    """

    _MAX_DIRS = 4096

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = list(roots)
        resolved = [str(Path(root).expanduser().resolve(strict=False)) for root in self.roots]
        self._prefixes = tuple(r if r.endswith("/") else r + "/" for r in resolved)
        self._exact = frozenset(resolved)
        self._dirs: dict[str, str] = {}
        # The last path _fast lstat'ed and whether it is a folder: is_folder answers the
        # check that follows each named path without a second stat.
        self._last: tuple[str, bool] = ("", False)

    def _inside(self, resolved: str) -> bool:
        return resolved in self._exact or resolved.startswith(self._prefixes)

    def named(self, path: Path) -> Path:
        """A path the user names, confined (``PathOutsideRootsError`` outside the roots)."""
        text = str(path)
        check_text(text, text)  # list lines: NUL bytes, absurd lengths
        fast = self._fast(text)
        if fast is None:
            return _confine_item(path, self.roots)
        return path if fast == text else Path(fast)  # most paths are already resolved

    def found(self, path: Path) -> Path:
        """A file *found* by expanding a folder or glob, confined like a named one except
        that one leading outside the roots (a stray link among 10,000 images) is kept under
        its own path: the worker's read-time check turns it into an error row ("leads
        outside the data roots") and the job goes on. Its target is neither stored nor
        shown."""
        try:
            text = str(path)
            fast = self._fast(text)
            if fast is None:
                return _confine_item(path, self.roots)
            return path if fast == text else Path(fast)
        except PathOutsideRootsError:
            return Path(os.path.abspath(path))

    def is_folder(self, path: Path) -> bool:
        """Whether ``path`` (as :meth:`named` returned it) is a folder."""
        text, is_dir = self._last
        return is_dir if text == str(path) else path.is_dir()

    def may_enter(self, link: str) -> bool:
        """Whether a glob may pass a link to a folder: only one leading inside the roots."""
        return is_inside(Path(os.path.realpath(link)), self.roots)

    def _fast(self, text: str) -> str | None:
        self._last = ("", False)
        if (
            os.sep != "/"
            or not text.startswith("/")
            or len(text) > MAX_PATH_LENGTH
            or _CONTROL_CHARS.search(text)
        ):
            return None
        head, name = os.path.split(text)
        if not head or name in ("", ".", ".."):
            return None
        real_head = self._dirs.get(head)
        if real_head is None:
            real_head = os.path.realpath(head)
            if len(self._dirs) >= self._MAX_DIRS:
                self._dirs.clear()  # bounded: memory must not grow with the list
            self._dirs[head] = real_head
        resolved = os.path.join(real_head, name)
        try:
            st = os.lstat(resolved)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                return None  # loops, permissions: let confine decide
            is_dir = False
        else:
            if stat.S_ISLNK(st.st_mode):
                return None
            is_dir = stat.S_ISDIR(st.st_mode)  # not a link: lstat is stat
        if not self._inside(resolved):
            return None  # confine raises the refusal with its usual message
        self._last = (resolved, is_dir)
        return resolved


def _confine_item(path: Path, roots: Sequence[Path]) -> Path:
    """``confine`` for one input file, except that a symlink loop inside the roots is kept
    (as its absolute path): opening it can only fail with ELOOP, so the job answers it with
    an error row instead of refusing every other input."""
    try:
        return confine(path, roots)
    except PathOutsideRootsError:
        raise
    except InvalidPathError as exc:
        if not isinstance(exc.__cause__, RuntimeError):
            raise
        lexical = Path(os.path.abspath(path))
        if is_inside(lexical, roots) and is_inside(Path(os.path.realpath(lexical)), roots):
            return lexical
        raise PathOutsideRootsError(path, roots) from None


class _Limits:
    """The time box of one expansion (``expand_inputs``)."""

    def __init__(self, time_limit: float | None) -> None:
        self.time_limit = time_limit
        self._end = None if time_limit is None else time.monotonic() + time_limit

    def tick(self) -> None:
        if self._end is not None and time.monotonic() >= self._end:
            raise ExpansionTimeoutError(float(self.time_limit or 0.0))


def _checked(inputs: Iterable[str]) -> Iterator[str]:
    """The raw inputs, each refused here when it cannot be a path."""
    for raw in inputs:
        check_text(raw[1:] if raw.startswith("@") else raw, raw)
        yield raw


def expand_inputs(
    inputs: Iterable[str],
    roots: Sequence[Path],
    *,
    time_limit: float | None = None,
    max_items: int | None = None,
) -> Iterator[str]:
    """Yield one absolute, confined path string per item, in input order.

    The expansion is :func:`core.inputs.expand_inputs` (files, folders, globs, ``@list.txt``
    and their rules) with the job system's limits on top. Raises ``PathOutsideRootsError``
    for any path the user names (list files, their lines and glob prefixes included)
    outside ``roots``; a file *found* in a folder or by a glob that leads outside them is
    yielded under its own path instead (the worker refuses it when reading: one error row,
    the job goes on). Raises ``InvalidInputError`` for strings that cannot be paths,
    :class:`ExpansionTimeoutError` past ``time_limit`` seconds, and
    :class:`TooManyInputsError` for one folder holding more than ``max_items`` images
    (the caller counts items across folders). It is a generator: callers stream it, and
    nothing is listed beyond what they take.
    """
    limits = _Limits(time_limit)
    confiner = _Confiner(roots)
    expanded = core_inputs.expand_inputs(
        _checked(inputs),
        tick=limits.tick,
        max_per_folder=max_items,
        may_enter=confiner.may_enter,
        named=confiner.named,
        found=confiner.found,
        is_folder=confiner.is_folder,
    )
    try:
        for path in expanded:
            limits.tick()
            yield str(path)
    except core_inputs.FolderTooLargeError as exc:
        raise TooManyInputsError(exc.limit) from None
    except (core_inputs.NestedListError, core_inputs.ListFileError) as exc:
        raise InvalidInputError(str(exc)) from None


def spool_inputs(inputs: Iterable[str], settings: Settings) -> tuple[IO[str], int]:
    """Expand and validate every input into a temporary file before touching the database.

    Doing the slow part (walking folders) outside the transaction keeps SQLite's write lock
    short and guarantees a refusal leaves nothing behind; the spool keeps memory flat.
    """
    limit = settings.max_paths_per_job
    spool = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115 (returned)
    count = 0
    try:
        expanded = expand_inputs(
            inputs,
            settings.data_roots,
            time_limit=settings.expansion_time_limit,
            max_items=limit,
        )
        for path in expanded:
            count += 1
            if count > limit:
                raise TooManyInputsError(limit)
            # JSON per line survives newlines inside file names; the stored form is UTF-8.
            spool.write(json.dumps(storable_path(path)))
            spool.write("\n")
        if count == 0:
            raise NoInputsError("no input files: the inputs matched no image file")
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, count


def read_spool(spool: IO[str]) -> Iterator[str]:
    for line in spool:
        yield json.loads(line)


def data_folder(data_dir: str | os.PathLike[str], roots: Sequence[Path]) -> Path:
    """The confined folder a train/evaluate job reads (its class folders are not checked)."""
    text = check_text(os.fspath(data_dir), "data")
    folder = confine(Path(text).expanduser(), roots)
    if not folder.is_dir():
        raise InvalidOptionsError(f"data: {folder}: not a directory")
    return folder
