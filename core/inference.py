"""Streaming batch inference with a loaded checkpoint.

Design notes (why it looks like this):

* **Flat memory for any number of inputs.** Inputs are pulled lazily from the caller's
  iterable by a sampler whose "indices" are the paths themselves, and a map-style dataset
  reads the file named by each key. ``DataLoader`` only ever asks the sampler for the
  batches it has in flight (1 with ``num_workers=0``, ``num_workers * prefetch_factor``
  otherwise), so neither the path list nor the results are ever materialised: a job of
  10 million files uses the memory of a few batches.
* **Order and workers.** With ``num_workers > 0`` the workers receive keys from the main
  process through the loader's index queues and the loader re-orders finished batches
  (``in_order=True``), so output order equals input order without any worker having to
  re-iterate the input (a generator over a DB cursor cannot be shared across processes).
* **Decoding overlaps the forward pass.** With ``num_workers=0`` (the default, and what the
  worker uses) a background thread reads and preprocesses the next batches while the model
  runs on the current one. Pillow's decoder, numpy and torch's resize release the GIL, so on
  a small CPU the thread costs far less than a worker process (no fork, no tensor IPC) and
  never forks a process whose torch thread pool is already running. The read-ahead is
  bounded (``prefetch_batches``), so memory stays flat.
* **One result per input.** Unreadable files do not raise: the worker returns the error's
  reason and the file becomes an error row; the rest of its batch is still classified.
* **Several forward streams on a CPU.** One batch run by N intra-op threads makes every
  thread wait at each layer's barrier for the slowest one, and any preprocessing that takes
  a core stalls all of them. ``forward_streams`` threads instead run whole batches side by
  side, each with fewer intra-op threads (:func:`cpu_parallelism` picks the split; the
  caller sets torch's thread count, which is process-wide; one stream per 4 cores by
  default). Results are still yielded in input order.
* **The model is prepared once.** :func:`prepare_inference_model` folds every BatchNorm
  into the convolution before it (in eval mode BN is a fixed per-channel affine map, so the
  folded convolution computes the same function up to float rounding; ~1.2x on
  EfficientNet-B0 on CPU), then moves it to the device in channels-last layout. The result
  is cached per (model, device), so the worker's per-chunk predictors share one copy.
* **Evaluation preset only.** Images go through ``EvalPreset(params=ckpt.meta.preset)``:
  deterministic, no augmentation, identical to what validation saw during training.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader, Dataset, Sampler

from core.errors import ImageReadError
from core.imaging import read_open_image
from core.safefile import open_input
from core.transforms import EvalPreset

if TYPE_CHECKING:
    from core.checkpoint import LoadedCheckpoint

__all__ = [
    "CpuParallelism",
    "DeviceUnavailableError",
    "Prediction",
    "Predictor",
    "configure_cpu_threads",
    "cpu_parallelism",
    "input_sha256",
    "prepare_inference_model",
    "select_device",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The outcome for one input. Either ``label``/``confidence``/``top_k`` or ``error`` is set."""

    path: str
    label: str | None
    confidence: float | None
    top_k: tuple[tuple[str, float], ...]
    error: str | None
    #: sha256 of the file's bytes when the predictor hashes inputs (``hash_inputs=True``);
    #: None otherwise, or when the file could not be read.
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# (path, probabilities over the checkpoint's classes | None, error reason | None)
ProbResult = tuple[str, np.ndarray | None, str | None]


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


