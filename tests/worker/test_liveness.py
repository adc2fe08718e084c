"""worker/liveness.py: the chunk deadline that holds on every pool (no services needed)."""

from __future__ import annotations

import threading

import pytest

from worker.liveness import ChunkAbandoned, Progress, overdue, run_with_deadline


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_overdue_counts_from_the_last_progress() -> None:
    clock = FakeClock()
    progress = Progress(clock)
    clock.now += 9
    assert overdue(progress, stall_s=10, limit_s=None) is None
    progress.advance(4)
    clock.now += 9  # 18 s in all, but only 9 s since the last progress
    assert overdue(progress, stall_s=10, limit_s=None) is None
    clock.now += 1
    reason = overdue(progress, stall_s=10, limit_s=None)
    assert reason is not None and "no progress for 10s" in reason and "4 items" in reason


def test_overdue_total_limit_applies_even_while_progressing() -> None:
    clock = FakeClock()
    progress = Progress(clock)
    for _ in range(6):
        clock.now += 5
        progress.advance(1)
    reason = overdue(progress, stall_s=10, limit_s=30)
    assert reason is not None and "over chunk_time_limit 30s" in reason
    assert overdue(progress, stall_s=10, limit_s=None) is None


def test_a_stuck_body_is_abandoned_and_told_so() -> None:
    """The body blocks (as on a hung read); the caller gets ChunkAbandoned and its pool
    slot back while the body is still blocked; once released, the body sees it was
    abandoned (and so writes nothing)."""
    release = threading.Event()
    seen: dict[str, bool] = {}

    def body(progress: Progress) -> str:
        progress.advance(2)
        release.wait(60)
        seen["abandoned"] = progress.abandoned.is_set()
        return "finished"

    progress = Progress()
    with pytest.raises(ChunkAbandoned) as info:
        run_with_deadline(body, stall_s=0.4, limit_s=None, name="t", progress=progress)
    assert "no progress" in info.value.reason
    assert info.value.progress_items == 2
    assert progress.abandoned.is_set() and "abandoned" not in seen
    release.set()
    threads = [t for t in threading.enumerate() if t.name == "mriq-chunk-t"]
    for thread in threads:
        thread.join(10)
    assert seen == {"abandoned": True}


def test_a_body_that_keeps_progressing_runs_past_the_stall_timeout() -> None:
    """On the progress clock the body runs 12 s, six times the 2 s stall timeout, but never
    more than 1 s without progress: it is not abandoned."""
    clock = FakeClock()

    def body(progress: Progress) -> int:
        pause = threading.Event()
        for _ in range(12):
            clock.now += 1
            progress.advance(1)
            pause.wait(0.1)  # real time, so the watchdog gets to look several times
        return progress.items

    progress = Progress(clock)
    assert run_with_deadline(body, stall_s=2, limit_s=None, name="p", progress=progress) == 12
    assert not progress.abandoned.is_set()


def test_errors_and_results_pass_through() -> None:
    def fails(progress: Progress) -> None:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        run_with_deadline(fails, stall_s=5, limit_s=None, name="e")
    assert run_with_deadline(lambda p: 7, stall_s=5, limit_s=10, name="r") == 7
    with pytest.raises(ValueError):
        run_with_deadline(lambda p: 7, stall_s=0, limit_s=None, name="z")
