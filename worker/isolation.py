"""Isolation of an input that kills the worker process, so it costs one error row, not a chunk.

Why: a file that makes a native library crash (a segfault or abort in a decoder, or a decode
so large that the out-of-memory killer steps in) takes the whole process with it. No Python
``except`` runs, so the per-file error handling of ``core.inference`` cannot record it; the
chunk is re-sent (``worker/recovery.py``, or Celery's requeue after ``WorkerLostError``) and
the same file kills the next worker, until the attempts cap fails all of the chunk's items.

Mechanism, per chunk, in ``<data_dir>/jobs/<job>/chunks/<chunk>.json`` (shared storage, like
the jobs' heartbeat files and checkpoints):

* **Death detection.** The attempt that runs a chunk holds an exclusive ``flock`` on the file
  and writes its ``owner`` into it; it clears ``owner`` when it ends in Python (success,
  retry, failure, cancel). The kernel drops the lock of a process that dies. So the next
  attempt that gets the lock and still finds an ``owner`` knows its predecessor died. (An
  attempt that cannot get the lock runs beside a live one, e.g. a duplicated message: it
  skips the chunk, which the live attempt finishes or, should it die, recovery re-sends.)
* **The suspect.** The decode thread writes the item it is reading (``reading``) right
  before each file and clears it right after (``Predictor.predict(on_read=...)``; two small
  writes to an open file per item). A process that dies while ``reading`` is set was
  decoding that file, but a death has other causes (an operator's ``kill -9``, an OOM kill
  during a forward pass) that strike while the decode thread happens to be busy, so that
  file is only a *suspect*.
* **The confirmation.** The next attempt reads the suspect first, alone, nothing else
  running in the chunk, marked as ``confirming``; then the rest of the chunk in the normal
  batched way. If the process dies again while ``confirming``, the attempt after that
  records the file's error row ("the worker process died while reading or classifying
  this file (signal SIGSEGV ...)") and classifies the rest. One crashing file costs two
  deaths and one row, and each further one in the chunk two more deaths; a file that was
  only a suspect is classified as usual. Set-aside files do not count towards the attempts
  cap (each of those deaths made progress); unexplained deaths do.
* **The signal.** Every process that runs chunks enables :mod:`faulthandler` into a crash
  report of its own (``<data_dir>/crash-reports/<host>-<pid>-<ns>.txt``, removed at a normal
  exit); the ``owner`` entry names it, so the error row can say which fatal signal it was
  and where the native traceback is. A process killed with SIGKILL (the OOM killer) leaves
  an empty report, which the row says too.

The rows recorded for the other items follow the normal rules: the chunk succeeds, and a
set-aside file is an error row like any unreadable file (``scheduler.repository``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import faulthandler
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from scheduler import repository
from scheduler.pathtext import storable_text
from worker import sessions
from worker.appsettings import job_dir

if TYPE_CHECKING:
    from core.inference import Prediction, Predictor
    from scheduler.settings import Settings

log = logging.getLogger(__name__)

CHUNKS_DIR = "chunks"
CRASH_REPORTS_DIR = "crash-reports"

#: faulthandler's first line ("Fatal Python error: <what>") -> the signal's name.
_FATAL_SIGNALS: dict[str, str] = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Illegal instruction": "SIGILL",
    "Floating-point exception": "SIGFPE",
}


# --------------------------------------------------------------------------------------
# crash reports
# --------------------------------------------------------------------------------------

_report_pid: int | None = None
_report_path: Path | None = None
_report_file: IO[str] | None = None


def crash_report(settings: Settings) -> Path | None:
    """This process's crash report file, enabling :mod:`faulthandler` into it on first use.

    Per process id: a prefork child gets its own (the parent's file would mix reports).
    None when the folder cannot be written (reports are a diagnosis, never a reason to fail).
    """
    global _report_pid, _report_path, _report_file
    if _report_pid == os.getpid():
        return _report_path
    folder = settings.data_dir / CRASH_REPORTS_DIR
    # host + pid + start time: a restarted container often reuses the pid of the last one.
    path = folder / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = path.open("w", encoding="utf-8")
    except OSError as exc:
        log.warning("no crash report for this worker process (%s: %s)", path, exc)
        _report_pid, _report_path = os.getpid(), None
        return None
    faulthandler.enable(file=fh, all_threads=True)
    _report_pid, _report_path, _report_file = os.getpid(), path, fh
    atexit.register(_drop_report, path, os.getpid())
    return path


def _drop_report(path: Path, pid: int) -> None:
    # A normal exit: nothing crashed, the empty report is of no use. (A prefork child
    # inherits the parent's atexit hooks; the pid check keeps it off the parent's file.)
    if pid == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


def describe_death(report: str | None) -> str:
    """Why the process that wrote crash report ``report`` died, for an error row."""
    text = ""
    if report:
        with contextlib.suppress(OSError):
            text = Path(report).read_text(encoding="utf-8", errors="replace")
    first = text.strip().splitlines()[0] if text.strip() else ""
    if first.startswith("Fatal Python error: "):
        what = first.removeprefix("Fatal Python error: ").strip()
        name = _FATAL_SIGNALS.get(what, "a fatal signal")
        return f"signal {name} ({what}); crash report: {report}"
    if report and Path(report).exists():
        return "no crash report: killed by SIGKILL, e.g. by the out-of-memory killer"
    return "the process left no crash report"


# --------------------------------------------------------------------------------------
# the chunk guard
# --------------------------------------------------------------------------------------


def _owner(report: Path | None) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "report": report and str(report)}


def chunk_state_path(settings: Settings, job_id: int, chunk_index: int) -> Path:
    return job_dir(settings, job_id) / CHUNKS_DIR / f"{chunk_index}.json"


class ChunkGuard:
    """Death detection and isolation for one attempt of one chunk (see the module docstring).

    Use as a context manager around everything the attempt does after ``claim_chunk``.
    ``busy`` says another live attempt holds the chunk; :meth:`set_aside` records the file
    that killed the predecessor; :func:`predictions` confirms a suspect and marks reads.
    """

    def __init__(self, settings: Settings, job_id: int, chunk_index: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.chunk_index = chunk_index
        self.path = chunk_state_path(settings, job_id, chunk_index)
        self.busy = False
        #: The predecessor's owner entry if it died (None: it ended normally or never ran).
        self.died: dict[str, Any] | None = None
        #: The item the predecessor was decoding when it died (to be confirmed first).
        self.suspect: int | None = None
        self._culprit: int | None = None
        self._state: dict[str, Any] = {}
        self._fd: int | None = None
        self._size = 0

    # ---- lifecycle --------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether this attempt holds the chunk's state file (False: busy or unguarded)."""
        return self._fd is not None

    def __enter__(self) -> ChunkGuard:
        try:
            self._open()
        except OSError as exc:
            # Storage without locks or read-only: run unguarded, as before isolation existed,
            # rather than fail a chunk over a safety net.
            log.warning(
                "chunk %s/%s runs without crash isolation: %s", self.job_id, self.chunk_index, exc
            )
            self._close()
        return self

    def _open(self) -> None:
        report = crash_report(self.settings)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Not O_APPEND: Linux pwrite() ignores the offset on such files.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.busy = True
            return
        self._fd = fd
        self._size = os.fstat(fd).st_size
        try:
            state = json.loads(os.pread(fd, max(self._size, 1), 0).decode() or "{}")
        except ValueError:  # torn by a death mid-write: what it said is lost, not the chunk
            state = {"deaths": 1}
        self.died = state.get("owner")
        if self.died is not None:
            state["deaths"] = int(state.get("deaths", 0)) + 1
            if state.get("confirming") is not None:
                self._culprit = int(state["confirming"])
            elif state.get("reading") is not None:
                self.suspect = int(state["reading"])
        state.update(owner=_owner(report), reading=None, confirming=None)
        state.setdefault("set_aside", [])
        self._state = state
        self._write()

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # releases the lock
        self._fd = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is None:
            return
        try:
            # Ended in Python (whatever the outcome): the next attempt must not think we died.
            self._state.update(owner=None, reading=None, confirming=None)
            self._write()
            if not self._state.get("deaths") and not self._state.get("set_aside"):
                # Nothing to remember: a chunk that never lost a worker leaves no file.
                self.path.unlink()
        except OSError as exc:
            log.warning(
                "chunk %s/%s: could not close its state file: %s",
                self.job_id,
                self.chunk_index,
                exc,
            )
        finally:
            self._close()

    def _write(self) -> None:
        if self._fd is None:  # unguarded (see __enter__)
            return
        data = json.dumps(self._state).encode()
        # One pwrite of a record padded with spaces (which JSON ignores) to a size that only
        # grows: no seek, no truncate, so marking every read costs one small syscall. No
        # fsync: a dead process's writes are in the page cache already; only a host crash
        # loses them, and then the chunk merely counts as an unexplained death.
        self._size = max(self._size, -(-len(data) // 512) * 512)
        os.pwrite(self._fd, data.ljust(self._size), 0)

    def _mark(self, **fields: int | None) -> None:
        if self._fd is None:
            return
        self._state.update(fields)
        try:
            self._write()
        except OSError as exc:
            # Storage gone mid-chunk: keep classifying; a death now would just blame nobody.
            log.warning(
                "chunk %s/%s runs without crash isolation: %s", self.job_id, self.chunk_index, exc
            )
            self._close()

    # ---- what the attempt does --------------------------------------------------------

    @property
    def set_aside_count(self) -> int:
        return len(self._state.get("set_aside", ()))

    def set_aside(self, items: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """Record the error row of the item that killed the predecessor while it was being
        confirmed, and return the items left to do."""
        culprit, self._culprit = self._culprit, None
        if culprit is None or self.died is None:
            return list(items)
        found = [(i, p) for i, p in items if i == culprit]
        if found:
            reason = storable_text(
                "the worker process died while reading or classifying this file "
                f"({describe_death(self.died.get('report'))}); it was set aside so that "
                "the rest of its chunk could be classified"
            )
            record = repository.PredictionRecord(
                item_index=culprit,
                path=found[0][1],
                file_sha256=None,
                label=None,
                confidence=None,
                top_k=(),
                error=reason,
            )
            sessions.with_session(
                self.settings, lambda s: repository.record_predictions(s, self.job_id, [record])
            )
            log.warning(
                "chunk %s/%s: item %s (%s) killed worker process %s twice; set aside: %s",
                self.job_id,
                self.chunk_index,
                culprit,
                found[0][1],
                self.died.get("pid"),
                reason,
            )
        if culprit not in self._state["set_aside"]:
            self._state["set_aside"].append(culprit)
            self._mark()
        return [(i, p) for i, p in items if i != culprit]

    def reading(self, item_index: int | None) -> None:
        """Mark the item being decoded now (None: between items)."""
        self._mark(reading=item_index)

    def confirming(self, item_index: int | None) -> None:
        """Mark the suspect being read alone now (None: it survived)."""
        self._mark(confirming=item_index)


def predictions(
    guard: ChunkGuard | None,
    predictor: Predictor,
    items: Sequence[tuple[int, str]],
    paths: Sequence[Path | str],
    should_stop: Callable[[], bool],
) -> Iterator[Prediction]:
    """One prediction per item, in input order, batched; with a guard, reads are marked
    and a suspect is read alone first (see the module docstring)."""
    if guard is None or not guard.active:
        return predictor.predict(paths, should_stop=should_stop)
    return _guarded(guard, predictor, [i for i, _ in items], list(paths), should_stop)


def _guarded(
    guard: ChunkGuard,
    predictor: Predictor,
    indices: list[int],
    paths: list[Path | str],
    should_stop: Callable[[], bool],
) -> Iterator[Prediction]:
    held: Prediction | None = None
    at = indices.index(guard.suspect) if guard.suspect in indices else None
    if at is not None:
        log.warning(
            "chunk %s/%s: worker process %s died while reading item %s (%s); reading it "
            "alone first",
            guard.job_id,
            guard.chunk_index,
            guard.died and guard.died.get("pid"),
            indices[at],
            paths[at],
        )
        guard.confirming(indices[at])
        # One input, nothing else running in this chunk: a death now is this file's doing.
        (held,) = predictor.predict([paths[at]])
        guard.confirming(None)
        del indices[at], paths[at]

    def on_read(position: int | None) -> None:
        guard.reading(None if position is None else indices[position])

    yielded = 0
    for prediction in predictor.predict(paths, should_stop=should_stop, on_read=on_read):
        if held is not None and yielded == at:
            yield held
        yield prediction
        yielded += 1
    if held is not None and yielded == at:  # the suspect was the chunk's last item
        yield held


def load_state(path: Path) -> dict[str, Any]:
    """The state file's content (empty when missing)."""
    try:
        return dict(json.loads(path.read_text(encoding="utf-8") or "{}"))
    except FileNotFoundError:
        return {}
