"""The data side of a training run: the seeded split, datasets, sampler and loaders.

Every generator is seeded from the run's seed through :func:`derived_seed`, one stream per
use, so that the data order does not depend on how much randomness anything else drew (and
a resume can restore each generator on its own).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from core.config import TrainConfig
from core.dataset import (
    ImageDataset,
    SplitSamples,
    class_counts,
    format_class_table,
    load_splits,
    make_weighted_sampler,
)
from core.labels import LabelMode
from core.transforms import EvalPreset, PresetParams, TrainPreset

__all__ = ["TrainingData", "TrainingDataError", "derived_seed", "load_training_data"]


class TrainingDataError(ValueError):
    """The data directory cannot support a training run (e.g. too few images per split)."""


@dataclass(frozen=True)
class TrainingData:
    """What one run trains and validates on (generators are mutable: a resume restores
    their state)."""

    splits: SplitSamples
    #: sha256 over the split's (part, path, label) lines: a resume on changed files warns.
    fingerprint: str
    class_table: str
    counts: list[int]
    train_dataset: ImageDataset
    val_dataset: ImageDataset
    sampler_generator: torch.Generator
    sampler: WeightedRandomSampler
    loader_generator: torch.Generator
    train_loader: DataLoader[Any]
    val_generator: torch.Generator
    val_loader: DataLoader[Any]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch per worker (base_seed + id); numpy/random must follow suit or
    # every worker would share one stream.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(seed: int, stream: str) -> int:
    """Independent, stable seeds for the different generators of one run."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def split_fingerprint(splits: SplitSamples) -> str:
    digest = hashlib.sha256()
    for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        for s in part:
            digest.update(f"{name}\t{s.path}\t{s.label}\n".encode())
    return digest.hexdigest()


def _checked_splits(cfg: TrainConfig, mode: LabelMode, log: Callable[[str], None]) -> SplitSamples:
    splits = load_splits(
        cfg.data_dir,
        mode=mode,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        skip_unknown=cfg.skip_unknown,
        on_warning=log,
        roots=cfg.data_roots,
    )
    if len(splits.train) < 2:
        raise TrainingDataError(
            f"{cfg.data_dir}: {len(splits.train)} training image(s) found; "
            "need at least 2 (are the class folders empty or unrecognised?)"
        )
    if not splits.val:
        raise TrainingDataError(
            f"{cfg.data_dir}: the validation split is empty ({len(splits.train)} "
            f"training images, val_fraction={cfg.val_fraction}); add images or a val/ "
            "folder"
        )
    return splits


def _loader(
    dataset: Any, cfg: TrainConfig, pin_memory: bool, generator: torch.Generator, **order: Any
) -> DataLoader[Any]:
    """A loader of ``cfg``'s batch size and workers; ``order`` says how it draws."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker,
        generator=generator,
        **order,
    )


def load_training_data(
    cfg: TrainConfig,
    *,
    mode: LabelMode,
    classes: tuple[str, ...],
    preset: PresetParams,
    pin_memory: bool,
    log: Callable[[str], None],
) -> TrainingData:
    """Split ``cfg.data_dir``, log its class table and build the loaders of the run."""
    splits = _checked_splits(cfg, mode, log)
    class_table = format_class_table(splits, classes)
    log(class_table)
    n_classes = len(classes)
    train_dataset = ImageDataset(
        splits.train, TrainPreset(params=preset), seed=cfg.seed, roots=cfg.data_roots
    )
    # Validation must never see augmentation: the eval preset is deterministic.
    val_dataset = ImageDataset(
        splits.val, EvalPreset(params=preset), seed=cfg.seed, roots=cfg.data_roots
    )
    sampler_generator = torch.Generator().manual_seed(derived_seed(cfg.seed, "sampler"))
    sampler = make_weighted_sampler(
        splits.train, n_classes, oversample=cfg.oversample, generator=sampler_generator
    )
    n_drawn = sampler.num_samples
    # BatchNorm cannot train on a single image: drop the last batch only if it would
    # hold exactly one (the sampler draws with replacement, so nothing is "lost").
    drop_last = n_drawn > cfg.batch_size and n_drawn % cfg.batch_size == 1
    loader_generator = torch.Generator().manual_seed(derived_seed(cfg.seed, "loader"))
    train_loader = _loader(
        train_dataset, cfg, pin_memory, loader_generator, sampler=sampler, drop_last=drop_last
    )
    val_generator = torch.Generator().manual_seed(derived_seed(cfg.seed, "val"))
    val_loader = _loader(val_dataset, cfg, pin_memory, val_generator, shuffle=False)
    return TrainingData(
        splits=splits,
        fingerprint=split_fingerprint(splits),
        class_table=class_table,
        counts=class_counts(splits.train, n_classes),
        train_dataset=train_dataset,
        val_dataset=val_dataset,
        sampler_generator=sampler_generator,
        sampler=sampler,
        loader_generator=loader_generator,
        train_loader=train_loader,
        val_generator=val_generator,
        val_loader=val_loader,
    )