def _available_cpus() -> int:
    # sched_getaffinity honours taskset/cgroup cpusets (containers); cpu_count does not.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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
    threads = _available_cpus() if n is None else int(n)
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
    n = _available_cpus() if cores is None else int(cores)
    if n < 1:
        raise ValueError(f"cores must be >= 1, not {cores}")
    if streams is None:
        streams = max(1, min(n // 4, MAX_FORWARD_STREAMS))
    elif streams < 1:
        raise ValueError(f"streams must be >= 1, not {streams}")
    return CpuParallelism(streams=streams, threads=max(1, n // streams))


# --------------------------------------------------------------------------------------
# data loading


class _PathStream(Sampler[str]):
    """A sampler whose keys are the input paths, pulled lazily from the caller's iterable."""

    def __init__(self, paths: Iterable[Path | str]) -> None:
        self._paths = paths

    def __iter__(self) -> Iterator[str]:
        for p in self._paths:
            yield str(p)


def input_sha256(path: Path | str, *, roots: Sequence[Path | str] | None = None) -> str | None:
    """sha256 of an input file's bytes, or None when it cannot be read (the error row says why).

    The file is opened by :func:`core.safefile.open_input`: non-blocking with an ``S_ISREG``
    check on the descriptor (``open()`` on a FIFO named x.jpg blocks until a writer appears,
    and a device file never ends), and confined to ``roots`` when they are given, so only
    regular files inside them are hashed.
    """
    try:
        with open_input(path, roots=roots) as fh:
            return _file_sha256(fh)
    except (ImageReadError, OSError):
        return None


def _file_sha256(fh: io.BufferedReader) -> str | None:
    try:
        return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


# (path, tensor 3xSxS | None, error reason | None, sha256 | None)
_Item = tuple[str, torch.Tensor | None, str | None, str | None]


class _ImageFiles(Dataset[_Item]):
    """Map-style dataset keyed by path: reads and preprocesses one file, never raises for it.

    Each file is opened once (:func:`core.safefile.open_input`, confined to ``roots`` when
    given) and that one descriptor is both hashed and decoded: the sha256 is of the bytes
    that were classified, not of whatever the name pointed at a moment later. With
    ``hash_inputs`` the hash is taken here, where the decoding happens (a loader process or
    the decode thread), off the forward pass's thread.
    """

    def __init__(
        self,
        transform: Callable[[np.ndarray], torch.Tensor],
        *,
        hash_inputs: bool = False,
        roots: Sequence[Path | str] | None = None,
    ) -> None:
        self._transform = transform
        self._hash_inputs = hash_inputs
        self._roots = None if roots is None else tuple(roots)

    def __getitem__(self, key: str) -> _Item:  # type: ignore[override]
        path = Path(key)
        try:
            fh = open_input(path, roots=self._roots)
        except ImageReadError as exc:
            return key, None, exc.reason, None  # refused before any byte was read
        digest: str | None = None
        img: np.ndarray | None = None
        try:
            with fh:
                digest = _file_sha256(fh) if self._hash_inputs else None
                img = read_open_image(fh, path)
        except ImageReadError as exc:
            return key, None, exc.reason, digest
        except OSError as exc:
            # Seeking or closing a file whose server went away (FUSE, NFS) fails outside the
            # decoder: still this file's error row, never the chunk's. A file decoded before
            # its close failed is kept.
            if img is None:
                return key, None, f"cannot read file: {exc.strerror or exc}", None
        try:
            return key, self._transform(img), None, digest
        except (ValueError, RuntimeError, TypeError, OSError) as exc:
            # A decodable but pathological image (e.g. degenerate after cropping) must cost
            # one error row, not the batch.
            return key, None, f"preprocessing failed: {type(exc).__name__}: {exc}", digest


@dataclass
class _Batch:
    paths: list[str]
    images: torch.Tensor | None  # the readable items only, stacked
    errors: list[str | None]  # one per path; None where the image is in ``images``
    sha256s: list[str | None]  # one per path

    def pin_memory(self) -> _Batch:
        # DataLoader's pin_memory thread calls this on custom batch types.
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def _stack_channels_last(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` laid out channels-last, in one copy per image.

    The model runs channels-last: building the batch that way here (in the decode thread or
    a loader process) spares the forward pass's thread a whole-batch layout conversion.
    """
    first = tensors[0]
    if first.dim() != 3:
        return torch.stack(tensors)
    out = torch.empty(
        (len(tensors), *first.shape), dtype=first.dtype, memory_format=torch.channels_last
    )
    for i, t in enumerate(tensors):
        if t.shape != first.shape:  # copy_ would broadcast; stack's error is the right one
            return torch.stack(tensors)
        out[i].copy_(t)
    return out


def _collate(batch: list[_Item]) -> _Batch:
    """Stacks the readable items of a batch (module-level so worker processes can pickle it)."""
    tensors = [t for _, t, _, _ in batch if t is not None]
    return _Batch(
        paths=[p for p, _, _, _ in batch],
        images=_stack_channels_last(tensors) if tensors else None,
        errors=[e if t is None else None for _, t, e, _ in batch],
        sha256s=[h for _, _, _, h in batch],
    )


class _Failure:
    """An exception raised in the decode thread, re-raised in the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()
#: How long the consumer waits for the decode thread to finish its current file on close.
_JOIN_TIMEOUT_S = 30.0


def _background_batches(
    paths: Iterable[Path | str],
    dataset: _ImageFiles,
    batch_size: int,
    depth: int,
    *,
    pin_memory: bool = False,
    on_read: Callable[[int | None], None] | None = None,
) -> Iterator[_Batch]:
    """Batches of ``dataset[path]`` in input order, built by one background thread.

    The thread pulls ``paths`` lazily (so the caller's iterable is only ever iterated by
    that thread) and keeps at most ``depth`` finished batches queued. Errors raised while
    iterating ``paths`` (a missing ``@list`` file, ...) are re-raised here; per-file
    errors never raise (``_ImageFiles`` turns them into error items). ``on_read(i)`` is
    called in the thread before the i-th input is read and ``on_read(None)`` after it.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        if pin_memory and isinstance(item, _Batch):
            item.pin_memory()
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            items: list[_Item] = []
            for position, p in enumerate(paths):
                if stop.is_set():
                    return
                if on_read is not None:
                    on_read(position)
                items.append(dataset[str(p)])
                if on_read is not None:
                    on_read(None)
                if len(items) >= batch_size:
                    if not put(_collate(items)):
                        return
                    items = []
            if items and not put(_collate(items)):
                return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failure(exc))

    thread = threading.Thread(target=produce, name="mriq-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=_JOIN_TIMEOUT_S)


# --------------------------------------------------------------------------------------
# model preparation

_prepared_lock = threading.Lock()
# original model -> {device: prepared model}; weak keys: a checkpoint evicted from the
# worker's cache takes its prepared copies with it.
_prepared: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm folded into the conv that feeds it.

    Eval-mode BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one
    conv with rescaled weights and a shifted bias. Which BatchNorm reads which conv's output
    is found by one probe forward pass with hooks on the copy's own modules, not by tracing:
    torch.fx patches ``nn.Module`` for the whole process while it traces, so a model being
    prepared in one worker thread broke the forward passes running in the others (and could
    leave the patch behind). The folded copy must then reproduce the unfolded one on the
    probe; a model where it does not (a conv output also used elsewhere, say) is used
    unfolded: slower, never wrong.
    """
    plain = copy.deepcopy(model).eval()
    name = type(model).__name__
    probe = _probe_input(plain)
    if probe is None:
        return plain
    try:
        pairs = _conv_bn_pairs(plain, probe)
        if not pairs:
            return plain
        folded = copy.deepcopy(plain)
        for conv_name, bn_name in pairs:
            conv = folded.get_submodule(conv_name)
            bn = folded.get_submodule(bn_name)
            assert isinstance(conv, nn.modules.conv._ConvNd)
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            _replace_submodule(folded, conv_name, fuse_conv_bn_eval(conv, bn))
            _replace_submodule(folded, bn_name, nn.Identity())
        with torch.no_grad():
            expected, got = plain(probe), folded(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means "keep the model as it is"
        _log.warning(
            "BatchNorm folding skipped for %s (%s: %s); running the model unfolded",
            name,
            type(exc).__name__,
            exc,
        )
        return plain
    if not (
        isinstance(expected, torch.Tensor)
        and isinstance(got, torch.Tensor)
        and got.shape == expected.shape
        and torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    ):
        _log.warning(
            "BatchNorm folding skipped for %s (the folded copy does not reproduce the "
            "model's outputs); running the model unfolded",
            name,
        )
        return plain
    return folded


def _probe_input(model: nn.Module) -> torch.Tensor | None:
    """A small batch for the probe pass: 2 images of 64x64 with the first conv's channels."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return None
    param = next(model.parameters(), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, first.in_channels, 64, 64, generator=gen)
    return x if param is None else x.to(dtype=param.dtype, device=param.device)


def _conv_bn_pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where the BatchNorm reads the conv's output as is.

    Only modules that run exactly once in the probe pass qualify (a shared module would have
    one fold applied to all its uses), the output must reach the BatchNorm unmodified (same
    tensor object, same version: no in-place op in between) and the shapes must match. A
    conv output that is also read elsewhere is not visible here; the caller's output check
    catches that case.
    """
    calls: collections.Counter[str] = collections.Counter()
    outputs: dict[int, tuple[str, torch.Tensor, int]] = {}  # id -> (conv, tensor, version)
    found: list[tuple[str, str]] = []
    handles = []

    def on_conv(conv_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls[conv_name] += 1
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (conv_name, out, out._version)

        return hook

    def on_bn(bn_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls[bn_name] += 1
            x = args[0] if args else None
            hit = outputs.get(id(x))
            if hit is not None and hit[1] is x and x._version == hit[2]:
                found.append((hit[0], bn_name))

        return hook

    for mod_name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            handles.append(module.register_forward_hook(on_conv(mod_name)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(on_bn(mod_name)))
    try:
        # no_grad, not inference_mode: inference tensors have no version counter.
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    pairs: list[tuple[str, str]] = []
    used: set[str] = set()
    for conv_name, bn_name in found:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(conv, nn.modules.conv._ConvNd)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        if (
            calls[conv_name] == 1
            and calls[bn_name] == 1
            and conv_name not in used
            and bn.running_mean is not None
            and bn.running_var is not None
            and bn.num_features == conv.out_channels
        ):
            pairs.append((conv_name, bn_name))
            used.add(conv_name)
    return pairs


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def prepare_inference_model(
    model: nn.Module, device: torch.device, *, fold_batchnorm: bool = True
) -> nn.Module:
    """``model`` ready for inference on ``device``: eval mode, BatchNorm folded, channels-last.

    The input model is left as it is (a copy is prepared), so a checkpoint can still be
    trained or saved afterwards. Prepared copies are cached per (model, device,
    fold_batchnorm): building predictors for many chunks of a job costs one preparation.
    """
    key = f"{device}|{'fold' if fold_batchnorm else 'plain'}"
    # Held while preparing: two chunk tasks of one job starting together in a threads-pool
    # worker prepare the model once, and the second gets the first's copy. The model itself
    # is only read (deep-copied), never switched between train and eval here.
    with _prepared_lock:
        cached = _prepared.get(model, {}).get(key)
        if cached is not None:
            return cached
        prepared = _fold_batchnorm(model) if fold_batchnorm else copy.deepcopy(model)
        prepared.eval()
        for p in prepared.parameters():
            p.requires_grad_(False)
        # channels_last is the fast layout for cuDNN tensor cores and oneDNN on CPU alike.
        prepared = prepared.to(device).to(memory_format=torch.channels_last)
        _prepared.setdefault(model, {})[key] = prepared
        return prepared


# --------------------------------------------------------------------------------------
# predictor


class Predictor:
    """Classifies image files with a loaded checkpoint; create once, call :meth:`predict` often.

    The checkpoint's model is prepared once by :func:`prepare_inference_model` (a cached
    copy on ``device``: eval mode, BatchNorm folded unless ``fold_batchnorm=False``,
    channels-last); ``ckpt.model`` itself is not changed. ``device`` accepts ``"auto"``,
    ``"cpu"``, ``"cuda[:N]"`` or a ``torch.device``.

    ``forward_streams`` > 1 runs that many batches through the model at once, each in its
    own thread (see module notes; :func:`cpu_parallelism` gives the CPU split, and torch's
    thread count should be set to its ``threads``). On CUDA one stream is used whatever is
    asked: kernels of one device queue behind each other anyway.

    ``roots`` confines every input when it is read (see :mod:`core.safefile`): a file that
    leads outside them, or is not a regular file, gets an error row and no sha256.
    """

    def __init__(
        self,
        ckpt: LoadedCheckpoint,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        num_workers: int = 0,
        top_k: int = 3,
        decode_thread: bool = True,
        prefetch_batches: int = 2,
        fold_batchnorm: bool = True,
        hash_inputs: bool = False,
        forward_streams: int = 1,
        roots: Sequence[Path | str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, not {num_workers}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, not {top_k}")
        if prefetch_batches < 1:
            raise ValueError(f"prefetch_batches must be >= 1, not {prefetch_batches}")
        if forward_streams < 1:
            raise ValueError(f"forward_streams must be >= 1, not {forward_streams}")
        self.meta = ckpt.meta
        self.classes: tuple[str, ...] = tuple(ckpt.meta.classes)
        # Temperature scaling (core.calibration): every probability this class reports is
        # softmax(logits / T); 1.0 for a checkpoint trained before calibration existed.
        self.temperature = float(ckpt.meta.calibration.temperature)
        self.device = select_device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        # Only without loader processes: with them, decoding already runs elsewhere.
        self.decode_thread = bool(decode_thread) and num_workers == 0
        self.prefetch_batches = prefetch_batches
        self.top_k = min(top_k, len(self.classes))
        self._transform = EvalPreset(params=ckpt.meta.preset)
        # Each Prediction then carries its file's sha256, taken where the file is decoded.
        self.hash_inputs = bool(hash_inputs)
        # Confinement at read time (the worker passes MRIQ_DATA_ROOTS): a file swapped for a
        # link leading outside, or for a FIFO, after submission gets an error row instead of
        # being read. None (python -m core.predict) confines nothing.
        self.roots: tuple[Path | str, ...] | None = None if roots is None else tuple(roots)
        self.model = prepare_inference_model(ckpt.model, self.device, fold_batchnorm=fold_batchnorm)
        self._cuda = self.device.type == "cuda"
        self.forward_streams = 1 if self._cuda else forward_streams
        self._amp_dtype = (
            torch.bfloat16 if self._cuda and torch.cuda.is_bf16_supported() else torch.float16
        )

    # ---- core loop ------------------------------------------------------------------

    def _loader(self, paths: Iterable[Path | str]) -> DataLoader[Any]:
        workers = self.num_workers
        return DataLoader(
            _ImageFiles(self._transform, hash_inputs=self.hash_inputs, roots=self.roots),
            batch_size=self.batch_size,
            sampler=_PathStream(paths),
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self._cuda,
            # Bounded read-ahead: this, not the input size, is what sets the memory use.
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
        )

    def _forward(self, images: torch.Tensor, raw: bool = False) -> np.ndarray:
        """Calibrated probabilities of a batch, or its raw logits with ``raw``."""
        x = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        autocast = (
            torch.autocast("cuda", dtype=self._amp_dtype)
            if self._cuda
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            logits = self.model(x)
        if raw:
            return logits.float().cpu().numpy()
        # The one place the temperature is applied. Softmax in float32 even under autocast,
        # so probabilities sum to 1 within 1e-6.
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()

    def _stream(
        self,
        paths: Iterable[Path | str],
        should_stop: Callable[[], bool] | None,
        on_batch: Callable[[int], None] | None,
        raw: bool = False,
        on_read: Callable[[int | None], None] | None = None,
    ) -> Generator[tuple[str, np.ndarray | None, str | None, str | None], None, None]:
        """(path, probs | None, error | None, sha256 | None) per input, in input order.

        With ``raw`` the vectors are the model's logits instead of calibrated probabilities.
        """
        if on_read is not None and not self.decode_thread:
            raise ValueError("on_read needs the decode thread (decode_thread=True, num_workers=0)")
        batches: Iterator[_Batch] = (
            _background_batches(
                paths,
                _ImageFiles(self._transform, hash_inputs=self.hash_inputs, roots=self.roots),
                self.batch_size,
                # Every stream busy plus the read-ahead asked for.
                self.prefetch_batches + self.forward_streams - 1,
                pin_memory=self._cuda,
                on_read=on_read,
            )
            if self.decode_thread
            else iter(self._loader(paths))
        )
        pool = (
            ThreadPoolExecutor(self.forward_streams, thread_name_prefix="mriq-forward")
            if self.forward_streams > 1
            else None
        )
        # Batches whose forward pass runs (or ran) in the pool, oldest first.
        running: collections.deque[tuple[_Batch, Future[np.ndarray] | None]] = collections.deque()
        try:
            exhausted = False
            while True:
                while not exhausted and len(running) < self.forward_streams:
                    if should_stop is not None and should_stop():
                        exhausted = True
                        break
                    try:
                        batch = next(batches)
                    except StopIteration:
                        exhausted = True
                        break
                    # Without a pool (one stream) the forward pass runs below, on this thread.
                    future = (
                        pool.submit(self._forward, batch.images, raw)
                        if pool is not None and batch.images is not None
                        else None
                    )
                    running.append((batch, future))
                if not running:
                    return
                batch, future = running.popleft()
                if future is not None:
                    probs: np.ndarray | None = future.result()
                elif batch.images is not None:
                    probs = self._forward(batch.images, raw)
                else:
                    probs = None
                # Reported before the rows are yielded so that it fires for every finished
                # batch even when the consumer stops pulling mid-batch.
                if on_batch is not None:
                    on_batch(len(batch.paths))
                row = 0
                for path, error, digest in zip(
                    batch.paths, batch.errors, batch.sha256s, strict=True
                ):
                    if error is None:
                        assert probs is not None
                        yield path, probs[row], None, digest
                        row += 1
                    else:
                        yield path, None, error, digest
        finally:
            if pool is not None:
                # Forward passes not started yet are dropped; running ones finish (a batch
                # takes well under a second) so no thread outlives the stream.
                for _, pending in running:
                    if pending is not None:
                        pending.cancel()
                pool.shutdown(wait=True)
            # Stop worker processes (or the decode thread) now, also when the consumer
            # abandons the generator.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            del batches

    def predict_proba(
        self,
        paths: Iterable[Path | str],
        *,
        should_stop: Callable[[], bool] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[ProbResult]:
        """Yield ``(path, probs | None, error | None)`` per input, in input order.

        ``probs`` is a float32 vector over ``self.classes``. ``should_stop()`` is checked
        before each batch; when it returns True the stream ends early (already yielded
        results stay valid; with ``forward_streams`` > 1 the batches already running
        are still yielded, nothing after them). ``on_batch(n)`` is called once per batch
        with its size, after the forward pass and before that batch's results are yielded.
        """
        stream = self._stream(paths, should_stop, on_batch)
        try:
            for path, probs, error, _ in stream:
                yield path, probs, error
        finally:
            stream.close()

    def predict_logits(
        self,
        paths: Iterable[Path | str],
        *,
        should_stop: Callable[[], bool] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[ProbResult]:
        """As :meth:`predict_proba` but yielding the raw (uncalibrated) float32 logits.

        For evaluation, which reports calibration before and after the temperature.
        """
        stream = self._stream(paths, should_stop, on_batch, raw=True)
        try:
            for path, logits, error, _ in stream:
                yield path, logits, error
        finally:
            stream.close()

    def predict(
        self,
        paths: Iterable[Path | str],
        *,
        should_stop: Callable[[], bool] | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_read: Callable[[int | None], None] | None = None,
    ) -> Iterator[Prediction]:
        """Stream one :class:`Prediction` per input, in input order (see module notes).

        ``on_read(i)`` is called in the decode thread right before the i-th input (0-based)
        is read and preprocessed, ``on_read(None)`` right after: whoever must know which
        file a process was decoding when it died (a native crash) records it there.
        """
        k = self.top_k
        stream = self._stream(paths, should_stop, on_batch, on_read=on_read)
        try:
            for path, probs, error, digest in stream:
                if probs is None:
                    yield Prediction(path, None, None, (), error or "unknown error", digest)
                    continue
                # Stable sort: equal probabilities rank by class index, as argmax does.
                order = np.argsort(-probs, kind="stable")[:k]
                top = tuple((self.classes[int(i)], float(probs[i])) for i in order)
                yield Prediction(path, top[0][0], top[0][1], top, None, digest)
        finally:
            stream.close()
