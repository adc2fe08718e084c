"""Job submission shared by the CLI and the HTTP API.

Expands the user's inputs (files, folders, globs, ``@list.txt``), confines every path to
``settings.data_roots``, stores the job with its items and chunks in one transaction and
only then hands the work to the broker through the :class:`Dispatcher`. Nothing here
imports torch: training options are validated against plain lists that mirror ``core``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from sqlalchemy.orm import Session

from core.config import ARCHITECTURES  # torch-free: the registry without the models
from core.formats import IMAGE_SUFFIXES
from core.inputs import FolderTooLargeError, iglob, split_literal, walk_files
from scheduler import repository
from scheduler.paths import (
    MAX_PATH_LENGTH,
    InvalidPathError,
    PathOutsideRootsError,
    confine,
    is_inside,
)
from scheduler.schema import JobKind, JobStatus

__all__ = [
    "ARCHITECTURES",
    "DEVICES",
    "PREDICTION_COLUMNS",
    "ExpansionTimeoutError",
    "IMAGE_SUFFIXES",
    "InvalidInputError",
    "InvalidOptionsError",
    "NoInputsError",
    "NoProductionModelError",
    "PathOutsideRootsError",
    "SubmissionError",
    "TooManyInputsError",
    "cancel_job",
    "data_roots",
    "expand_inputs",
    "filesystem_path",
    "prediction_csv_row",
    "storable_path",
    "storable_text",
    "submit_classify",
    "submit_evaluate",
    "submit_train",
    "validate_train_options",
]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
_GLOB_CHARS = frozenset("*?[")
# Longest path string we store; far above PATH_MAX on Linux, so it only stops abuse.
MAX_PATH_CHARS = 4096


class SubmissionError(ValueError):
    """A submission was refused before anything was stored."""


class InvalidInputError(SubmissionError):
    """An input string cannot be a path (empty, NUL byte, too long, unreadable list file)."""


class NoInputsError(SubmissionError):
    """The inputs expanded to no file at all: a job without items would never finish."""


class TooManyInputsError(SubmissionError):
    """More items than ``settings.max_paths_per_job``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"too many inputs: a job takes at most {limit} paths (settings.max_paths_per_job); "
            "split the submission into several jobs"
        )


class InvalidOptionsError(SubmissionError):
    """Training/evaluation options failed validation; the message names the option."""


class NoProductionModelError(SubmissionError):
    """Classify without ``model_version_id`` needs a production model."""

    def __init__(self) -> None:
        super().__init__(
            "no production model: promote one with `mriq models promote ID` "
            "(or POST /models/{id}/promote), or pass a model version explicitly (--model)"
        )


