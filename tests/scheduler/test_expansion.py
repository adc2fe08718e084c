"""Input expansion: files, folders, globs and list files, confined to the data roots, lazy
and bounded (``scheduler.expansion``). Real files in tmp; no database is needed."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from scheduler import expansion, refusals
from scheduler.paths import PathOutsideRootsError
from tests.scheduler.api_factories import touch_file

# ----------------------------------------------------------------------------- expand_inputs


def test_expand_is_a_generator(root: Path) -> None:
    touch_file(root / "a.png")
    assert inspect.isgenerator(expansion.expand_inputs([str(root)], [root]))


def test_expand_files_folders_recursive_and_suffix_filter(root: Path) -> None:
    a = touch_file(root / "a.png")
    b = touch_file(root / "sub" / "deep" / "b.JPG")
    c = touch_file(root / "sub" / "c.dcm")
    touch_file(root / "sub" / "notes.txt")
    touch_file(root / "sub" / "model.pt")
    explicit_txt = touch_file(root / "explicit.txt")
    got = list(expansion.expand_inputs([str(root / "sub"), str(a), str(explicit_txt)], [root]))
    # Folders give image files only, depth first and sorted; explicit files are kept as given.
    assert got == [str(c), str(b), str(a), str(explicit_txt)]


def test_expand_globs(root: Path) -> None:
    a = touch_file(root / "x" / "a.png")
    b = touch_file(root / "x" / "b.png")
    touch_file(root / "x" / "c.txt")
    d = touch_file(root / "y" / "z" / "d.tif")
    assert list(expansion.expand_inputs([str(root / "x" / "*.png")], [root])) == [str(a), str(b)]
    assert list(expansion.expand_inputs([str(root / "**" / "*.tif")], [root])) == [str(d)]
    # A glob matching folders expands their images.
    assert list(expansion.expand_inputs([str(root / "[xy]")], [root])) == [
        str(a), str(b), str(d)
    ]


def test_expand_list_file_with_missing_relative_comments_and_duplicates(root: Path) -> None:
    a = touch_file(root / "imgs" / "a.png")
    folder = root / "imgs"
    listing = root / "lists" / "inputs.txt"
    listing.parent.mkdir()
    listing.write_text(
        f"# a comment\n{a}\n\n../imgs/a.png\n{root / 'missing.png'}\n{folder}\n", "utf-8"
    )
    got = list(expansion.expand_inputs([f"@{listing}"], [root]))
    # Missing files are still items (they become error rows); duplicates stay separate items.
    assert got == [str(a), str(a), str(root / "missing.png"), str(a)]


def test_expand_keeps_missing_plain_file(root: Path) -> None:
    assert list(expansion.expand_inputs([str(root / "nope.png")], [root])) == [
        str(root / "nope.png")
    ]


@pytest.mark.parametrize(
    "make_input",
    [
        lambda root, out: str(out / "secret.png"),
        lambda root, out: str(root / ".." / "outside" / "secret.png"),
        lambda root, out: str(out / "*.png"),
        lambda root, out: str(out),
    ],
    ids=["absolute", "dotdot", "glob", "folder"],
)
def test_expand_refuses_paths_outside_roots(root: Path, outside: Path, make_input: Any) -> None:
    with pytest.raises(PathOutsideRootsError):
        list(expansion.expand_inputs([make_input(root, outside)], [root]))


def test_expand_refuses_symlink_and_list_file_outside(root: Path, outside: Path) -> None:
    (root / "link.png").symlink_to(outside / "secret.png")
    # Named explicitly, a link leading outside is refused (found in a folder it is an item:
    # test_found_link_outside_the_roots_is_an_item_not_a_refusal).
    with pytest.raises(PathOutsideRootsError):
        list(expansion.expand_inputs([str(root / "link.png")], [root]))
    listing = outside / "list.txt"
    listing.write_text(str(root / "a.png"), "utf-8")
    with pytest.raises(PathOutsideRootsError):
        list(expansion.expand_inputs([f"@{listing}"], [root]))
    # A list inside the roots naming a file outside them is refused too.
    inner = root / "list.txt"
    inner.write_text(str(outside / "secret.png"), "utf-8")
    with pytest.raises(PathOutsideRootsError):
        list(expansion.expand_inputs([f"@{inner}"], [root]))


def test_found_link_outside_the_roots_is_an_item_not_a_refusal(
    root: Path, outside: Path
) -> None:
    images = [touch_file(root / "bulk" / f"img_{i:02d}.png") for i in range(5)]
    stray = root / "bulk" / "img_02b.png"
    stray.symlink_to(outside / "secret.png")
    (outside / "more").mkdir()
    touch_file(outside / "more" / "hidden_away.png")
    (root / "bulk" / "zz_folder").symlink_to(outside / "more")
    expected = [*images[:3], stray, *images[3:]]
    # Found by walking the folder: the job goes on, the link is stored under its own path
    # (the worker refuses it when reading: "leads outside the data roots").
    assert list(expansion.expand_inputs([str(root / "bulk")], [root])) == [
        str(p) for p in expected
    ]
    # Found by a glob: the same, and a matched link to a folder outside is one item (an
    # error row later), never a listing of that folder.
    got = list(expansion.expand_inputs([str(root / "bulk" / "*")], [root]))
    assert got == [*(str(p) for p in expected), str(root / "bulk" / "zz_folder")]
    assert not any("hidden_away" in p or str(outside) in p for p in got)
    # Named explicitly, the same link is still refused.
    with pytest.raises(PathOutsideRootsError):
        list(expansion.expand_inputs([str(stray)], [root]))


#: Only a hang could reach it (the old glob followed the loop below for ever).
HANG_GUARD_S = 60.0


def _expand_with_hang_guard(inputs: list[str], roots: list[Path]) -> list[str]:
    import threading

    out: list[Any] = []
    thread = threading.Thread(
        target=lambda: out.append(list(expansion.expand_inputs(inputs, roots))), daemon=True
    )
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), f"expanding {inputs} did not finish"
    return out[0]  # type: ignore[no-any-return]


def test_symlink_loop_inside_a_root_is_not_followed(root: Path) -> None:
    image = touch_file(root / "a" / "x.png")
    # Two links back up: glob's ** followed both, 2**depth paths (exponential).
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "up2").symlink_to("../..")
    assert _expand_with_hang_guard([str(root / "**" / "*.png")], [root]) == [str(image)]
    assert _expand_with_hang_guard([str(root / "**")], [root]) == [str(image)]
    assert _expand_with_hang_guard([str(root)], [root]) == [str(image)]


def test_expansion_is_time_boxed(root: Path) -> None:
    for i in range(3):
        touch_file(root / "sub" / f"{i}.png")
    for inputs in ([str(root / "**" / "*.png")], [str(root)], [str(root / "sub" / "0.png")]):
        with pytest.raises(refusals.ExpansionTimeoutError, match="expansion_time_limit"):
            list(expansion.expand_inputs(inputs, [root], time_limit=0.0))
    assert len(list(expansion.expand_inputs([str(root)], [root], time_limit=60.0))) == 3


def test_expand_rejects_bad_strings_and_missing_list(root: Path) -> None:
    with pytest.raises(ValueError, match="NUL"):
        list(expansion.expand_inputs(["a\x00b.png"], [root]))
    with pytest.raises(refusals.InvalidInputError, match="list file not found"):
        list(expansion.expand_inputs([f"@{root / 'nope.txt'}"], [root]))
    with pytest.raises(refusals.InvalidInputError, match="list file is a directory"):
        list(expansion.expand_inputs([f"@{root}"], [root]))


def test_list_lines_naming_folders_are_walked_relative_ones_too(root: Path) -> None:
    # is_folder answers from the confinement's lstat: a folder line is walked, a file line
    # and a missing one are items, and a folder listed again is walked again.
    a = touch_file(root / "imgs" / "a.png")
    b = touch_file(root / "imgs" / "sub" / "b.png")
    listing = root / "inputs.txt"
    listing.write_text(f"imgs\nimgs/a.png\nimgs/none.png\n{root / 'imgs' / 'sub'}\n", "utf-8")
    got = list(expansion.expand_inputs([f"@{listing}"], [root]))
    assert got == [str(a), str(b), str(a), str(root / "imgs" / "none.png"), str(b)]


# ----------------------------------------------------------------------------- submit_classify
