"""Chunk deadlines that hold on every pool: progress is the liveness signal.

Why this exists: Celery enforces hard time limits on the prefork pool only; production runs
the threads pool, where a chunk stuck on a hung read (a dead NFS server, a wedged FUSE
mount, a decoder that never returns) would keep its pool slot, its heartbeat and its job's
``running`` status forever. A heartbeat only proves the *process* is alive.

Mechanism: :func:`run_with_deadline` runs the chunk body in a daemon thread and watches a
:class:`Progress` that the body advances when it gets somewhere (model loaded, each batch of
predictions recorded). The chunk is **abandoned** when no progress was made for
``stall_s`` seconds or when it has run for ``limit_s`` in all (``None``: no total limit, e.g.
on prefork where Celery's own hard limit applies). Abandoning sets :attr:`Progress.abandoned`
(the body stops writing at its next check: a thread cannot be killed, but it can be told
that its results are no longer wanted) and raises :class:`ChunkAbandoned` in the task, which
frees the pool slot at once. The stuck thread is left behind, blocked in its system call; it
holds no database session and exits whenever its call returns. The task then re-sends the
chunk once (only its unrecorded items are redone) and fails it with the reason the second
time (``worker.tasks``). The mechanism does not care what the body is stuck on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: How often the watchdog looks at the progress (bounded above by a quarter of the stall
#: timeout, so a short test timeout is enforced about on time).
POLL_S = 1.0


class ChunkAbandoned(Exception):
    """The chunk missed its deadline; ``reason`` says which one and for how long."""

    def __init__(self, reason: str, progress_items: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        #: Items the chunk had recorded when it was abandoned.
        self.progress_items = progress_items


class Progress:
    """Progress of one chunk, advanced by the thread doing the work, read by the watchdog."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        self._last = self.started
        self.items = 0
        self.abandoned = threading.Event()

    def advance(self, items: int = 0) -> None:
        """Something got done (``items`` more recorded): the stall timer starts again."""
        with self._lock:
            self.items += items
            self._last = self._clock()

    def idle_s(self) -> float:
        with self._lock:
            return self._clock() - self._last

    def elapsed_s(self) -> float:
        return self._clock() - self.started


def overdue(progress: Progress, *, stall_s: float, limit_s: float | None) -> str | None:
    """Why the chunk is past its deadline, or None while it is within it."""
    idle = progress.idle_s()
    if idle >= stall_s:
        return (
            f"no progress for {idle:.0f}s (chunk_stall_timeout {stall_s:g}s; "
            f"{progress.items} items recorded)"
        )
    if limit_s is not None and progress.elapsed_s() >= limit_s:
        return (
            f"ran for {progress.elapsed_s():.0f}s, over chunk_time_limit {limit_s:g}s "
            f"({progress.items} items recorded)"
        )
    return None


def run_with_deadline(
    fn: Callable[[Progress], T],
    *,
    stall_s: float,
    limit_s: float | None,
    name: str,
    progress: Progress | None = None,
) -> T:
    """``fn(progress)`` in a daemon thread; its result, its exception, or
    :class:`ChunkAbandoned` once it is past its deadline (see the module docstring)."""
    if stall_s <= 0:
        raise ValueError(f"stall_s must be > 0, got {stall_s}")
    progress = progress or Progress()
    done = threading.Event()
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            outcome["value"] = fn(progress)
        except BaseException as exc:  # handed to the waiting task thread
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=body, name=f"mriq-chunk-{name}", daemon=True)
    thread.start()
    poll = min(POLL_S, stall_s / 4)
    while not done.wait(poll):
        reason = overdue(progress, stall_s=stall_s, limit_s=limit_s)
        if reason is not None and not done.is_set():
            progress.abandoned.set()
            raise ChunkAbandoned(reason, progress.items)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
