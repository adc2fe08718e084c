"""Per-process worker state: the model cache, CPU threads, the janitor
and the recovery sweep (``worker/recovery.py``).

Everything here is created lazily *per process id*: a prefork child must never reuse the
parent's database connections (two processes on one socket corrupt the protocol) nor a torch
thread pool created before the fork (OpenMP/MKL pools do not survive ``fork``; the child
deadlocks or runs single-threaded). So the parent never runs a torch op: ``worker.tasks``
imports ``core`` (and therefore torch) inside the task bodies only, and threads are set up in
``worker_process_init`` (prefork children) or the worker's own start-up (solo/threads).

Allocator: glibc returns freed memory above ``M_MMAP_THRESHOLD`` to the kernel with
``munmap``/``madvise`` after every batch, and faulting it back in on the next batch costs 2-3x
inference/training throughput on CPU. ``mallopt`` reads ``MALLOC_MMAP_MAX_`` and
``MALLOC_TRIM_THRESHOLD_`` only when the process starts, so they cannot be set from here;
``python -m worker`` therefore re-execs itself with them set when they are missing (see
``worker/__main__.py``). A worker started some other way (``celery -A worker.app worker``)
runs correctly, just slower on CPU; :func:`allocator_tuned` reports which case applies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps
from celery.signals import worker_process_init

from worker.appsettings import settings_of

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from core.checkpoint import LoadedCheckpoint
    from core.explanation import Explainer
    from scheduler.settings import Settings
    from worker.recovery import Sweeper

log = logging.getLogger(__name__)

#: Environment ``python -m worker`` sets before re-exec'ing (see the module docstring).
ALLOCATOR_ENV: dict[str, str] = {
    # Never serve big allocations with mmap: they would be unmapped on free.
    "MALLOC_MMAP_MAX_": "0",
    # Keep up to 1 GiB of freed heap instead of trimming it back to the kernel per batch.
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}

#: Checkpoints kept loaded per process; two lets a classify job on the new production model
#: overlap with stragglers on the previous one without reloading on every chunk.
MODEL_CACHE_SIZE = 2


def allocator_tuned() -> bool:
    return all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())


# --------------------------------------------------------------------------------------
# CPU threads
# --------------------------------------------------------------------------------------

_threads_pid: int | None = None
_concurrency = 1


def available_cores() -> int:
    """The CPUs this process may use, as core counts them (affinity/cpuset aware)."""
    from core.cpus import available_cpus

    return available_cpus()


def threads_per_task(concurrency: int) -> int:
    """Cores split evenly between the tasks that can run at once (at least one each)."""
    return max(1, available_cores() // max(1, concurrency))


def configure_threads(concurrency: int | None = None, *, per: int = 1) -> int:
    """Set torch's intra-op threads for this process's tasks; returns the count.

    A task's cores (:func:`threads_per_task`) are divided by ``per``: 1 for training and
    evaluation (one stream of work), the forward-stream count for bulk classification
    (:func:`inference_streams`). Called by every task before its torch work, since tasks of
    both kinds share the process. Imports torch, so never call it in a prefork parent.
    """
    global _threads_pid, _concurrency
    if concurrency is not None:
        _concurrency = max(1, concurrency)
    n = max(1, threads_per_task(_concurrency) // max(1, per))
    import torch

    if _threads_pid == os.getpid():
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n
    torch.set_num_threads(n)
    # Inter-op parallelism only helps graphs with independent branches; one thread avoids
    # oversubscribing the cores the intra-op pool already uses. It can only be set before
    # the first parallel op; later it raises, which is harmless.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    _threads_pid = os.getpid()
    log.info(
        "torch threads: %d (cores %d, concurrency %d, allocator tuned: %s)",
        n,
        available_cores(),
        _concurrency,
        allocator_tuned(),
    )
    return n


def inference_streams(device: str, requested: int | None = None) -> int:
    """Forward streams for a bulk-classification task on ``device``; sets the threads.

    On CPU, ``requested`` (the ``inference_streams`` setting) or else the split
    ``core.devices.cpu_parallelism`` picks for the task's cores (one stream per 4 cores);
    never more streams than the task has cores. A GPU runs one stream.
    """
    if device.split(":")[0] != "cpu":
        configure_threads()
        return 1
    from core.devices import cpu_parallelism

    cores = threads_per_task(_concurrency)
    split = cpu_parallelism(cores, streams=None if requested is None else min(requested, cores))
    configure_threads(per=split.streams)
    return split.streams


_in_pool_child = False


def pool_enforces_time_limits() -> bool:
    """True in a prefork pool child, where Celery kills a task over its hard time limit;
    solo/threads pools enforce none (worker/liveness.py does it there)."""
    return _in_pool_child


@worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    global _in_pool_child
    # A prefork child: forget anything inherited from the parent before the first task.
    _in_pool_child = True
    _reset_after_fork()
    configure_threads()
    # Import the inference stack now, while the child starts, rather than in its first
    # task: that import takes seconds on a busy host and would count against the first
    # chunk's hard time limit (chunk_time_limit).
    import core.checkpoint  # noqa: F401
    import core.inference  # noqa: F401


def _reset_after_fork() -> None:
    global _threads_pid
    _threads_pid = None
    with _models_lock:
        _models.clear()
        _explainers.clear()
        _ort_models.clear()
    # Session factories are keyed by pid (worker/sessions.py): nothing to reset for them.


# --------------------------------------------------------------------------------------
# Model cache
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedModel:
    sha256: str
    checkpoint: LoadedCheckpoint
    device: str


_models_lock = threading.Lock()
_models: OrderedDict[tuple[str, str], CachedModel] = OrderedDict()


def load_model(path: str, sha256: str, *, device: str = "cpu") -> CachedModel:
    """The checkpoint at ``path``, verified against ``sha256``, loaded once per process.

    Keyed by sha256 (not path): a checkpoint overwritten in place is a different model and
    fails verification instead of silently serving stale weights.
    """
    from core.devices import select_device

    # "auto" -> the concrete device, so the cache key and load_checkpoint agree.
    device = str(select_device(device))
    key = (sha256, device)
    with _models_lock:
        cached = _models.get(key)
        if cached is not None:
            _models.move_to_end(key)
            return cached
    from pathlib import Path

    from core.checkpoint import load_checkpoint

    # Loaded outside the lock (seconds for big models); a rare double load under the threads
    # pool only costs time.
    ckpt = load_checkpoint(Path(path), expected_sha256=sha256, device=device)
    ckpt.model.eval()
    entry = CachedModel(sha256=sha256, checkpoint=ckpt, device=device)
    with _models_lock:
        _models[key] = entry
        _models.move_to_end(key)
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
    return entry


@dataclass(frozen=True)
class CachedExplainer:
    """A Grad-CAM explainer of a cached model, with the lock its callers take: captum hooks
    the explainer's one model copy per call, so two threads must not explain at once."""

    explainer: Explainer
    lock: threading.Lock


