"""TrainConfig: defaults, normalisation, validation and the JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.config import ARCHITECTURES, TrainConfig


def make(**overrides: Any) -> TrainConfig:
    return TrainConfig(data_dir=Path("data"), out_dir=Path("out"), **overrides)


def test_defaults_follow_the_contract() -> None:
    cfg = make()
    assert cfg.arch == "efficientnet_b0" == ARCHITECTURES[0]
    assert (cfg.epochs, cfg.image_size, cfg.batch_size) == (10, 224, 32)
    assert (cfg.optimizer, cfg.scheduler, cfg.clip) == ("adamw", "onecycle", "norm")
    assert (cfg.weights, cfg.labels, cfg.device, cfg.resume) == ("auto", "15", "auto", None)
    assert cfg.weighted_loss and cfg.oversample == 2.0 and cfg.early_stopping_patience == 5
    assert cfg.amp and cfg.channels_last and not cfg.finetune and cfg.init_checkpoint is None


def test_normalises_types() -> None:
    cfg = TrainConfig(data_dir="data", out_dir="out", labels=44, lr=1, resume="auto",  # type: ignore[arg-type]
                      init_checkpoint="w.pt")  # type: ignore[arg-type]
    assert cfg.data_dir == Path("data") and cfg.out_dir == Path("out")
    assert cfg.labels == "44"
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert cfg.resume == "auto" and cfg.resume_auto
    assert cfg.init_checkpoint == Path("w.pt")
    assert make(resume="runs/last.pt").resume == Path("runs/last.pt")


def test_round_trip_is_json_safe() -> None:
    cfg = make(arch="resnet18", labels="44", resume=Path("x/last.pt"), scheduler="cosine",
               init_checkpoint=Path("init.pt"), early_stopping_patience=0)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["data_dir"] == "data" and data["resume"] == "x/last.pt"
    assert TrainConfig.from_dict(data) == cfg
    assert TrainConfig.from_dict(make().to_dict()) == make()


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        make().epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"arch": "vgg16"}, "arch"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"image_size": 8}, "image_size"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"scheduler": "linear"}, "scheduler"),
        ({"clip": "both"}, "clip"),
        ({"clip_value": 0.0}, "clip_value"),
        ({"labels": "16"}, "labels"),
        ({"device": "tpu"}, "device"),
        ({"crop": "square"}, "crop"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "val_fraction + test_fraction"),
        ({"hflip_p": 1.5}, "hflip_p"),
        ({"rotation_degrees": -1}, "rotation_degrees"),
        ({"early_stopping_patience": -1}, "early_stopping_patience"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"weights": " "}, "weights"),
        ({"resume": ""}, "resume"),
        ({"finetune": "yes"}, "finetune"),
        ({"oversample": 0}, "oversample"),
    ],
)
def test_rejects_invalid_values(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("+", r"\+")):
        make(**overrides)


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    data = make().to_dict()
    with pytest.raises(ValueError, match="unknown TrainConfig field.*lr_max"):
        TrainConfig.from_dict({**data, "lr_max": 1.0})
    del data["out_dir"]
    with pytest.raises(ValueError, match="missing TrainConfig field.*out_dir"):
        TrainConfig.from_dict(data)
