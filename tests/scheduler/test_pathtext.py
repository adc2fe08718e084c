"""Path text: checks on user input and the reversible storage form of non-UTF-8 names."""

from __future__ import annotations

import os

import pytest

from scheduler.pathtext import (
    MAX_PATH_CHARS,
    check_text,
    filesystem_path,
    storable_path,
    storable_text,
)
from scheduler.refusals import InvalidInputError


@pytest.mark.parametrize(
    "path",
    ["/d/plain.png", "/d/caf\u00e9.png", os.fsdecode(b"/d/latin-\xe9.png"), "/d/lit\\xe9.png"],
    ids=["ascii", "utf8", "latin1-bytes", "literal-backslash-x"],
)
def test_storable_path_round_trips(path: str) -> None:
    stored = storable_path(path)
    stored.encode("utf-8")  # valid UTF-8 for the database
    assert filesystem_path(stored) == path


def test_normal_paths_are_stored_unchanged_and_bytes_escaped() -> None:
    assert storable_path("/d/caf\u00e9.png") == "/d/caf\u00e9.png"
    assert storable_path(os.fsdecode(b"/d/\xe9.png")) == "/d/\\xe9.png"
    assert storable_text("bad " + os.fsdecode(b"\xff")) == "bad \\xff"


@pytest.mark.parametrize(
    ("value", "match"),
    [(" ", "empty path"), ("a\x00b", "NUL"), ("x" * (MAX_PATH_CHARS + 1), "longer than"),
     ("\ud800", "not valid UTF-8")],
)
def test_check_text_refuses_what_cannot_be_a_path(value: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        check_text(value, "input")
