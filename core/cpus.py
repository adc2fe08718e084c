"""The CPUs this process may use: the one CPU count of mriq. Torch-free, so a prefork
parent (the Celery master) can size its pools without importing torch."""

from __future__ import annotations

import os

__all__ = ["available_cpus"]


def available_cpus() -> int:
    """The CPUs this process may use: the one CPU count of mriq (workers size pools by it)."""
    # sched_getaffinity honours taskset/cgroup cpusets (containers); cpu_count does not.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
