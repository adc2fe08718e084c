"""confine(): user paths must stay inside the data roots after resolving .. and symlinks."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.paths import InvalidPathError, PathOutsideRootsError, confine


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "scans").mkdir(parents=True)
    (root / "scans" / "a.png").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(b"x")
    return root


def test_inside_paths_are_returned_resolved(root: Path) -> None:
    assert confine(str(root / "scans" / "a.png"), [root]) == (root / "scans" / "a.png").resolve()
    assert (
        confine(root / "scans" / ".." / "scans" / "a.png", [root])
        == (root / "scans" / "a.png").resolve()
    )
    assert confine(root, [root]) == root.resolve()  # the root itself is allowed
    assert confine(root / "scans" / "not-yet.png", [root]).name == "not-yet.png"


def test_relative_paths_resolve_against_cwd(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)
    assert confine("scans/a.png", [root]) == (root / "scans" / "a.png").resolve()
    with pytest.raises(PathOutsideRootsError):
        confine("../outside/secret.png", [root])


def test_dotdot_escape_is_refused(root: Path) -> None:
    sneaky = f"{root}/scans/../../outside/secret.png"
    with pytest.raises(PathOutsideRootsError) as info:
        confine(sneaky, [root])
    message = str(info.value)
    assert sneaky in message and "outside the allowed data roots" in message
    assert str(root) in message and "MRIQ_DATA_ROOTS" in message
    assert info.value.resolved == (root.parent / "outside" / "secret.png").resolve()


def test_absolute_path_outside_is_refused(root: Path) -> None:
    with pytest.raises(PathOutsideRootsError):
        confine("/etc/passwd", [root])
    # A sibling sharing the root's name as a prefix is not inside it.
    sibling = root.parent / (root.name + "-evil")
    sibling.mkdir()
    with pytest.raises(PathOutsideRootsError):
        confine(sibling / "x.png", [root])


def test_symlink_escaping_root_is_refused(root: Path) -> None:
    outside = root.parent / "outside"
    (root / "link-file.png").symlink_to(outside / "secret.png")
    (root / "link-dir").symlink_to(outside)
    with pytest.raises(PathOutsideRootsError):
        confine(root / "link-file.png", [root])
    with pytest.raises(PathOutsideRootsError):
        confine(root / "link-dir" / "secret.png", [root])


def test_symlink_staying_inside_is_allowed(root: Path) -> None:
    (root / "alias").symlink_to(root / "scans")
    assert confine(root / "alias" / "a.png", [root]) == (root / "scans" / "a.png").resolve()


def test_symlinked_root_is_resolved_too(root: Path, tmp_path: Path) -> None:
    link_root = tmp_path / "data-link"
    link_root.symlink_to(root)
    assert confine(root / "scans" / "a.png", [link_root]) == (root / "scans" / "a.png").resolve()


def test_any_of_several_roots(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "outside"
    assert confine(other / "secret.png", [root, other]) == (other / "secret.png").resolve()
    with pytest.raises(PathOutsideRootsError, match="none configured"):
        confine(other / "secret.png", [])


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    monkeypatch.setenv("HOME", str(root))
    assert confine("~/scans/a.png", [root]) == (root / "scans" / "a.png").resolve()


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty path"),
        ("   ", "empty path"),
        ("scans/a\x00.png", "NUL byte"),
        ("scans/a\n.png", "control character"),
        ("x" * 5000, "longer than"),
    ],
)
def test_malformed_paths_are_refused(root: Path, bad: str, reason: str) -> None:
    with pytest.raises(InvalidPathError, match=reason) as info:
        confine(bad, [root])
    assert not isinstance(info.value, PathOutsideRootsError)


def test_symlink_loop_is_refused_not_crashing(root: Path) -> None:
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    # Python 3.11 raises RuntimeError on a loop; later versions resolve it as-is (inside).
    try:
        result = confine(root / "loop1" / "x.png", [root])
    except InvalidPathError as exc:
        assert "cannot resolve" in str(exc) or isinstance(exc, PathOutsideRootsError)
    else:
        assert result.is_relative_to(root.resolve())
