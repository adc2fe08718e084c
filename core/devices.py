"""Where inference and training run: the torch device, and how a CPU's cores are shared out
between torch's thread pool and concurrent forward streams."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from core.cpus import available_cpus

__all__ = [
    "MAX_FORWARD_STREAMS",
    "CpuParallelism",
    "DeviceUnavailableError",
    "configure_cpu_threads",
    "cpu_parallelism",
    "select_device",
]


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine."""


def select_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``; ``"cuda"`` / ``"cuda:N"``.

    Asking for CUDA on a machine without it is an error rather than a silent CPU fallback:
    a job sized for a GPU would otherwise run for hours on CPU without anyone noticing.
    """
    if isinstance(spec, torch.device):
        device = spec
    else:
        text = str(spec).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ValueError(f"unknown device {spec!r}: use auto, cpu or cuda[:N]") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {str(device)!r}: use auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {str(device)!r} requested but CUDA is not available on this machine "
            "(no GPU, no driver, or a CPU-only torch build); use --device cpu or auto"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device {str(device)!r} requested but only {torch.cuda.device_count()} "
            "CUDA device(s) are visible"
        )
    return device


def configure_cpu_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count to ``n`` (default: the CPUs this process may use).

    Why this exists: torch's OpenMP/MKL thread pools are not fork-safe. A prefork parent
    (a Celery prefork master, a DataLoader parent about to fork workers) that has already
    run a multithreaded torch op hands its children a pool whose threads no longer exist,
    and the children can deadlock on the first parallel op. So parents should keep torch
    single-threaded (``configure_cpu_threads(1)``) or not touch torch before forking, and
    each child calls this *after* the fork to size its own pool. Oversubscription is the
    other reason: N worker processes x all-cores threads each thrash the CPU.

    Returns the number of threads now in use.
    """
    threads = available_cpus() if n is None else int(n)
    if threads < 1:
        raise ValueError(f"thread count must be >= 1, not {n}")
    torch.set_num_threads(threads)
    # The inter-op pool can only be sized once per process, before any parallel work
    # started; later calls raise RuntimeError, which is harmless to ignore here.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(max(1, min(threads, 4)))
    return torch.get_num_threads()


#: More concurrent forward streams than this gain nothing measurable and each one holds a
#: batch's activations; wider machines give each stream more intra-op threads instead.
MAX_FORWARD_STREAMS = 4


@dataclass(frozen=True)
class CpuParallelism:
    """How ``cores`` are split for CPU inference: ``streams`` x ``threads`` per stream."""

    streams: int
    threads: int


def cpu_parallelism(cores: int | None = None, *, streams: int | None = None) -> CpuParallelism:
    """The CPU inference split for ``cores`` (default: the CPUs this process may use).

    ``streams`` as asked, or by default one forward stream per 4 cores, up to
    :data:`MAX_FORWARD_STREAMS`; the cores are shared out between them: 2 -> 1x2, 4 -> 1x4,
    8 -> 2x4, 16 -> 4x4. Apply ``threads`` with :func:`configure_cpu_threads` and pass
    ``streams`` to :class:`Predictor`.

    Why one stream on small machines: on the 2-core bench machine 2 streams x 1 thread were
    ~20% faster than 1 x 2 in one hour and 5% slower in the next, and each extra stream
    adds a batch's activations (+800 MB for EfficientNet-B0 at bs 32) and a longer pipeline
    drain at every chunk's end. Intra-op scaling falls off past ~4 threads for a 32-image
    batch, which is where extra streams pay (OpenVINO's throughput streams, the same idea).
    """
    n = available_cpus() if cores is None else int(cores)
    if n < 1:
        raise ValueError(f"cores must be >= 1, not {cores}")
    if streams is None:
        streams = max(1, min(n // 4, MAX_FORWARD_STREAMS))
    elif streams < 1:
        raise ValueError(f"streams must be >= 1, not {streams}")
    return CpuParallelism(streams=streams, threads=max(1, n // streams))
