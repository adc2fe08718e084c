"""A one-file FUSE filesystem whose regular file blocks every read: a hung mount, for real.

Why this exists: the deadline test needs a *regular* file (the worker refuses FIFOs and
symlinks) whose ``read`` never returns, the way a file on a dead NFS server or a wedged
network mount behaves. A FUSE server that never answers READ does exactly that: ``open`` and
``stat`` succeed (S_ISREG, a plausible size), the kernel then waits for the server's reply.

No libfuse or Python binding is installed here (or in CI), so this speaks the kernel's FUSE
protocol on ``/dev/fuse`` directly (``mount(2)`` needs root, which tests and CI have). Only
the few requests a reader sends are answered; everything else gets ENOSYS. Killing the
server process aborts the connection: blocked reads then fail with ENOTCONN, so a test can
always release what it hung.

    python -m tests.faults.hangfs MOUNTPOINT NAME SIZE   # serves until killed
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_OPEN, FUSE_READ = 1, 2, 3, 14, 15
FUSE_RELEASE, FUSE_FLUSH, FUSE_INIT, FUSE_OPENDIR, FUSE_RELEASEDIR = 18, 25, 26, 27, 29
FUSE_ACCESS, FUSE_INTERRUPT, FUSE_DESTROY, FUSE_BATCH_FORGET = 34, 36, 38, 42
FOPEN_DIRECT_IO = 1  # every read() reaches the server: no page cache hides the hang
IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ROOT, FILE = 1, 2
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2


def _attr(ino: int, mode: int, size: int) -> bytes:
    now = int(time.time())
    # ino size blocks atime mtime ctime (ns x3) mode nlink uid gid rdev blksize flags
    return struct.pack(
        "<QQQQQQIIIIIIIIII", ino, size, (size + 511) // 512, now, now, now, 0, 0, 0,
        mode, 1, 0, 0, 0, 4096, 0,
    )  # fmt: skip


def _entry(ino: int, mode: int, size: int) -> bytes:
    # nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec attr
    return struct.pack("<QQQQII", ino, 0, 60, 60, 0, 0) + _attr(ino, mode, size)


def serve(mountpoint: str, name: str, size: int) -> None:
    """Mount and serve until killed; READ of ``name`` is never answered."""
    fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"mriq-hangfs", mountpoint.encode(), b"fuse.mriq-hangfs",
                  MS_NOSUID | MS_NODEV, options) != 0:  # fmt: skip
        err = ctypes.get_errno()
        raise OSError(err, f"mount {mountpoint}: {os.strerror(err)}")
    print("mounted", flush=True)
    dir_mode, file_mode = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644
    while True:
        try:
            request = os.read(fd, 1 << 20)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                continue
            return  # ENODEV: unmounted
        _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
        body = request[IN_HEADER.size :]
        reply: bytes | None = b""
        error = 0
        if opcode == FUSE_INIT:
            major, minor, readahead, _flags = struct.unpack_from("<IIII", body)
            # major minor max_readahead flags max_background congestion max_write
            # time_gran max_pages map_alignment flags2 unused[7]
            reply = struct.pack(
                "<IIIIHHIIHHI7I", 7, min(minor, 31), readahead, 0, 16, 12, 1 << 17, 1, 32, 0, 0,
                *([0] * 7),
            )  # fmt: skip
        elif opcode == FUSE_LOOKUP:
            if nodeid == ROOT and body.rstrip(b"\0").decode() == name:
                reply = _entry(FILE, file_mode, size)
            else:
                error = -errno.ENOENT
        elif opcode == FUSE_GETATTR:
            attr = _attr(ROOT, dir_mode, 0) if nodeid == ROOT else _attr(FILE, file_mode, size)
            reply = struct.pack("<QII", 60, 0, 0) + attr
        elif opcode in (FUSE_OPEN, FUSE_OPENDIR):
            reply = struct.pack("<QII", 1, FOPEN_DIRECT_IO, 0)
        elif opcode == FUSE_READ:
            reply = None  # the hang: never answered
        elif opcode in (FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT):
            reply = None  # no reply expected (an interrupted READ stays unanswered too)
        elif opcode in (FUSE_RELEASE, FUSE_RELEASEDIR, FUSE_FLUSH, FUSE_ACCESS, FUSE_DESTROY):
            reply = b""
        else:
            error = -errno.ENOSYS
        if reply is None:
            continue
        payload = b"" if error else reply
        with contextlib.suppress(OSError):  # the request may have been interrupted
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload)


def unmount(mountpoint: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(str(mountpoint).encode(), MNT_DETACH)


def available() -> str | None:
    """Why a hang filesystem cannot be mounted here, or None when it can."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "mounting FUSE without fusermount needs root"
    return None


@contextlib.contextmanager
def hanging_file(folder: Path, name: str = "stuck.png", size: int = 4096) -> Iterator[Path]:
    """A mount at ``folder`` holding one regular file whose reads block until the block
    exits (the server is killed, which releases every blocked reader, then unmounted)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.hangfs", str(folder), name, str(size)],
        cwd=str(Path(__file__).resolve().parents[2]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace").strip()
        if line != "mounted":
            rest = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
            raise AssertionError(f"hangfs did not mount {folder}: {line} {rest}")
        path = folder / name
        assert stat.S_ISREG(path.stat().st_mode)
        yield path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        unmount(folder)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
