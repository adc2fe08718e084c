"""Input expansion of a submission: what files the user's inputs name, confined and bounded.

Files, folders, globs and ``@list.txt`` files become one absolute path per item, every path
the user names confined to the data roots, within ``settings.expansion_time_limit`` seconds
and ``settings.max_paths_per_job`` items. The lazy walks and glob matching are
:mod:`scheduler.globbing`'s.
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
from typing import IO, Any

from core.formats import IMAGE_SUFFIXES
from scheduler import globbing
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

_GLOB_CHARS = frozenset("*?[")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


# What confine() refuses as control characters (code points below 32).
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


class _Confiner:
    """``confine`` for the many paths of one submission, at one ``lstat`` per path.

    ``confine`` resolves every component of every path (an ``lstat`` each), then the roots
    again for each path, then ``stat``s the result, and the caller ``stat``s it once more for
    ``is_dir``: about ten system calls and a dozen ``Path`` objects per path, 7-9 s for a
    100,000-line list. The items of a job share a few folders, so this resolves each folder
    once (cached, bounded), resolves the roots once, and ``lstat``s only the last component.
    Anything unusual (a symlink as the last component, a relative or odd path, an error
    other than "does not exist") takes the exact ``confine`` path, so results and refusals
    are the same.
    """

    _MAX_DIRS = 4096

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = list(roots)
        resolved = [str(Path(root).expanduser().resolve(strict=False)) for root in self.roots]
        self._prefixes = tuple(r if r.endswith("/") else r + "/" for r in resolved)
        self._exact = frozenset(resolved)
        self._dirs: dict[str, str] = {}

    def _inside(self, resolved: str) -> bool:
        return resolved in self._exact or resolved.startswith(self._prefixes)

    def entry(self, path: Path | str) -> tuple[str, bool]:
        """The confined path and whether it is a folder (``_confine_item`` + ``is_dir``).

        ``path`` is a ``Path`` or an absolute path string already in ``Path`` normal form
        (see :func:`_is_normal_absolute`)."""
        fast = self._fast(str(path))
        if fast is not None:
            return fast
        confined = _confine_item(Path(path), self.roots)
        return str(confined), confined.is_dir()

    def _fast(self, text: str) -> tuple[str, bool] | None:
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
            is_dir = stat.S_ISDIR(st.st_mode)
        if not self._inside(resolved):
            return None  # confine raises the refusal with its usual message
        return resolved, is_dir


def _is_normal_absolute(text: str) -> bool:
    """True when ``str(Path(text)) == text`` for this absolute path (no ``//``, ``/./``,
    trailing ``/`` or ``/.``), so building a ``Path`` to normalise it can be skipped."""
    return (
        text.startswith("/")
        and len(text) > 1
        and "//" not in text
        and "/./" not in text
        and not text.endswith(("/", "/."))
    )


def _walk_images(folder: Path, roots: Sequence[Path], limits: _Limits) -> Iterator[Path]:
    """Image files below ``folder``, depth first, sorted per directory for a stable order.

    Lazy (:func:`scheduler.globbing.walk_files`): only one directory's image names are held
    at a time, so the job limit stops the walk after limit + 1 files. Symlinked directories
    are not followed (a loop would never end); a file found here that leads outside the
    roots becomes an item of its own (:func:`_found_item`), not a refusal of the job.
    """
    for path in globbing.walk_files(str(folder), accept=_is_image, **limits.walk_options()):
        yield _found_item(Path(path), roots)


def _found_item(path: Path, roots: Sequence[Path]) -> Path:
    """A file *found* by expanding a folder or glob, confined like a named one except that
    one leading outside the roots (a stray link among 10,000 images) is kept under its own
    path: the worker's read-time check turns it into an error row ("leads outside the data
    roots") and the job goes on. Its target is neither stored nor shown."""
    try:
        return _confine_item(path, roots)
    except PathOutsideRootsError:
        return Path(os.path.abspath(path))


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


def _glob_base(pattern: str) -> str:
    """The literal directory prefix of a glob pattern (what must be inside the roots)."""
    return globbing.split_literal(pattern)[0]


class _Limits:
    """The time box and the per-folder cap of one expansion (``expand_inputs``)."""

    def __init__(self, time_limit: float | None, max_items: int | None) -> None:
        self.time_limit = time_limit
        self.max_items = max_items
        self._end = None if time_limit is None else time.monotonic() + time_limit

    def tick(self) -> None:
        if self._end is not None and time.monotonic() >= self._end:
            raise ExpansionTimeoutError(float(self.time_limit or 0.0))

    def walk_options(self) -> dict[str, Any]:
        return {"tick": self.tick, "max_per_folder": self.max_items}


