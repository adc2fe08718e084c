"""The decode pipeline of inference: input paths streamed into preprocessed, collated batches.

A sampler whose keys are the paths themselves feeds a map-style dataset that opens, hashes
and decodes one file per key, never raising for it (an unreadable file is an error item),
so neither the path list nor the results are ever materialised. With ``num_workers=0`` a
background thread decodes ahead of the forward pass, bounded by ``prefetch_batches``.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from core.errors import ImageReadError
from core.imaging import DecodedImage, read_open_image_reduced
from core.safefile import open_input
from core.transforms import EvalPreset

__all__ = ["Batch", "ImageFiles", "PathStream", "background_batches", "collate", "input_sha256"]


class PathStream(Sampler[str]):
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
Item = tuple[str, torch.Tensor | None, str | None, str | None]


class ImageFiles(Dataset[Item]):
    """Map-style dataset keyed by path: reads and preprocesses one file, never raises for it.

    Each file is opened once (:func:`core.safefile.open_input`, confined to ``roots`` when
    given) and that one descriptor is both hashed and decoded: the sha256 is of the bytes
    that were classified, not of whatever the name pointed at a moment later. With
    ``hash_inputs`` the hash is taken here, where the decoding happens (a loader process or
    the decode thread), off the forward pass's thread.

    ``min_decode_side`` goes to :func:`core.imaging.read_open_image_reduced` (JPEGs decoded
    at a reduced scale that keeps both sides >= it; an :class:`~core.transforms.EvalPreset`
    is told the reduction, so the crop's padding scales with it). ``None``, the default,
    decodes at full size, and the predictor does not pass it yet: the reduced decode is a
    third of the decode's cost but not the same pixels (mean |difference| 0.003-0.012 at 224 px),
    and on a tightly fitted test model it moved a few top-1 labels (issue 14).
    """

    def __init__(
        self,
        transform: Callable[[np.ndarray], torch.Tensor],
        *,
        hash_inputs: bool = False,
        roots: Sequence[Path | str] | None = None,
        min_decode_side: int | None = None,
    ) -> None:
        self._transform = transform
        self._hash_inputs = hash_inputs
        self._roots = None if roots is None else tuple(roots)
        self._preset = transform if isinstance(transform, EvalPreset) else None
        self._min_decode_side = min_decode_side

    def __getitem__(self, key: str) -> Item:
        path = Path(key)
        try:
            fh = open_input(path, roots=self._roots)
        except ImageReadError as exc:
            return key, None, exc.reason, None  # refused before any byte was read
        digest: str | None = None
        img: DecodedImage | None = None
        try:
            with fh:
                digest = _file_sha256(fh) if self._hash_inputs else None
                img = read_open_image_reduced(fh, path, min_decode_side=self._min_decode_side)
        except ImageReadError as exc:
            return key, None, exc.reason, digest
        except OSError as exc:
            # Seeking or closing a file whose server went away (FUSE, NFS) fails outside the
            # decoder: still this file's error row, never the chunk's. A file decoded before
            # its close failed is kept.
            if img is None:
                return key, None, f"cannot read file: {exc.strerror or exc}", None
        try:
            if self._preset is not None:
                return key, self._preset(img.pixels, reduction=img.reduction), None, digest
            return key, self._transform(img.pixels), None, digest
        except (ValueError, RuntimeError, TypeError, OSError) as exc:
            # A decodable but pathological image (e.g. degenerate after cropping) must cost
            # one error row, not the batch.
            return key, None, f"preprocessing failed: {type(exc).__name__}: {exc}", digest


@dataclass
class Batch:
    paths: list[str]
    images: torch.Tensor | None  # the readable items only, stacked
    errors: list[str | None]  # one per path; None where the image is in ``images``
    sha256s: list[str | None]  # one per path

    def pin_memory(self) -> Batch:
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


def collate(batch: list[Item]) -> Batch:
    """Stacks the readable items of a batch (module-level so worker processes can pickle it)."""
    tensors = [t for _, t, _, _ in batch if t is not None]
    return Batch(
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


def background_batches(
    paths: Iterable[Path | str],
    dataset: ImageFiles,
    batch_size: int,
    depth: int,
    *,
    pin_memory: bool = False,
    on_read: Callable[[int | None], None] | None = None,
) -> Iterator[Batch]:
    """Batches of ``dataset[path]`` in input order, built by one background thread.

    The thread pulls ``paths`` lazily (so the caller's iterable is only ever iterated by
    that thread) and keeps at most ``depth`` finished batches queued. Errors raised while
    iterating ``paths`` (a missing ``@list`` file, ...) are re-raised here; per-file
    errors never raise (``ImageFiles`` turns them into error items). ``on_read(i)`` is
    called in the thread before the i-th input is read and ``on_read(None)`` after it.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        if pin_memory and isinstance(item, Batch):
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
            items: list[Item] = []
            for position, p in enumerate(paths):
                if stop.is_set():
                    return
                if on_read is not None:
                    on_read(position)
                items.append(dataset[str(p)])
                if on_read is not None:
                    on_read(None)
                if len(items) >= batch_size:
                    if not put(collate(items)):
                        return
                    items = []
            if items and not put(collate(items)):
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
