"""core.safefile.open_input: confinement judged when the file is opened, never blocking.

Real files, links and FIFOs in a temporary folder. The swaps "between resolving and
opening" are made deterministic by swapping inside ``os.path.realpath``'s return: the
resolution sees the old tree, the open meets the new one, which is exactly the race.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core import safefile
from core.decoding import input_sha256
from core.errors import NotAFileError, OutsideDataRootsError, UnreadableFileError
from core.imaging import read_image
from core.safefile import OUTSIDE_ROOTS_REASON, leads_inside, open_input
from tests.core.imagefiles import phantom
from tests.core.imagefiles import write_gray as _write_gray


def write_gray(path: Path, img: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_gray(path, img)


#: Generous: only a hang (a blocking open on a FIFO) could ever reach it.
HANG_GUARD_S = 60.0


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"top secret, not an image")
    yield root, outside


def test_regular_file_inside_the_roots_is_read(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    path = write_gray(root / "sub" / "a.png", phantom(16, 16))
    with open_input(path, roots=[root]) as fh:
        assert fh.read() == path.read_bytes()
    # A link inside the roots to a file inside them is legitimate.
    (root / "alias.png").symlink_to(path)
    with open_input(root / "alias.png", roots=[root]) as fh:
        assert fh.read() == path.read_bytes()
    assert read_image(root / "alias.png", roots=[root]).shape == (16, 16)


def test_link_leading_outside_is_refused_without_naming_its_target(
    tree: tuple[Path, Path],
) -> None:
    root, outside = tree
    link = root / "scan.png"
    link.symlink_to(outside / "secret.png")
    with pytest.raises(OutsideDataRootsError) as info:
        open_input(link, roots=[root])
    assert info.value.reason == OUTSIDE_ROOTS_REASON
    assert "secret" not in str(info.value) and str(outside) not in str(info.value)
    assert str(link) in str(info.value)  # the error names the file it was asked for
    assert input_sha256(link, roots=[root]) is None
    with pytest.raises(OutsideDataRootsError):
        read_image(link, roots=[root])
    # Without roots (python -m core.predict) links are followed as before.
    assert input_sha256(link) is not None
    # A folder on the path that is a link leading outside is refused the same way.
    (root / "dir").symlink_to(outside)
    with pytest.raises(OutsideDataRootsError):
        open_input(root / "dir" / "secret.png", roots=[root])


def test_a_fifo_is_refused_on_the_descriptor_without_blocking(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    fifo = root / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: dict[str, BaseException | None] = {}

    def attempt() -> None:
        for roots in ([root], None):
            try:
                open_input(fifo, roots=roots)
            except NotAFileError as exc:
                outcome[str(roots)] = exc
        outcome["sha"] = None if input_sha256(fifo, roots=[root]) is None else AssertionError()

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "open_input blocked on a FIFO"
    assert outcome["sha"] is None
    assert str(outcome[str([root])]).endswith("not a regular file (FIFO)")
    assert str(outcome[str(None)]).endswith("not a regular file (FIFO)")


def test_directory_and_socket_are_not_files(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "folder.png").mkdir()
    with pytest.raises(NotAFileError, match="is a directory"):
        open_input(root / "folder.png", roots=[root])
    with pytest.raises(NotAFileError, match="is a directory"):
        open_input(root, roots=[root])
    sock_path = root / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(NotAFileError, match=r"not a regular file \(socket\)"):
            open_input(sock_path, roots=[root])


def _swap_after_resolving(
    monkeypatch: pytest.MonkeyPatch, target: Path, swap: Callable[[], None]
) -> None:
    """The resolution of ``target`` sees the tree as it is; ``swap()`` then runs before the
    open: the race between checking and opening, made deterministic."""
    real = os.path.realpath

    def resolve_then_swap(path: Any, *args: Any, **kwargs: Any) -> Any:
        resolved = real(path, *args, **kwargs)
        if os.fspath(path) == str(target):
            swap()
        return resolved

    monkeypatch.setattr(safefile.os.path, "realpath", resolve_then_swap)


def test_file_swapped_for_a_link_after_resolving_is_not_followed(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tree
    path = write_gray(root / "a.png", phantom(16, 16))
    swapped: list[bool] = []

    def swap() -> None:
        path.unlink()
        path.symlink_to(outside / "secret.png")
        swapped.append(True)

    _swap_after_resolving(monkeypatch, path, swap)
    with pytest.raises(UnreadableFileError, match="symbolic link"):
        open_input(path, roots=[root])
    assert swapped


def test_folder_swapped_for_a_link_after_resolving_is_not_followed(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tree
    path = write_gray(root / "sub" / "secret.png", phantom(16, 16))
    swapped: list[bool] = []

    def swap() -> None:
        (root / "sub").rename(root / "old-sub")
        (root / "sub").symlink_to(outside)  # outside/secret.png exists: a real lure
        swapped.append(True)

    _swap_after_resolving(monkeypatch, path, swap)
    with pytest.raises(UnreadableFileError, match="folder on its path was replaced"):
        open_input(path, roots=[root])
    assert swapped


def test_leads_inside(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "out").symlink_to(outside)
    assert leads_inside(root / "x" / "missing.png", [root])
    assert not leads_inside(root / "out", [root])
    assert not leads_inside(root / ".." / "outside", [root])
    # A root given through a link is judged by where it leads.
    (outside / "alias-root").symlink_to(root)
    assert leads_inside(root / "a.png", [outside / "alias-root"])


def test_a_link_loop_inside_the_roots_is_named_as_such(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "loop_a.png").symlink_to(root / "loop_b.png")
    (root / "loop_b.png").symlink_to(root / "loop_a.png")
    for roots in ([root], None):
        with pytest.raises(UnreadableFileError, match="too many levels of symbolic links"):
            open_input(root / "loop_a.png", roots=roots)