def _expand_one(
    raw: str,
    roots: Sequence[Path],
    *,
    base: Path | None,
    limits: _Limits,
    confiner: _Confiner | None = None,
) -> Iterator[Path | str]:
    text = check_text(raw.strip() if base is not None else raw, raw)
    is_glob = not _GLOB_CHARS.isdisjoint(text)
    if confiner is not None and not is_glob and _is_normal_absolute(text):
        # The common case of a list line: skip building Path objects (see _Confiner).
        found, is_dir = confiner.entry(text)
        if is_dir:
            yield from _walk_images(Path(found), roots, limits)
        else:
            yield found
        return
    candidate = Path(text).expanduser()
    if base is not None and not candidate.is_absolute():
        candidate = base / candidate
    if is_glob:
        # Confine the literal prefix before listing anything, after folding ".." segments
        # (``root/**/../../etc/*`` would otherwise list /etc from a prefix inside the root).
        # Matches come lazily (scheduler.globbing: no list of every match, no symlinked
        # folders in **, no folder outside the roots ever listed); a match leading outside
        # the roots is an item of its own that the worker refuses when it reads it, so the
        # job goes on and no target is revealed.
        pattern = os.path.normpath(str(candidate))
        confine(Path(_glob_base(pattern)), roots)

        def may_enter(link: str) -> bool:
            return is_inside(Path(os.path.realpath(link)), roots)

        matches = globbing.iglob(
            pattern, accept=_is_image, may_enter=may_enter, **limits.walk_options()
        )
        for match in matches:
            path = Path(match)
            if not path.is_dir():
                yield _found_item(path, roots)
            elif is_inside(Path(os.path.realpath(path)), roots):
                yield from _walk_images(confine(path, roots), roots, limits)
            else:  # a link to a folder outside: one error row, never a listing of it
                yield Path(os.path.abspath(path))
        return
    if confiner is not None:
        found, is_dir = confiner.entry(candidate)
        path = Path(found)
    else:
        path = _confine_item(candidate, roots)
        is_dir = path.is_dir()
    if is_dir:
        yield from _walk_images(path, roots, limits)
    else:
        # Missing or unreadable files are still items: the worker turns them into error rows
        # so the user sees every input accounted for in the results.
        yield path


def _read_list(list_path: Path) -> Iterator[str]:
    try:
        # surrogateescape, like core.inference: a line naming a non-UTF-8 file (Latin-1
        # exports) is that file, not a reason to refuse the whole list.
        with list_path.open(encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                stripped = line.strip()
                if stripped and not stripped.startswith("#"):
                    yield stripped
    except FileNotFoundError:
        raise InvalidInputError(f"{list_path}: list file not found") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{list_path}: list file is a directory") from None
    except OSError as exc:
        raise InvalidInputError(f"{list_path}: cannot read list file ({exc.strerror})") from None


def expand_inputs(
    inputs: Iterable[str],
    roots: Sequence[Path],
    *,
    time_limit: float | None = None,
    max_items: int | None = None,
) -> Iterator[str]:
    """Yield one absolute, confined path string per item, in input order.

    - a file yields itself (even if missing: it becomes an error row, not a refusal);
    - a folder yields its image files (suffixes in ``IMAGE_SUFFIXES``) recursively;
    - a glob (``*``, ``?``, ``[``; ``**`` recursive) yields matching image files and the
      images inside matching folders;
    - ``@list.txt`` yields each non-empty, non-``#`` line treated as a path, folder or glob;
      relative lines are relative to the list file's folder. Lists do not nest.

    Duplicates are kept as separate items. Raises ``PathOutsideRootsError`` for any path the
    user names (list files, their lines and glob prefixes included) outside ``roots``; a
    file *found* in a folder or by a glob that leads outside them is yielded under its own
    path instead (the worker refuses it when reading: one error row, the job goes on).
    Raises ``InvalidInputError`` for strings that cannot be paths,
    :class:`ExpansionTimeoutError` past ``time_limit`` seconds, and
    :class:`TooManyInputsError` for one folder holding more than ``max_items`` images
    (the caller counts items across folders). It is a generator: callers stream it, and
    nothing is listed beyond what they take.
    """
    limits = _Limits(time_limit, max_items)
    confiner = _Confiner(roots)
    try:
        for raw in inputs:
            limits.tick()
            for path in _expand_raw(raw, roots, limits, confiner):
                limits.tick()
                yield str(path)
    except globbing.FolderTooLargeError as exc:
        raise TooManyInputsError(exc.limit) from None


def _expand_raw(
    raw: str, roots: Sequence[Path], limits: _Limits, confiner: _Confiner
) -> Iterator[Path | str]:
    if not raw.startswith("@"):
        yield from _expand_one(raw, roots, base=None, limits=limits, confiner=confiner)
        return
    list_text = check_text(raw[1:], raw)
    list_path = confine(Path(list_text).expanduser(), roots)
    for line in _read_list(list_path):
        if line.startswith("@"):
            raise InvalidInputError(f"{list_path}: nested list files are not supported")
        yield from _expand_one(
            line, roots, base=list_path.parent, limits=limits, confiner=confiner
        )


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
