"""worker.runtime: the model cache and the CPU threads of a task."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.conftest import TinyModel
from worker import runtime


def test_model_cache_loads_once_and_verifies(tiny_model: TinyModel) -> None:
    from core.checkpoint import ChecksumMismatchError

    first = runtime.load_model(str(tiny_model.path), tiny_model.sha256, device="cpu")
    second = runtime.load_model(str(tiny_model.path), tiny_model.sha256, device="cpu")
    assert first is second
    assert first.checkpoint.sha256 == tiny_model.sha256
    assert not first.checkpoint.model.training
    with pytest.raises(ChecksumMismatchError):
        runtime.load_model(str(tiny_model.path), "f" * 64, device="cpu")


def test_model_cache_is_bounded(tiny_model: TinyModel, tmp_path: Path) -> None:
    from dataclasses import replace

    from core.checkpoint import load_checkpoint, save_checkpoint

    base = load_checkpoint(tiny_model.path)
    for i in range(runtime.MODEL_CACHE_SIZE + 1):
        # Different metadata -> different bytes -> a different sha256 (the cache key).
        path = tmp_path / f"m{i}.pt"
        sha = save_checkpoint(path, model=base.model, meta=replace(base.meta, metrics={"i": i}))
        runtime.load_model(str(path), sha, device="cpu")
    assert runtime.cached_model_count() == runtime.MODEL_CACHE_SIZE


def test_threads_per_task() -> None:
    cores = runtime.available_cores()
    assert runtime.threads_per_task(1) == cores
    assert runtime.threads_per_task(cores * 4) == 1


def test_inference_streams_split_the_task_cores_and_training_gets_them_back() -> None:
    import torch

    from core.devices import cpu_parallelism

    before = torch.get_num_threads()
    try:
        split = cpu_parallelism(runtime.threads_per_task(1))
        runtime.configure_threads(1)
        assert runtime.inference_streams("cpu") == split.streams
        assert torch.get_num_threads() == split.threads
        # A training/evaluation task after a classification chunk in the same process
        # gets all of the task's cores again.
        assert runtime.configure_threads() == runtime.threads_per_task(1)
        assert torch.get_num_threads() == runtime.threads_per_task(1)
        # The inference_streams setting, capped at the task's cores.
        assert runtime.inference_streams("cpu", 1) == 1
        assert torch.get_num_threads() == runtime.threads_per_task(1)
        assert runtime.inference_streams("cpu", 999) == runtime.threads_per_task(1)
        assert torch.get_num_threads() == 1
        assert runtime.inference_streams("cuda:0", 4) == 1
        # More concurrent tasks than cores: one stream, one thread each.
        runtime.configure_threads(runtime.available_cores() * 4)
        assert runtime.inference_streams("cpu") == 1
        assert torch.get_num_threads() == 1
    finally:
        runtime.configure_threads(1)
        torch.set_num_threads(before)
