"""core.inputs: lazy, sorted, loop-proof matching over real folders."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from core.inputs import (
    FolderTooLargeError,
    ListFileError,
    MissingListFileError,
    NestedListError,
    expand_inputs,
    iglob,
    split_literal,
    walk_files,
)
from scheduler import expansion


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_matches_what_glob_matches_on_an_ordinary_tree(tmp_path: Path) -> None:
    for rel in ("a/1.png", "a/2.jpg", "a/b/3.png", "c/4.png", ".hidden/5.png", "a/.6.png",
                "d/e/f/7.png", "x.png"):
        _touch(tmp_path / rel)
    for pattern in ("*.png", "*/*.png", "**/*.png", "a/**/*.png", "[ac]/*", "?/*.png",
                    "**/f/*.png", ".*/*.png", "a/.*.png"):
        full = str(tmp_path / pattern)
        assert set(iglob(full)) == set(glob.glob(full, recursive=True)), pattern
    # Depth first, each folder sorted: stable whatever the file system's order.
    found = iglob(str(tmp_path / "**" / "*.png"))
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == [
        "x.png", "a/1.png", "a/b/3.png", "c/4.png", "d/e/f/7.png"
    ]


def test_double_star_never_enters_links_to_folders(tmp_path: Path) -> None:
    _touch(tmp_path / "r" / "a" / "x.png")
    (tmp_path / "r" / "a" / "loop").symlink_to("..")
    (tmp_path / "r" / "a" / "loop2").symlink_to("../..")
    assert list(iglob(str(tmp_path / "r" / "**" / "*.png"))) == [str(tmp_path / "r/a/x.png")]
    # A folder walk lists the links as entries of their folder but never goes through them.
    assert list(walk_files(str(tmp_path / "r"))) == [
        str(tmp_path / "r/a/loop"), str(tmp_path / "r/a/loop2"), str(tmp_path / "r/a/x.png")
    ]
    assert list(walk_files(str(tmp_path / "r"), accept=lambda n: n.endswith(".png"))) == [
        str(tmp_path / "r/a/x.png")
    ]


def test_a_folder_larger_than_allowed_stops_while_it_is_read(tmp_path: Path) -> None:
    for i in range(500):
        _touch(tmp_path / "flat" / f"{i:03d}.png")
    read = [0]

    def tick() -> None:
        read[0] += 1

    with pytest.raises(FolderTooLargeError):
        list(iglob(str(tmp_path / "flat" / "*.png"), tick=tick, max_per_folder=20))
    # Entries read (materialised as names) = the cap + 1, not the folder's 500.
    assert read[0] == 21
    read[0] = 0
    with pytest.raises(FolderTooLargeError):
        list(walk_files(str(tmp_path / "flat"), tick=tick, max_per_folder=20))
    assert read[0] == 21


def test_split_literal() -> None:
    assert split_literal("/data/in/*/x?.png") == ("/data/in", ["*", "x?.png"])
    assert split_literal("*.png") == (".", ["*.png"])
    assert split_literal(f"{os.sep}a{os.sep}b") == ("/a/b", [])


def test_a_named_level_enters_a_folder_link_only_when_allowed(tmp_path: Path) -> None:
    _touch(tmp_path / "elsewhere" / "secret.png")
    _touch(tmp_path / "r" / "real" / "a.png")
    (tmp_path / "r" / "linked").symlink_to(tmp_path / "elsewhere")
    pattern = str(tmp_path / "r" / "*" / "*.png")
    assert list(iglob(pattern)) == [str(tmp_path / "r/real/a.png")]
    allowed = list(iglob(pattern, may_enter=lambda p: p.endswith("linked")))
    assert allowed == [str(tmp_path / "r/linked/secret.png"), str(tmp_path / "r/real/a.png")]
    # As the last level, a link to a folder is a match: the caller decides what it means.
    assert str(tmp_path / "r" / "linked") in list(iglob(str(tmp_path / "r" / "*")))


# ---- expand_inputs --------------------------------------------------------------------


def test_expand_files_folders_and_missing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for rel in [
        "b/2.png",
        "b/1.jpg",
        "a/z.PNG",
        "a/sub/y.dcm",
        "top.png",
        "notes.txt",
        ".hidden/x.png",
        "a/._resource.jpg",
    ]:
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    single = tmp_path / "single.txt"  # an explicit file is kept whatever its suffix
    single.write_text("x")
    missing = tmp_path / "nope.png"
    got = list(expand_inputs([str(single), str(root), str(missing)]))
    assert got == [
        single,
        root / "top.png",
        root / "a/z.PNG",
        root / "a/sub/y.dcm",
        root / "b/1.jpg",
        root / "b/2.png",
        missing,
    ]


def test_expand_list_file(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    abs_file = tmp_path / "abs.png"
    list_file = lists / "inputs.txt"
    list_file.write_text(
        "# comment\n\nrel.png\n  ../imgs  \n" + f"{abs_file}\r\n" + "   \n#another\n"
    )
    got = list(expand_inputs([f"@{list_file}", str(abs_file)]))
    assert got == [lists / "rel.png", lists / "../imgs/a.png", abs_file, abs_file]
    with pytest.raises(FileNotFoundError, match="list file"):
        list(expand_inputs([f"@{tmp_path / 'none.txt'}"]))


def test_unreadable_list_files_say_why(tmp_path: Path) -> None:
    with pytest.raises(MissingListFileError, match="list file not found"):
        list(expand_inputs([f"@{tmp_path / 'none.txt'}"]))
    with pytest.raises(ListFileError, match="list file is a directory") as info:
        list(expand_inputs([f"@{tmp_path}"]))
    assert info.value.list_file == tmp_path
    assert not isinstance(info.value, FileNotFoundError)


def test_is_folder_hook_decides_what_is_walked(tmp_path: Path) -> None:
    a = _touch(tmp_path / "d" / "a.png")
    asked: list[Path] = []

    def never_a_folder(path: Path) -> bool:
        asked.append(path)
        return False

    assert list(expand_inputs([str(tmp_path / "d")], is_folder=never_a_folder)) == [
        tmp_path / "d"
    ]
    assert asked == [tmp_path / "d"]
    assert list(expand_inputs([str(tmp_path / "d")])) == [a]


def test_expand_inputs_is_lazy(tmp_path: Path) -> None:
    it = expand_inputs([f"@{tmp_path / 'missing-list.txt'}"])
    # nothing happens until the first item is requested
    with pytest.raises(FileNotFoundError):
        next(it)


def test_nested_lists_are_refused_and_list_lines_may_be_globs(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs" / "a.png")
    _touch(tmp_path / "imgs" / "b.txt")
    listing = tmp_path / "in.txt"
    listing.write_text("imgs/*\n")
    assert list(expand_inputs([f"@{listing}"])) == [tmp_path / "imgs" / "a.png"]
    listing.write_text("@other.txt\n")
    with pytest.raises(NestedListError):
        list(expand_inputs([f"@{listing}"]))


def test_core_predict_and_the_scheduler_expand_a_folder_alike(tmp_path: Path) -> None:
    """One set of rules: ``python -m core.predict DIR`` and the scheduler's submission list
    the same files (dotfiles skipped, links to folders not entered, non-images left out)."""
    root = tmp_path / "data"
    for rel in ("b.png", "a.jpg", "sub/c.dcm", "sub/deeper/d.tif", ".hidden.png",
                ".dotdir/e.png", "notes.txt", "elsewhere/f.png"):
        _touch(root / rel)
    (root / "linked").symlink_to(root / "elsewhere", target_is_directory=True)
    expected = [str(root / rel) for rel in
                ("a.jpg", "b.png", "elsewhere/f.png", "sub/c.dcm", "sub/deeper/d.tif")]
    by_core = [str(p) for p in expand_inputs([str(root)])]
    by_scheduler = list(expansion.expand_inputs([str(root)], [root]))
    assert by_core == by_scheduler == expected
