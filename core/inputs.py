"""The one input expansion of mriq: files, folders, globs and ``@list.txt`` into file paths.

``python -m core.predict`` and the scheduler's submission (which adds confinement to the
data roots, a time box and a job limit through the hooks below) expand with these rules:

- a named file is itself, whatever its suffix and even if missing: it becomes an error row
  instead of disappearing from the results;
- a folder yields the files ``accept`` keeps (image suffixes by default), depth first: each
  folder's files sorted by name, then its subfolders sorted by name. Only one folder's
  matching names are held at a time, so a caller's limit stops the walk after limit + 1
  items. A named folder that cannot be listed is yielded itself (its error row says why);
  a folder met during a walk that cannot be listed matches nothing, as in ``glob``;
- names starting with a dot (``.hidden/``, macOS ``._x.jpg``) are skipped by every walk
  and wildcard; only a pattern component that starts with a dot matches them, and a path
  naming one explicitly is kept;
- symbolic links to folders are never entered by a walk or by ``**``: a link loop would
  make the walk endless (or exponential for ``**``), and a link may lead out of the data
  roots, which would list a folder the caller never allowed. A named glob level
  (``*/x.png``) may pass one when ``may_enter(path)`` says so (that cannot loop), and a
  link to a folder matched as the last level is walked only then too, otherwise it is
  yielded itself. Links to files are yielded like files;
- a glob (``*``, ``?``, ``[...]`` within one name, ``**`` for any number of folders) yields
  its matching files and the files inside matching folders, lazily and sorted per folder
  (``glob.glob`` builds every match first and its ``**`` follows links to folders);
- ``@list.txt`` yields each line (blank lines and ``#`` comments skipped) expanded like an
  input; relative lines are relative to the list file's folder; lists do not nest;
- duplicates are kept as separate items.

``tick()`` is called for every folder entry read, so a caller can time-box the expansion;
``max_per_folder`` refuses a single folder holding more candidate files than a job may take
before its names are sorted (:class:`FolderTooLargeError`). Pure Python: the scheduler
imports it without torch.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.formats import IMAGE_SUFFIXES

__all__ = [
    "FolderTooLargeError",
    "ListFileError",
    "MissingListFileError",
    "NestedListError",
    "expand_inputs",
    "has_magic",
    "iglob",
    "is_image_name",
    "read_list",
    "split_literal",
    "walk_files",
]

Tick = Callable[[], None]
Accept = Callable[[str], bool]
MayEnter = Callable[[str], bool]
#: A hook on a path: returns the path to use (or raises to refuse the input).
PathHook = Callable[[Path], Path]
#: Whether a named path (as ``named`` returned it) is a folder to walk.
IsFolder = Callable[[Path], bool]

_MAGIC = re.compile(r"[*?[]")


# Exceptions carrying their fields (as core.errors' and scheduler.repository's do): the
# __init__ shape recurs by design, each with its own message.
class FolderTooLargeError(Exception):
    """One folder holds more candidate files than the caller allows (``max_per_folder``)."""

    def __init__(self, folder: str, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        super().__init__(f"{folder}: more than {limit} matching files in one folder")


class ListFileError(OSError):
    """A ``@list.txt`` that cannot be read: a folder, or unreadable (``problem`` says why)."""

    def __init__(self, list_file: Path, problem: str) -> None:
        self.list_file = list_file
        self.problem = problem
        super().__init__(f"{list_file}: {problem}")


class MissingListFileError(ListFileError, FileNotFoundError):
    """A ``@list.txt`` that does not exist."""


class NestedListError(ValueError):
    """A line of a ``@list.txt`` names another list file: lists do not nest."""

    def __init__(self, list_file: Path) -> None:
        self.list_file = list_file
        super().__init__(f"{list_file}: nested list files are not supported")


def is_image_name(name: str) -> bool:
    """True when the file name has one of the image suffixes mriq reads (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _no_tick() -> None:
    return None


def _never(_path: str) -> bool:
    return False


def _any(_name: str) -> bool:
    return True


def _not_hidden(name: str) -> bool:
    return not name.startswith(".")


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
    may_enter: MayEnter = _never

    def listing(
        self, folder: str, keep_file: Accept, keep_dir: Accept, *, follow_links: bool
    ) -> tuple[list[str], list[str]]:
        """(sorted file names, sorted folder names) of ``folder`` that the filters keep;
        nothing for a folder that cannot be listed."""
        return self.try_listing(folder, keep_file, keep_dir, follow_links=follow_links) or (
            [],
            [],
        )

    def try_listing(
        self, folder: str, keep_file: Accept, keep_dir: Accept, *, follow_links: bool
    ) -> tuple[list[str], list[str]] | None:
        """:meth:`listing`, or None when ``folder`` cannot be listed."""
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
            return None
        files.sort()
        dirs.sort()
        return files, dirs


def _is_dir(entry: os.DirEntry[str], *, follow_links: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow_links)
    except OSError:
        return False


def walk_files(
    folder: str,
    *,
    accept: Accept = _any,
    tick: Tick = _no_tick,
    max_per_folder: int | None = None,
) -> Iterator[str]:
    """Files below ``folder`` whose name ``accept`` keeps (dot names skipped): each folder's
    files (sorted) and then its subfolders (sorted), depth first; links to folders are not
    entered, links to files are yielded like files. ``folder`` itself is yielded when it
    cannot be listed, so the caller's error row says why."""
    walk = _Walk(tick, accept, max_per_folder)
    listed = walk.try_listing(folder, _not_hidden, _not_hidden, follow_links=False)
    if listed is None:
        yield folder
        return
    yield from _walk_listed(walk, folder, listed)


def _walk(walk: _Walk, folder: str) -> Iterator[str]:
    yield from _walk_listed(
        walk, folder, walk.listing(folder, _not_hidden, _not_hidden, follow_links=False)
    )


def _walk_listed(walk: _Walk, folder: str, listed: tuple[list[str], list[str]]) -> Iterator[str]:
    files, dirs = listed
    for name in files:
        yield os.path.join(folder, name)
    del files, listed  # memory follows one folder's matches, not the whole walk's
    for name in dirs:
        yield from _walk(walk, os.path.join(folder, name))


def iglob(
    pattern: str,
    *,
    accept: Accept = _any,
    tick: Tick = _no_tick,
    max_per_folder: int | None = None,
    may_enter: MayEnter = _never,
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


def _name_filter(component: str) -> Accept:
    match = re.compile(fnmatch.translate(component)).match
    hidden_ok = component.startswith(".")

    def keep(name: str) -> bool:
        return (hidden_ok or not name.startswith(".")) and match(name) is not None

    return keep


def _none(_name: str) -> bool:
    return False


def _select(walk: _Walk, folder: str, parts: list[str]) -> Iterator[str]:
    head, rest = parts[0], parts[1:]
    if head == "**":
        while rest and rest[0] == "**":
            rest = rest[1:]
        if not rest:
            yield from _walk(walk, folder)
            return
        yield from _select(walk, folder, rest)
        # Symbolic links to folders are never entered by **: that is where loops live.
        _, dirs = walk.listing(folder, _none, _not_hidden, follow_links=False)
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
        _, dirs = walk.listing(folder, _none, keep, follow_links=True)
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path) or walk.may_enter(path):
                yield from _select(walk, path, rest)
        return
    files, dirs = walk.listing(folder, keep, keep, follow_links=True)
    for name in sorted([*files, *dirs]):
        yield os.path.join(folder, name)


def read_list(list_file: Path) -> Iterator[str]:
    """The entries of a ``@list.txt``, stripped, blank lines and ``#`` comments skipped, line
    by line (lists may hold millions of paths). Raises :class:`MissingListFileError` for a
    missing list, :class:`ListFileError` for a folder or one that cannot be read."""
    # The same three refusals as core.checkpoint.load_checkpoint's read (missing, a folder,
    # unreadable) with their own error types and words: alike by shape only.
    try:
        # surrogateescape: a line naming a non-UTF-8 file (Latin-1 exports) decodes to the
        # str that os.fsencode maps back to the same bytes, instead of aborting the list.
        fh = list_file.open(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise MissingListFileError(list_file, "list file not found") from None
    except IsADirectoryError:
        raise ListFileError(list_file, "list file is a directory") from None
    except OSError as exc:
        raise ListFileError(list_file, f"cannot read list file ({exc.strerror})") from None
    with fh:
        for line in fh:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield entry


@dataclass(frozen=True)
class _Expansion:
    accept: Accept
    tick: Tick
    max_per_folder: int | None
    may_enter: MayEnter
    named: PathHook
    found: PathHook
    is_folder: IsFolder

    def folder(self, folder: Path) -> Iterator[Path]:
        walked = walk_files(
            str(folder), accept=self.accept, tick=self.tick, max_per_folder=self.max_per_folder
        )
        for path in walked:
            yield self.found(Path(path))

    def one(self, text: str, base: str | None) -> Iterator[Path]:
        # Per list line this is the hot path of a 100,000-line list: one Path per line, the
        # folder joined as text (``base`` is computed once per list by the caller).
        if text.startswith("~"):
            text = os.path.expanduser(text)
        if base is not None and not text.startswith(os.sep):
            text = base + text
        if has_magic(text):
            yield from self.pattern(text)
            return
        path = self.named(Path(text))
        if self.is_folder(path):
            yield from self.folder(path)
        else:
            yield path

    def pattern(self, pattern: str) -> Iterator[Path]:
        # ".." segments are folded before the literal prefix is checked: root/**/../../etc/*
        # would otherwise list /etc from a prefix the caller allowed.
        pattern = os.path.normpath(pattern)
        self.named(Path(split_literal(pattern)[0]))
        matches = iglob(
            pattern,
            accept=self.accept,
            tick=self.tick,
            max_per_folder=self.max_per_folder,
            may_enter=self.may_enter,
        )
        for match in matches:
            path = Path(match)
            if not path.is_dir():
                yield self.found(path)
            elif not path.is_symlink() or self.may_enter(match):
                yield from self.folder(path)
            else:  # a link to a folder it may not enter: one error row, never a listing
                yield Path(os.path.abspath(path))


def _same(path: Path) -> Path:
    return path


def _is_folder(path: Path) -> bool:
    return path.is_dir()


def expand_inputs(
    inputs: Iterable[str | Path],
    *,
    accept: Accept = is_image_name,
    tick: Tick | None = None,
    max_per_folder: int | None = None,
    may_enter: MayEnter | None = None,
    named: PathHook | None = None,
    found: PathHook | None = None,
    is_folder: IsFolder | None = None,
) -> Iterator[Path]:
    """Lazily expand inputs into file paths, in input order, by the rules of this module.

    ``named`` sees every path the user names before it is used (an input, a list file,
    each list line, a glob's literal prefix) and returns the path to use or raises (the
    scheduler confines them to the data roots); ``found`` does the same for every file a
    walk or glob finds. ``may_enter`` decides which links to folders a glob may enter;
    ``is_folder`` whether a named path is a folder (the scheduler answers it from the stat
    its confinement already made, instead of a second one per list line).
    Raises :class:`MissingListFileError` / :class:`ListFileError` for a list file that
    cannot be read, :class:`NestedListError`, and
    :class:`FolderTooLargeError` past ``max_per_folder``; nothing happens until the first
    path is taken.
    """
    expansion = _Expansion(
        accept,
        tick or _no_tick,
        max_per_folder,
        may_enter or _never,
        named or _same,
        found or _same,
        is_folder or _is_folder,
    )
    for raw in inputs:
        expansion.tick()
        text = str(raw)
        if not (text.startswith("@") and len(text) > 1):
            yield from expansion.one(text, None)
            continue
        list_file = expansion.named(Path(text[1:]).expanduser())
        base = os.path.join(str(list_file.parent), "")  # relative lines join onto it as text
        for entry in read_list(list_file):
            if entry.startswith("@"):
                raise NestedListError(list_file)
            yield from expansion.one(entry, base)
