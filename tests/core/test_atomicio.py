"""core.atomicio: the target is replaced whole or left alone, and errors name it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from core.atomicio import atomic_path, write_bytes_atomically, write_text_atomically


def test_the_block_writes_a_sibling_that_replaces_the_target(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".json"
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    write_text_atomically(target, "text é")
    assert target.read_text(encoding="utf-8") == "text é"
    write_bytes_atomically(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as caught, atomic_path(target, what="the checkpoint") as tmp:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(target)
    assert caught.value.strerror == "cannot write the checkpoint (No space left on device)"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_a_missing_folder_is_an_error_naming_the_target(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "plot.png"
    with pytest.raises(OSError, match="cannot write plot.png") as caught:
        write_bytes_atomically(target, b"x")
    assert caught.value.filename == str(target)