_explainers: OrderedDict[tuple[str, str, tuple[str, ...] | None], CachedExplainer] = OrderedDict()

#: Items per Grad-CAM batch (one forward and one backward pass each).
EXPLAIN_BATCH_SIZE = 16


def load_explainer(model: CachedModel, *, roots: Sequence[Path] | None) -> CachedExplainer:
    """The explainer of ``model`` (loaded by :func:`load_model`), built once per process:
    it keeps its own frozen copy of the weights, which is worth building only once."""
    from core.explanation import Explainer

    # The roots are part of the key: the explainer confines its reads to them.
    key = (model.sha256, model.device, None if roots is None else tuple(str(r) for r in roots))
    with _models_lock:
        cached = _explainers.get(key)
        if cached is not None:
            _explainers.move_to_end(key)
            return cached
    explainer = Explainer(
        model.checkpoint, device=model.device, batch_size=EXPLAIN_BATCH_SIZE, roots=roots
    )
    entry = CachedExplainer(explainer=explainer, lock=threading.Lock())
    with _models_lock:
        entry = _explainers.setdefault(key, entry)
        _explainers.move_to_end(key)
        while len(_explainers) > MODEL_CACHE_SIZE:
            _explainers.popitem(last=False)
    return entry


_ort_models: OrderedDict[tuple[str, int], Any] = OrderedDict()


