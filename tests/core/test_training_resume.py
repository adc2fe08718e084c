"""Resume from a corrupt ``last.pt`` (issue 13, part 6): fall back to the epoch before, or
start fresh, and say so. Tiny resnet18 runs at 32 px on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.checkpoint import load_checkpoint, read_sidecar, sidecar_path
from core.config import TrainConfig
from core.training import LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, EpochMetrics, train
from tests.factories import make_flat_dataset

pytestmark = pytest.mark.slow

EPOCHS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folders = {"Glioblastoma": 6, "Meningioma": 5}
    return make_flat_dataset(tmp_path_factory.mktemp("resume"), folders=folders, size=40)


def tiny(data_dir: Path, out_dir: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "arch": "resnet18",
        "epochs": EPOCHS,
        "image_size": 32,
        "batch_size": 4,
        "weights": "none",
        "crop": "none",
        "device": "cpu",
        "oversample": 1.0,
        "seed": 0,
        "test_fraction": 0.0,
        "early_stopping_patience": 0,
        "resume": "auto",
    }
    settings.update(overrides)
    return TrainConfig(data_dir=data_dir, out_dir=out_dir, **settings)


def interrupted_after(data_dir: Path, out: Path, epochs: int) -> None:
    """A run stopped after ``epochs`` epochs, as a killed worker leaves it."""
    done: list[EpochMetrics] = []
    part = train(tiny(data_dir, out), on_epoch=done.append, should_stop=lambda: len(done) >= epochs)
    assert part.cancelled and [m.epoch for m in part.epochs] == list(range(1, epochs + 1))


def epoch_of(path: Path) -> int:
    state = load_checkpoint(path).training_state
    assert state is not None
    return int(state["epoch"])


def test_last_checkpoint_keeps_the_epoch_before(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    interrupted_after(data_dir, out, 2)
    assert epoch_of(out / LAST_CHECKPOINT) == 2
    previous = out / PREVIOUS_CHECKPOINT
    assert epoch_of(previous) == 1
    # The moved sidecar verifies the moved file, under its new name.
    digest = read_sidecar(previous)
    assert digest is not None
    load_checkpoint(previous, expected_sha256=digest)
    assert sidecar_path(previous).read_text().split() == [digest, PREVIOUS_CHECKPOINT]


def test_corrupt_last_resumes_from_the_epoch_before(data_dir: Path, tmp_path: Path) -> None:
    full = train(tiny(data_dir, tmp_path / "full"))
    out = tmp_path / "part"
    interrupted_after(data_dir, out, 2)
    last = out / LAST_CHECKPOINT
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn write

    logs: list[str] = []
    resumed = train(tiny(data_dir, out), on_log=logs.append)
    assert not resumed.cancelled
    assert resumed.resumed_from_epoch == 1, logs
    said = "\n".join(logs)
    assert f"{last}: sha256 mismatch" in said and "renamed to last.pt.corrupt" in said
    assert f"resuming from {out / PREVIOUS_CHECKPOINT}" in said
    assert (out / "last.pt.corrupt").is_file()
    assert [m.epoch for m in resumed.epochs] == list(range(1, EPOCHS + 1))
    # Resuming from the epoch before is still an exact resume: the same final weights.
    a = load_checkpoint(full.last_checkpoint).model.state_dict()
    b = load_checkpoint(resumed.last_checkpoint).model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_no_usable_checkpoint_starts_fresh(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    interrupted_after(data_dir, out, 1)
    for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT):
        (out / name).write_bytes(b"not a checkpoint")
        sidecar_path(out / name).unlink()  # no sidecar: the load itself must notice

    logs: list[str] = []
    result = train(tiny(data_dir, out), on_log=logs.append)
    said = "\n".join(logs)
    assert "not a readable checkpoint" in said and "starting fresh" in said
    assert result.resumed_from_epoch == 0 and not result.cancelled
    assert [m.epoch for m in result.epochs] == list(range(1, EPOCHS + 1))
    assert epoch_of(out / LAST_CHECKPOINT) == EPOCHS


def test_explicit_resume_of_a_corrupt_file_fails_naming_it(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    interrupted_after(data_dir, out, 1)
    last = out / LAST_CHECKPOINT
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(ValueError, match="sha256 mismatch") as info:
        train(tiny(data_dir, out, resume=last))
    assert str(last) in str(info.value)