class DispatchError(RuntimeError):
    """The job was stored but could not be handed to the broker; it has been marked failed.

    ``reason`` is the broker's error (for operators: it names the broker's address);
    ``public_message`` leaves it out, for API clients.
    """

    def __init__(self, job_id: int, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(
            f"job {job_id} not queued: the broker is unreachable ({reason}); the job is marked "
            "failed, submit it again once the broker is back"
        )

    @property
    def public_message(self) -> str:
        return (
            f"job {self.job_id} not queued: the task broker is unavailable; the job is marked "
            "failed, submit it again later"
        )


class DispatcherLike(Protocol):
    """What submission needs from ``scheduler.dispatch.Dispatcher`` (kept structural so the
    module does not import Celery at import time)."""

    def train(self, job_id: int) -> Any: ...
    def evaluate(self, job_id: int) -> Any: ...
    def classify_chunks(self, job_id: int, chunk_indices: Sequence[int]) -> Any: ...
    def revoke(self, job_id: int) -> Any: ...


SessionFactory = Callable[[], Session]


# --------------------------------------------------------------------------------------
# Input expansion
# --------------------------------------------------------------------------------------


def data_roots(settings: Any) -> list[Path]:
    """``settings.data_roots`` as a list of paths (accepts a list or an os.pathsep string)."""
    roots = settings.data_roots
    if isinstance(roots, str | os.PathLike):
        roots = [r for r in str(roots).split(os.pathsep) if r]
    return [Path(r) for r in roots]


def _check_text(value: str, what: str) -> str:
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


# --------------------------------------------------------------------------------------
# Non-UTF-8 file names
# --------------------------------------------------------------------------------------

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

    Lazy (:func:`core.inputs.walk_files`): only one directory's image names are held
    at a time, so the job limit stops the walk after limit + 1 files. Symlinked directories
    are not followed (a loop would never end); a file found here that leads outside the
    roots becomes an item of its own (:func:`_found_item`), not a refusal of the job.
    """
    for path in walk_files(str(folder), accept=_is_image, **limits.walk_options()):
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
    return split_literal(pattern)[0]


class ExpansionTimeoutError(SubmissionError):
    """Expanding the inputs took longer than ``settings.expansion_time_limit``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(
            f"expanding the inputs took longer than {seconds:g} s "
            "(settings.expansion_time_limit): name fewer folders or narrower patterns, "
            "or submit a list file"
        )


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
    text = _check_text(raw.strip() if base is not None else raw, raw)
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
        # Matches come lazily (core.inputs: no list of every match, no symlinked
        # folders in **, no folder outside the roots ever listed); a match leading outside
        # the roots is an item of its own that the worker refuses when it reads it, so the
        # job goes on and no target is revealed.
        pattern = os.path.normpath(str(candidate))
        confine(Path(_glob_base(pattern)), roots)

        def may_enter(link: str) -> bool:
            return is_inside(Path(os.path.realpath(link)), roots)

        matches = iglob(
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
    except FolderTooLargeError as exc:
        raise TooManyInputsError(exc.limit) from None


def _expand_raw(
    raw: str, roots: Sequence[Path], limits: _Limits, confiner: _Confiner
) -> Iterator[Path | str]:
    if not raw.startswith("@"):
        yield from _expand_one(raw, roots, base=None, limits=limits, confiner=confiner)
        return
    list_text = _check_text(raw[1:], raw)
    list_path = confine(Path(list_text).expanduser(), roots)
    for line in _read_list(list_path):
        if line.startswith("@"):
            raise InvalidInputError(f"{list_path}: nested list files are not supported")
        yield from _expand_one(
            line, roots, base=list_path.parent, limits=limits, confiner=confiner
        )


def _spool_inputs(inputs: Iterable[str], settings: Any) -> tuple[IO[str], int]:
    """Expand and validate every input into a temporary file before touching the database.

    Doing the slow part (walking folders) outside the transaction keeps SQLite's write lock
    short and guarantees a refusal leaves nothing behind; the spool keeps memory flat.
    """
    limit = int(settings.max_paths_per_job)
    spool = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115 (returned)
    count = 0
    try:
        expanded = expand_inputs(
            inputs,
            data_roots(settings),
            time_limit=getattr(settings, "expansion_time_limit", None),
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


def _read_spool(spool: IO[str]) -> Iterator[str]:
    for line in spool:
        yield json.loads(line)


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------

_TRAIN_DEFAULTS: dict[str, Any] = {
    "arch": "efficientnet_b0",
    "epochs": 10,
    "image_size": 224,
    "batch_size": 32,
    "lr": 1e-3,
    "labels": "15",
    "finetune": False,
    "weights": "auto",
    "seed": 0,
    "device": None,  # None -> settings.default_device
    "warm_start": False,
}


def _int_option(options: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionsError(f"{key}: must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise InvalidOptionsError(f"{key}: must be between {lo} and {hi}, not {value}")
    return value


def _valid_device(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidOptionsError(f"device: must be a string, not {value!r}")
    if value in DEVICES:
        return value
    head, _, index = value.partition(":")
    if head == "cuda" and index.isdigit() and len(index) <= 3:
        return value
    raise InvalidOptionsError(
        f"device: must be one of {', '.join(DEVICES)} or cuda:N, not {value!r}"
    )


def validate_train_options(
    options: Mapping[str, Any] | None, *, roots: Sequence[Path], default_device: str = "auto"
) -> dict[str, Any]:
    """Check ``core.train`` options without importing torch; returns the full option dict.

    Unknown keys are refused (a typo would otherwise silently train with a default).
    ``weights`` may be ``auto``/``none``/``imagenet`` or a checkpoint path inside the roots.
    """
    given = dict(options or {})
    unknown = sorted(set(given) - set(_TRAIN_DEFAULTS))
    if unknown:
        raise InvalidOptionsError(
            f"unknown training option(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_TRAIN_DEFAULTS))}"
        )
    merged = {**_TRAIN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    if merged["device"] is None:
        merged["device"] = default_device
    if merged["arch"] not in ARCHITECTURES:
        raise InvalidOptionsError(
            f"arch: {merged['arch']!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    out: dict[str, Any] = {"arch": merged["arch"]}
    out["epochs"] = _int_option(merged, "epochs", 1, 10_000)
    out["image_size"] = _int_option(merged, "image_size", 32, 2048)
    out["batch_size"] = _int_option(merged, "batch_size", 1, 4096)
    out["seed"] = _int_option(merged, "seed", 0, 2**32 - 1)
    lr = merged["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (0 < float(lr) <= 10):
        raise InvalidOptionsError(f"lr: must be a number in (0, 10], not {lr!r}")
    out["lr"] = float(lr)
    labels = str(merged["labels"])
    if labels not in ("15", "44"):
        raise InvalidOptionsError(f"labels: must be 15 or 44, not {merged['labels']!r}")
    out["labels"] = labels
    for flag in ("finetune", "warm_start"):
        if not isinstance(merged[flag], bool):
            raise InvalidOptionsError(f"{flag}: must be true or false, not {merged[flag]!r}")
        out[flag] = merged[flag]
    weights = merged["weights"]
    if not isinstance(weights, str) or not weights:
        raise InvalidOptionsError(
            f"weights: must be auto, none, imagenet or a path, not {weights!r}"
        )
    if weights not in ("auto", "none", "imagenet"):
        _check_text(weights, "weights")
        weights = str(confine(Path(weights).expanduser(), roots))
        if not Path(weights).is_file():
            raise InvalidOptionsError(f"weights: {weights}: no such checkpoint file")
    out["weights"] = weights
    out["device"] = _valid_device(merged["device"])
    return out


def _data_folder(data_dir: str | os.PathLike[str], roots: Sequence[Path]) -> Path:
    text = _check_text(os.fspath(data_dir), "data")
    folder = confine(Path(text).expanduser(), roots)
    if not folder.is_dir():
        raise InvalidOptionsError(f"data: {folder}: not a directory")
    return folder


# --------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------


def _dispatch_or_fail(
    session_factory: SessionFactory, job_id: int, send: Callable[[], Any]
) -> None:
    """Send the job's tasks; if the broker refuses, fail the stored job so it never hangs
    as "queued" without any task behind it.

    Interruptions (Ctrl-C, SIGTERM's SystemExit) mid-send fail the job too, then propagate:
    some chunks may be sent and others not, and a job nobody will complete must not look
    queued. Chunks that did reach the broker are skipped by workers (the job is terminal).
    """
    try:
        send()
    except BaseException as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        with session_factory() as session, session.begin():
            repository.finish_job(
                session, job_id, JobStatus.FAILED,
                error=f"not dispatched: the broker refused the tasks ({reason})",
            )
        if not isinstance(exc, Exception):
            raise
        raise DispatchError(job_id, reason) from exc


def submit_classify(
    session_factory: SessionFactory,
    dispatcher: DispatcherLike,
    settings: Any,
    inputs: Iterable[str],
    *,
    model_version_id: int | None = None,
    submitter: str | None = None,
    top_k: int = 3,
) -> int:
    """Store a classify job over ``inputs`` and dispatch its chunks; returns the job id.

    Raises ``PathOutsideRootsError``/``TooManyInputsError``/``SubmissionError`` before
    anything is stored, ``repository.NotFoundError`` for an unknown model version.
    """
    if isinstance(top_k, bool) or not 1 <= top_k <= 44:
        raise InvalidOptionsError(f"top_k: must be between 1 and 44, not {top_k!r}")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    # Resolve the model first: a missing model should not cost a folder walk.
    with session_factory() as session:
        if model_version_id is None:
            production = repository.get_production_model(session)
            if production is None:
                raise NoProductionModelError()
            model_version_id = int(production.id)
        else:
            repository.get_model_version(session, model_version_id)
    spool, count = _spool_inputs(inputs, settings)
    chunk_size = int(settings.chunk_size)
    with spool, session_factory() as session, session.begin():
        job = repository.create_job(
            session,
            kind=JobKind.CLASSIFY,
            params={"top_k": top_k, "count": count},
            submitter=submitter,
            model_version_id=model_version_id,
        )
        job_id = int(job.id)
        repository.add_job_items(session, job_id, _read_spool(spool), chunk_size=chunk_size)
    n_chunks = math.ceil(count / chunk_size)
    _dispatch_or_fail(
        session_factory, job_id, lambda: dispatcher.classify_chunks(job_id, range(n_chunks))
    )
    return job_id


def submit_train(
    session_factory: SessionFactory,
    dispatcher: DispatcherLike,
    settings: Any,
    data_dir: str | os.PathLike[str],
    options: Mapping[str, Any] | None = None,
    *,
    submitter: str | None = None,
) -> int:
    """Store a train job on ``data_dir`` (a class-folder tree) and dispatch it.

    ``params`` holds ``data`` plus every validated option, so the worker never guesses
    defaults; ``warm_start`` asks the worker to start from the production model's weights.
    """
    roots = data_roots(settings)
    folder = _data_folder(data_dir, roots)
    params = validate_train_options(
        options, roots=roots, default_device=str(getattr(settings, "default_device", "auto"))
    )
    with session_factory() as session, session.begin():
        warm_from: int | None = None
        if params["warm_start"]:
            production = repository.get_production_model(session)
            if production is None:
                raise InvalidOptionsError("warm_start: there is no production model to start from")
            warm_from = int(production.id)
        job = repository.create_job(
            session,
            kind=JobKind.TRAIN,
            params={"data": str(folder), **params},
            submitter=submitter,
            model_version_id=warm_from,
        )
        job_id = int(job.id)
    _dispatch_or_fail(session_factory, job_id, lambda: dispatcher.train(job_id))
    return job_id


def submit_evaluate(
    session_factory: SessionFactory,
    dispatcher: DispatcherLike,
    settings: Any,
    *,
    model_version_id: int,
    data_dir: str | os.PathLike[str],
    submitter: str | None = None,
) -> int:
    """Store an evaluate job (every image below ``data_dir``, no split) and dispatch it."""
    folder = _data_folder(data_dir, data_roots(settings))
    with session_factory() as session, session.begin():
        repository.get_model_version(session, model_version_id)
        job = repository.create_job(
            session,
            kind=JobKind.EVALUATE,
            params={"data": str(folder)},
            submitter=submitter,
            model_version_id=model_version_id,
        )
        job_id = int(job.id)
    _dispatch_or_fail(session_factory, job_id, lambda: dispatcher.evaluate(job_id))
    return job_id


def cancel_job(session_factory: SessionFactory, dispatcher: DispatcherLike, job_id: int) -> str:
    """Request cancellation; returns the job's status afterwards.

    The database flag is the source of truth (workers check it between batches/epochs);
    revoking queued tasks is only a shortcut, so broker errors are ignored.
    """
    with session_factory() as session, session.begin():
        job = repository.request_cancel(session, job_id)
        status = job.status
    with contextlib.suppress(Exception):  # best effort: the DB flag already stops the work
        dispatcher.revoke(job_id)
    return status.value if hasattr(status, "value") else str(status)


# --------------------------------------------------------------------------------------
# Result export (one CSV layout for the CLI and the API)
# --------------------------------------------------------------------------------------

PREDICTION_COLUMNS: tuple[str, ...] = (
    "item_index", "path", "label", "confidence", "top_k", "error"
)


def prediction_csv_row(row: Any) -> list[Any]:
    """A prediction row as CSV cells; ``top_k`` is JSON (``[[label, p], ...]``) so it
    round-trips, and ``confidence`` uses ``repr`` so no precision is lost."""
    return [
        row.item_index,
        row.path,
        row.label or "",
        "" if row.confidence is None else repr(float(row.confidence)),
        json.dumps([list(pair) for pair in (row.top_k or [])]),
        row.error or "",
    ]