def load_ort_model(model: CachedModel, checkpoint_path: str, *, threads: int) -> Any:
    """The ONNX Runtime session of ``model`` (a ``core.ort_runtime.OrtModel``), built once
    per process; the ONNX file is exported on first use and cached beside the checkpoint."""
    from core.ort_runtime import OrtModel, cached_onnx_export

    key = (model.sha256, threads)
    with _models_lock:
        cached = _ort_models.get(key)
        if cached is not None:
            _ort_models.move_to_end(key)
            return cached
    entry = OrtModel(cached_onnx_export(model.checkpoint, checkpoint_path), threads=threads)
    with _models_lock:
        entry = _ort_models.setdefault(key, entry)
        while len(_ort_models) > MODEL_CACHE_SIZE:
            _ort_models.popitem(last=False)
    return entry


def cached_model_count() -> int:
    with _models_lock:
        return len(_models)


# --------------------------------------------------------------------------------------
# Worker bootsteps
# --------------------------------------------------------------------------------------

#: How often (seconds) a worker deletes consumed/stale files of the filesystem broker.
JANITOR_INTERVAL_S = 30.0


class _RuntimeStep(bootsteps.StartStopStep):
    """Threads for solo/threads pools (tasks run in this process) and the broker janitor."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        global _concurrency
        super().__init__(worker, **kwargs)
        # Set before the Pool step starts: prefork children inherit it at fork time and size
        # their torch threads from it in worker_process_init.
        _concurrency = max(1, int(getattr(worker, "concurrency", 1) or 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sweeper: Sweeper | None = None
        from scheduler.schema import utcnow

        # Before the consumer takes any task: chunks stamped under our node name before
        # this instant were held by a previous incarnation (worker/recovery.py).
        self._started = utcnow()

    def start(self, worker: Any) -> None:
        pool_cls = getattr(worker, "pool_cls", None)
        pool_name = getattr(pool_cls, "__module__", "") + "." + getattr(pool_cls, "__name__", "")
        if "prefork" not in pool_name:
            # Tasks run in this very process: configure threads now, before the first task.
            configure_threads(_concurrency)
        from scheduler.dispatch import uses_filesystem_broker

        settings = settings_of(worker.app)
        # Recovery of work whose worker died (heartbeats go stale): one sweep now, at
        # start-up, then periodically; see worker/recovery.py.
        from worker.recovery import Identity, Sweeper, recovery_of

        identity = Identity(hostname=str(worker.hostname), started=self._started)
        self._sweeper = Sweeper(settings, recovery_of(worker.app), identity)
        self._sweeper.start()
        if uses_filesystem_broker(settings):
            self._thread = threading.Thread(
                target=self._janitor, args=(settings,), name="mriq-broker-janitor", daemon=True
            )
            self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _janitor(self, settings: Settings) -> None:
        # kombu never deletes claimed (processed) files nor messages for dead pidbox/event
        # queues; see scheduler.dispatch.clean_filesystem_broker.
        from scheduler.dispatch import clean_filesystem_broker

        while not self._stop.is_set():
            try:
                removed = clean_filesystem_broker(settings)
                if removed:
                    log.debug("broker janitor removed %d message files", removed)
            except Exception:  # never let housekeeping kill the worker
                log.exception("broker janitor failed")
            self._stop.wait(JANITOR_INTERVAL_S)


def install_bootsteps(app: Celery) -> None:
    app.steps["worker"].add(_RuntimeStep)
