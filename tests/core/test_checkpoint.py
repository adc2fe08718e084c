"""Checkpoints: round trip of weights + meta + training state, sha256 sidecar, verification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    ChecksumMismatchError,
    current_versions,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
    state_dict_sha256,
)
from core.labels import CLASSES_15
from core.models import build_model
from core.transforms import PresetParams


def _meta(**overrides: object) -> CheckpointMeta:
    fields: dict[str, object] = {
        "arch": "resnet18",
        "classes": CLASSES_15,
        "label_mode": "15",
        "preset": PresetParams(image_size=64, crop="profile", rotation_degrees=10.0),
        "config": {"epochs": 2, "data_dir": "/data"},
        "metrics": {"val_macro_f1": 0.5, "epoch": 2},
    }
    fields.update(overrides)
    return CheckpointMeta(**fields)  # type: ignore[arg-type]


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 15, weights="none")


def test_round_trip(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "sub" / "model.pt"
    state: dict[str, Any] = {
        "epoch": 3,
        "history": [{"epoch": 1, "loss": 0.5}],
        "rng": torch.get_rng_state(),
    }
    digest = save_checkpoint(path, model=model, meta=_meta(), training_state=state)
    assert digest == file_sha256(path)
    assert (tmp_path / "sub" / "model.pt.sha256").read_text() == f"{digest}  model.pt\n"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    rng_before = torch.get_rng_state()
    loaded = load_checkpoint(path, expected_sha256=digest)
    # Loading rebuilds a model but must not disturb the caller's random stream.
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert loaded.sha256 == digest
    assert not loaded.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    meta = loaded.meta
    assert meta.arch == "resnet18" and meta.classes == CLASSES_15 and meta.label_mode == "15"
    assert meta.preset == PresetParams(image_size=64, crop="profile", rotation_degrees=10.0)
    assert meta.config == {"epochs": 2, "data_dir": "/data"}
    assert meta.metrics == {"val_macro_f1": 0.5, "epoch": 2}
    assert meta.versions == current_versions()
    assert set(meta.versions) == {"torch", "torchvision", "mriq"}
    assert meta.weights_sha256 == state_dict_sha256(model.state_dict())
    assert loaded.training_state is not None
    assert loaded.training_state["epoch"] == 3
    assert torch.equal(loaded.training_state["rng"], state["rng"])


def test_without_training_state(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, model=model, meta=_meta())
    assert load_checkpoint(path).training_state is None


def test_checksum_mismatch(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, model=model, meta=_meta())
    with pytest.raises(ChecksumMismatchError) as info:
        load_checkpoint(path, expected_sha256="0" * 64)
    assert info.value.actual == digest and str(path) in str(info.value)
    # Flip one byte: the recorded digest no longer matches.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        load_checkpoint(path, expected_sha256=digest)


def test_weights_hash_ignores_metadata(tmp_path: Path, model: torch.nn.Module) -> None:
    a = save_checkpoint(tmp_path / "a.pt", model=model, meta=_meta())
    b = save_checkpoint(tmp_path / "b.pt", model=model, meta=_meta(metrics={"other": 1}))
    assert a != b
    assert (
        load_checkpoint(tmp_path / "a.pt").meta.weights_sha256
        == load_checkpoint(tmp_path / "b.pt").meta.weights_sha256
    )


def test_bad_files_raise_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not an mriq checkpoint"):
        load_checkpoint(plain)


def test_meta_validation() -> None:
    with pytest.raises(ValueError):
        _meta(label_mode="16")
    with pytest.raises(ValueError, match="distinct"):
        _meta(classes=("a", "a"))


def test_calibration_round_trips(tmp_path: Path, model: torch.nn.Module) -> None:
    from core.calibration import Calibration

    cal = Calibration(temperature=1.8, calibrated=True, n=40, val_nll=0.4, val_ece=0.03)
    save_checkpoint(tmp_path / "c.pt", model=model, meta=_meta(calibration=cal))
    assert load_checkpoint(tmp_path / "c.pt").meta.calibration == cal


def test_checkpoint_from_before_calibration_loads_with_temperature_one(
    tmp_path: Path, model: torch.nn.Module
) -> None:
    from core.calibration import Calibration

    # The file layout written before calibration existed: a meta without "calibration".
    meta = _meta().to_dict()
    meta.pop("calibration", None)
    path = tmp_path / "old.pt"
    torch.save(
        {
            "format": "mriq-checkpoint",
            "format_version": 1,
            "meta": meta,
            "model_state": model.state_dict(),
            "training_state": None,
        },
        path,
    )
    loaded = load_checkpoint(path)
    assert loaded.meta.calibration == Calibration()
    assert loaded.meta.calibration.temperature == 1.0
    assert loaded.meta.calibration.calibrated is False
    assert loaded.meta.to_dict()["calibration"]["calibrated"] is False
