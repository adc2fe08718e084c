"""A real ``mriq api`` process (uvicorn) for tests that measure the server from outside."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import stop_process

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ApiProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status_kib(self, field: str) -> int:
        """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for pid {self.proc.pid}")


def api_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MRIQ_")}
    base["PYTHONPATH"] = str(REPO)
    base.update(env)
    return base


@contextlib.contextmanager
def running_api(env: dict[str, str], cwd: Path, *args: str) -> Iterator[ApiProcess]:
    """``python -m scheduler api --port <free> args`` until the block ends; waits for
    ``/health`` to answer (any status: a degraded broker still serves)."""
    port = free_port()
    log_path = cwd / f"api-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "api", "--port", str(port), *args],
            cwd=cwd, env=api_env(env), stdout=log, stderr=subprocess.STDOUT,
        )
    api = ApiProcess(proc, port, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mriq api exited {proc.returncode}:\n{api.log()}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(api.url + "/health", timeout=5)
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"mriq api did not answer in {START_TIMEOUT_S}s:\n{api.log()}")
            time.sleep(0.2)
        yield api
    finally:
        stop_process(proc)


def raw_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> int | None:
    """POST ``body`` over a plain socket; the response status, or None when the server
    closed the connection without one.

    The body goes out from a thread while this thread reads, because a server may answer
    (and stop reading) before the body is sent: a client that only reads after sending
    would block on a full socket buffer.
    """
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall("\r\n".join(head).encode("latin-1"))

        def send_body() -> None:
            view = memoryview(body)
            with contextlib.suppress(OSError):
                for start in range(0, len(view), 65536):
                    sock.sendall(view[start:start + 65536])

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        received = b""
        try:
            while b"\r\n" not in received:
                data = sock.recv(4096)
                if not data:
                    break
                received += data
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=60)
    if not received.startswith(b"HTTP/1.1 "):
        return None
    return int(received.split(b" ", 2)[1])
