"""Path strings between users, the file system and the database.

User input is checked here (:func:`check_text`, :data:`PathText` for request models), and
file names that are not UTF-8 are encoded reversibly for storage (:func:`storable_path`,
:func:`filesystem_path`).
"""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator, Field

from scheduler.refusals import InvalidInputError

__all__ = [
    "MAX_PATH_CHARS",
    "PathText",
    "check_text",
    "clean_text",
    "filesystem_path",
    "storable_path",
    "storable_text",
]

# Longest path string we store; far above PATH_MAX on Linux, so it only stops abuse.
MAX_PATH_CHARS = 4096


def check_text(value: str, what: str) -> str:
    """``value`` when it can be a path; ``InvalidInputError`` naming ``what`` otherwise."""
    # NUL bytes crash os calls and PostgreSQL text. Surrogates U+DC80..U+DCFF are how Python
    # spells the bytes of a non-UTF-8 file name (surrogateescape): they name a real file and
    # are stored escaped (storable_path); any other lone surrogate is not a path.
    if not value or not value.strip():
        raise InvalidInputError(f"{what}: empty path")
    if "\x00" in value:
        raise InvalidInputError(f"{what!s}: path contains a NUL byte")
    if len(value) > MAX_PATH_CHARS:
        raise InvalidInputError(f"{value[:80]}...: path longer than {MAX_PATH_CHARS} characters")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{value!r}: path is not valid UTF-8") from None
    return value


def clean_text(value: str) -> str:
    """A request's path text, refused (``ValueError``) when it could not reach a file."""
    # NUL bytes and lone surrogates pass JSON parsing but break os calls and UTF-8 columns.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 (no lone surrogates)") from None
    return value


#: A path in a request body (API models, training options).
PathText = Annotated[
    str, Field(min_length=1, max_length=MAX_PATH_CHARS), AfterValidator(clean_text)
]

# An escape is a backslash, "x" and two hex digits; storable_path writes lower-case ones.
_ESCAPE = re.compile(r"\\x([0-9a-f]{2})")


def storable_path(path: str) -> str:
    """``path`` as valid UTF-8 text for the database, reversible with :func:`filesystem_path`.

    File names are bytes on POSIX; Python hands non-UTF-8 ones over with surrogates, which
    neither PostgreSQL nor SQLite accept. Undecodable bytes become ``\\xNN`` (what
    ``bytes.decode("utf-8", "backslashreplace")`` shows), and a literal backslash followed by
    ``x`` becomes ``\\x5cx`` so the mapping stays one-to-one. UTF-8 paths without that
    sequence (all normal ones) are returned unchanged.
    """
    if "\\x" not in path:
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
    raw = os.fsencode(path).replace(b"\\x", b"\\x5cx")
    return raw.decode("utf-8", "backslashreplace")


def filesystem_path(stored: str) -> str:
    """The file-system path (surrogate-escaped str) that :func:`storable_path` stored."""
    if "\\x" not in stored:
        return stored
    # Byte n >= 0x80 is surrogate U+DC00+n under surrogateescape; 0x5c is the backslash.
    text = _ESCAPE.sub(lambda m: chr(_escaped_code(int(m.group(1), 16))), stored)
    return os.fsdecode(text.encode("utf-8", "surrogateescape"))


def _escaped_code(byte: int) -> int:
    return 0xDC00 + byte if byte >= 0x80 else byte


def storable_text(text: str) -> str:
    """Free text (an error message naming a non-UTF-8 file) made valid UTF-8 for storage:
    undecodable bytes shown as ``\\xNN``, like the paths next to it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside the surrogateescape range
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
