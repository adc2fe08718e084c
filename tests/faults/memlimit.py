"""A memory cgroup with a hard limit, on cgroup v2 or v1, for the OOM-kill fault tests.

Exceeding the limit makes the *kernel* OOM killer SIGKILL the biggest process in the group,
exactly what a container memory limit does. cgroup v2 (``memory.max``) is used where a v2
hierarchy has the memory controller (most CI runners and current distributions); the v1
memory controller (``memory.limit_in_bytes``) otherwise. A process joins by writing its pid
to :attr:`MemoryGroup.procs` (the test's wrapper shell does, then execs the worker).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")


@dataclass(frozen=True)
class MemoryGroup:
    path: Path
    version: int

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int:
        """How often the limit was hit (v1: failcnt) or the OOM killer ran here (v2)."""
        if self.version == 1:
            return int((self.path / "memory.failcnt").read_text())
        for line in (self.path / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def _v2_roots() -> list[Path]:
    roots = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                roots.append(Path(fields[1]))
    return roots


def _make_v2(name: str, limit: int) -> MemoryGroup | None:
    for root in _v2_roots():
        controllers = root / "cgroup.controllers"
        if not controllers.is_file() or "memory" not in controllers.read_text().split():
            continue
        try:
            # The root of a hierarchy may hold processes and still delegate controllers.
            (root / "cgroup.subtree_control").write_text("+memory")
            group = root / name
            group.mkdir()
        except OSError:
            continue
        try:
            (group / "memory.max").write_text(str(limit))
            with contextlib.suppress(OSError):  # absent without swap accounting
                (group / "memory.swap.max").write_text("0")
        except OSError:
            group.rmdir()
            continue
        return MemoryGroup(group, 2)
    return None


def _make_v1(name: str, limit: int) -> MemoryGroup | None:
    if not (V1_ROOT / "cgroup.procs").is_file():
        return None
    group = V1_ROOT / name
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        return None
    return MemoryGroup(group, 1)


def _release(group: MemoryGroup) -> None:
    parent = group.path.parent / "cgroup.procs"
    with contextlib.suppress(OSError):
        for pid in group.procs.read_text().split():
            with contextlib.suppress(OSError), open(parent, "w") as fh:  # noqa: PTH123
                fh.write(pid)
    with contextlib.suppress(OSError):
        group.path.rmdir()


@contextlib.contextmanager
def memory_group(name: str, limit: int) -> Iterator[MemoryGroup | None]:
    """A fresh group limited to ``limit`` bytes (v2 first, then v1), or None where neither
    can be created; processes left in it are moved out and the group removed afterwards."""
    group = _make_v2(name, limit) or _make_v1(name, limit)
    try:
        yield group
    finally:
        if group is not None:
            _release(group)


def join_and_exec(group: MemoryGroup) -> list[str]:
    """A wrapper command: the shell joins ``group``, then execs the real command."""
    return ["sh", "-c", f'echo $$ > {group.procs} && exec "$@"', "sh"]
