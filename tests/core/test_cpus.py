"""core.cpus: the one CPU count honours the process's CPU affinity (taskset, cpusets)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core.cpus import available_cpus


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_available_cpus_follows_the_affinity_mask_not_the_machine() -> None:
    assert available_cpus() == len(os.sched_getaffinity(0))
    one = min(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{one}}}); "
        "import sys; import core.cpus as c; "
        "sys.exit(0 if c.available_cpus() == 1 and 'torch' not in sys.modules else 1)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), check=False)
    assert done.returncode == 0  # one CPU allowed, and counted without importing torch
