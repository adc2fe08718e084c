"""Lazy folder walks and glob matching for job submission, built to resist abuse.

``glob.glob`` builds every match before the first can be used (the caller sorted them all
before the job limit applied) and its ``**`` follows symbolic links to folders, so one
link loop inside a data root makes a pattern exponential. Here:

- matches come out one at a time, depth first, each folder's entries sorted by name, so
  the caller's limit stops the expansion after limit + 1 items;
- a folder's listing is filtered while it is read and only the names that can still
  match are kept (names, not ``DirEntry`` objects): memory follows the matches of one
  folder, not the folder's size;
- ``**`` and folder walks never descend into symbolic links to folders;
- ``tick()`` is called for every entry read, so the caller can time-box the expansion;
- ``max_per_folder`` refuses a single folder holding more candidate files than a job may
  take before its names are sorted (:class:`FolderTooLargeError`).

Pattern syntax is ``glob``'s: ``*``, ``?``, ``[...]`` within one name, ``**`` for any
number of folders; names starting with a dot match only a pattern that starts with one.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["FolderTooLargeError", "has_magic", "iglob", "split_literal", "walk_files"]

Tick = Callable[[], None]
Accept = Callable[[str], bool]

_MAGIC = re.compile(r"[*?[]")


class FolderTooLargeError(Exception):
    """One folder holds more candidate files than the caller allows (``max_per_folder``)."""

    def __init__(self, folder: str, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        super().__init__(f"{folder}: more than {limit} matching files in one folder")


def _no_tick() -> None:
    return None


def has_magic(text: str) -> bool:
    return _MAGIC.search(text) is not None


def split_literal(pattern: str) -> tuple[str, list[str]]:
    """(the literal folder prefix of ``pattern``, its remaining components)."""
    absolute = pattern.startswith(os.sep)
    parts = [p for p in pattern.split(os.sep) if p]
    literal: list[str] = []
    for part in parts:
        if has_magic(part):
            break
        literal.append(part)
    base = os.sep.join(literal)
    if absolute:
        base = os.sep + base
    return base or ".", parts[len(literal):]


@dataclass(frozen=True)
class _Walk:
    tick: Tick
    accept: Accept
    max_per_folder: int | None
    #: Whether a link to a folder may be entered by a named pattern level (``*/x.png``):
    #: the caller's confinement, so no folder outside the roots is ever listed.
    may_enter: Callable[[str], bool] = lambda _path: False

    def listing(
        self, folder: str, keep_file: Callable[[str], bool], keep_dir: Callable[[str], bool],
        *, follow_links: bool,
    ) -> tuple[list[str], list[str]]:
        """(sorted file names, sorted folder names) of ``folder`` that the filters keep."""
        files: list[str] = []
        dirs: list[str] = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    self.tick()
                    name = entry.name
                    if _is_dir(entry, follow_links=follow_links):
                        if keep_dir(name):
                            dirs.append(name)
                    elif keep_file(name) and self.accept(name):
                        files.append(name)
                        if self.max_per_folder is not None and len(files) > self.max_per_folder:
                            raise FolderTooLargeError(folder, self.max_per_folder)
        except OSError:
            return [], []  # unreadable folders match nothing, as in glob
        files.sort()
        dirs.sort()
        return files, dirs


def _is_dir(entry: os.DirEntry[str], *, follow_links: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow_links)
    except OSError:
        return False


def _any(_name: str) -> bool:
    return True


def walk_files(
    folder: str,
    *,
    accept: Accept = _any,
    tick: Tick = _no_tick,
    max_per_folder: int | None = None,
) -> Iterator[str]:
    """Files below ``folder`` whose name ``accept`` keeps: each folder's files (sorted) and
    then its subfolders (sorted), depth first; symbolic links to folders are not entered
    (a loop would never end), links to files are yielded like files."""
    walk = _Walk(tick, accept, max_per_folder)
    yield from _walk(walk, folder)


def _walk(walk: _Walk, folder: str) -> Iterator[str]:
    files, dirs = walk.listing(folder, _any, _any, follow_links=False)
    for name in files:
        yield os.path.join(folder, name)
    del files
    for name in dirs:
        yield from _walk(walk, os.path.join(folder, name))


def iglob(
    pattern: str,
    *,
    accept: Accept = _any,
    tick: Tick = _no_tick,
    max_per_folder: int | None = None,
    may_enter: Callable[[str], bool] = lambda _path: False,
) -> Iterator[str]:
    """Paths matching ``pattern``, lazily: files ``accept`` keeps, and folders (the final
    component matched a folder, or a link to one; the caller decides what to do with it).
    ``**`` as the last component yields every accepted file below, never a folder, so
    nothing is found twice. A link to a folder is entered only by a named level and only
    when ``may_enter(path)`` says so; ``**`` never enters one.
    """
    walk = _Walk(tick, accept, max_per_folder, may_enter)
    base, parts = split_literal(pattern)
    if not parts:
        if os.path.lexists(base):
            yield base
        return
    yield from _select(walk, base, parts)


def _name_filter(component: str) -> Callable[[str], bool]:
    match = re.compile(fnmatch.translate(component)).match
    hidden_ok = component.startswith(".")

    def keep(name: str) -> bool:
        return (hidden_ok or not name.startswith(".")) and match(name) is not None

    return keep


def _not_hidden(name: str) -> bool:
    return not name.startswith(".")


def _select(walk: _Walk, folder: str, parts: list[str]) -> Iterator[str]:
    head, rest = parts[0], parts[1:]
    if head == "**":
        while rest and rest[0] == "**":
            rest = rest[1:]
        if not rest:
            yield from _recursive_files(walk, folder)
            return
        yield from _select(walk, folder, rest)
        # Symbolic links to folders are never entered by **: that is where loops live.
        _, dirs = walk.listing(folder, lambda _n: False, _not_hidden, follow_links=False)
        for name in dirs:
            yield from _select(walk, os.path.join(folder, name), parts)
        return
    if not has_magic(head):
        path = os.path.join(folder, head)
        if rest:
            if os.path.isdir(path) and (not os.path.islink(path) or walk.may_enter(path)):
                yield from _select(walk, path, rest)
        elif os.path.lexists(path):
            yield path
        return
    keep = _name_filter(head)
    if rest:
        # One named level may pass a link to a folder (as glob does; it cannot loop), if
        # the caller allows that folder.
        _, dirs = walk.listing(folder, lambda _n: False, keep, follow_links=True)
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path) or walk.may_enter(path):
                yield from _select(walk, path, rest)
        return
    files, dirs = walk.listing(folder, keep, keep, follow_links=True)
    for name in sorted([*files, *dirs]):
        yield os.path.join(folder, name)


def _recursive_files(walk: _Walk, folder: str) -> Iterator[str]:
    files, dirs = walk.listing(folder, _not_hidden, _not_hidden, follow_links=False)
    for name in files:
        yield os.path.join(folder, name)
    del files
    for name in dirs:
        yield from _recursive_files(walk, os.path.join(folder, name))
