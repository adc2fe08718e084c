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
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.calibration import entropy
from core.decoding import Batch, ImageFiles, PathStream, background_batches, collate
from core.devices import select_device
from core.model_preparation import prepare_inference_model
from core.transforms import EvalPreset

if TYPE_CHECKING:
    from core.checkpoint import LoadedCheckpoint

__all__ = ["Prediction", "Predictor", "ProbResult"]


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
    #: Shannon entropy (nats) of the calibrated probabilities over all classes, the review
    #: queue's uncertainty; None for an error.
    entropy: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# (path, probabilities over the checkpoint's classes | None, error reason | None)
ProbResult = tuple[str, np.ndarray | None, str | None]


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

    ``forward_model`` runs instead of the prepared torch module (ONNX Runtime, on the CPU).
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
        forward_model: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        # ``forward_model`` replaces the torch module with another runtime of the same model
        # (core.ort_runtime.OrtModel): same preprocessing, same temperature, other kernels.
        self.model: Callable[[torch.Tensor], torch.Tensor] = (
            forward_model
            if forward_model is not None
            else prepare_inference_model(ckpt.model, self.device, fold_batchnorm=fold_batchnorm)
        )
        self._cuda = self.device.type == "cuda"
        self.forward_streams = 1 if self._cuda else forward_streams
        self._amp_dtype = (
            torch.bfloat16 if self._cuda and torch.cuda.is_bf16_supported() else torch.float16
        )

    # ---- core loop ------------------------------------------------------------------

    def _loader(self, paths: Iterable[Path | str]) -> DataLoader[Any]:
        workers = self.num_workers
        return DataLoader(
            ImageFiles(self._transform, hash_inputs=self.hash_inputs, roots=self.roots),
            batch_size=self.batch_size,
            sampler=PathStream(paths),
            num_workers=workers,
            collate_fn=collate,
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
            values: np.ndarray = logits.float().cpu().numpy()
            return values
        # The one place the temperature is applied. Softmax in float32 even under autocast,
        # so probabilities sum to 1 within 1e-6.
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()

    def _batches(
        self, paths: Iterable[Path | str], on_read: Callable[[int | None], None] | None
    ) -> Iterator[Batch]:
        """The decoded batches of ``paths``: from the decode thread or the DataLoader."""
        if on_read is not None and not self.decode_thread:
            raise ValueError("on_read needs the decode thread (decode_thread=True, num_workers=0)")
        return (
            background_batches(
                paths,
                ImageFiles(self._transform, hash_inputs=self.hash_inputs, roots=self.roots),
                self.batch_size,
                # Every stream busy plus the read-ahead asked for.
                self.prefetch_batches + self.forward_streams - 1,
                pin_memory=self._cuda,
                on_read=on_read,
            )
            if self.decode_thread
            else iter(self._loader(paths))
        )

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
        Long on purpose: the in-flight forward streams and the drain on every way out (end,
        stop, error) share local state, and splitting them would turn the one ordered
        pipeline into objects whose invariants span each other.
        """
        batches = self._batches(paths, on_read)
        pool = (
            ThreadPoolExecutor(self.forward_streams, thread_name_prefix="mriq-forward")
            if self.forward_streams > 1
            else None
        )
        # Batches whose forward pass runs (or ran) in the pool, oldest first.
        running: collections.deque[tuple[Batch, Future[np.ndarray] | None]] = collections.deque()
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
                yield from _rows(batch, probs)
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
                # Over the full vector, not the top-k: what the review queue ranks by.
                uncertainty = entropy(probs)
                yield Prediction(path, top[0][0], top[0][1], top, None, digest, uncertainty)
        finally:
            stream.close()


def _rows(
    batch: Batch, probs: np.ndarray | None
) -> Iterator[tuple[str, np.ndarray | None, str | None, str | None]]:
    """A finished batch's rows, in input order: the vector of each decoded input, the error
    of each other one (``probs`` has a row per decoded input only)."""
    row = 0
    for path, error, digest in zip(batch.paths, batch.errors, batch.sha256s, strict=True):
        if error is None:
            assert probs is not None
            yield path, probs[row], None, digest
            row += 1
        else:
            yield path, None, error, digest
