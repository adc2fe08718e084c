"""Presets: shapes, determinism, augmentation only in training, params round trip."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFile

from core.imaging import read_image
from core.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalPreset,
    InferencePreset,
    PresetParams,
    TrainPreset,
)
from tests.core.imagefiles import phantom, write_gray

S = 32
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _asymmetric(h: int = 48, w: int = 40) -> np.ndarray:
    """A slice whose flips and rotations are all distinguishable."""
    img = phantom(h, w, center=(h * 0.5, w * 0.45), radii=(h * 0.35, w * 0.3))
    img[int(h * 0.3) : int(h * 0.45), int(w * 0.3) : int(w * 0.4)] = 1.0  # off-centre lesion
    return img


def _params(**kw: object) -> PresetParams:
    base: dict[str, object] = {"image_size": S, "crop": "none"}
    base.update(kw)
    return PresetParams(**base)  # type: ignore[arg-type]


def _unnormalise(t: torch.Tensor) -> torch.Tensor:
    return t * STD + MEAN


# ----------------------------------------------------------------------- params


def test_params_defaults_match_contract() -> None:
    p = PresetParams()
    assert p.image_size == 224 and p.crop == "brain"
    assert p.rotation_degrees == 15.0 and p.hflip_p == 0.5
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)


def test_params_round_trip_through_json() -> None:
    p = PresetParams(image_size=64, crop="profile", rotation_degrees=7.5, hflip_p=0.25)
    d = json.loads(json.dumps(p.to_dict()))
    assert isinstance(d["mean"], list)
    back = PresetParams.from_dict(d)
    assert back == p
    assert isinstance(back.mean, tuple) and hash(back) == hash(p)
    assert PresetParams.from_dict({}) == PresetParams()


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="unknown"):
        PresetParams.from_dict({"image_size": 32, "colour": "red"})
    for bad in (
        {"image_size": 0},
        {"image_size": 32.0},
        {"crop": "square"},
        {"hflip_p": 1.5},
        {"rotation_degrees": -1.0},
        {"std": (0.2, 0.0, 0.2)},
        {"mean": (0.5, 0.5)},
    ):
        with pytest.raises(ValueError):
            PresetParams(**bad)  # type: ignore[arg-type]
    p = PresetParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.image_size = 10  # type: ignore[misc]


def test_constructors_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        EvalPreset(PresetParams())  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainPreset(PresetParams())  # type: ignore[misc]
    assert InferencePreset is EvalPreset


# ------------------------------------------------------------------------- eval


def test_eval_shape_dtype_and_replicated_channels(tmp_path: Path) -> None:
    img = read_image(write_gray(tmp_path / "a.png", _asymmetric()))
    out = EvalPreset(params=_params(crop="brain"))(img)
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    gray = _unnormalise(out)
    torch.testing.assert_close(gray[0], gray[1])
    torch.testing.assert_close(gray[0], gray[2])
    assert float(gray.min()) >= -1e-5 and float(gray.max()) <= 1 + 1e-5


def test_eval_is_deterministic_for_the_same_file(tmp_path: Path) -> None:
    path = write_gray(tmp_path / "a.jpg", _asymmetric())
    preset = EvalPreset(params=PresetParams(image_size=S))
    first = preset(read_image(path))
    torch.manual_seed(123)  # global RNG state must not matter
    second = EvalPreset(params=PresetParams(image_size=S))(read_image(path))
    assert torch.equal(first, second)


def test_eval_letterboxes_with_black(tmp_path: Path) -> None:
    img = np.full((16, 32), 0.5, np.float32)  # twice as wide as tall
    out = _unnormalise(EvalPreset(params=_params())(img))
    torch.testing.assert_close(out[:, :8, :], torch.zeros(3, 8, S), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 24:, :], torch.zeros(3, 8, S), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 8:24, :], torch.full((3, 16, S), 0.5), atol=1e-5, rtol=0)


def test_eval_never_augments() -> None:
    img = _asymmetric()
    plain = EvalPreset(params=_params(rotation_degrees=0.0, hflip_p=0.0))(img)
    # Augmentation settings exist for training only; evaluation ignores them entirely.
    heavy = EvalPreset(params=_params(rotation_degrees=90.0, hflip_p=1.0))(img)
    assert torch.equal(plain, heavy)
    for _ in range(3):
        assert torch.equal(EvalPreset(params=_params())(img), plain)


def test_eval_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        EvalPreset(params=_params())(np.zeros((8, 8, 3), np.float32))


# ------------------------------------------------------------------------ train


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_train_shape_and_reproducible_with_same_seed() -> None:
    img = _asymmetric()
    preset = TrainPreset(params=_params(crop="brain"))
    a = preset(img, generator=_gen(7))
    b = preset(img, generator=_gen(7))
    assert a.shape == (3, S, S) and a.dtype == torch.float32
    assert torch.equal(a, b)


def test_train_differs_across_seeds() -> None:
    img = _asymmetric()
    preset = TrainPreset(params=_params())
    outs = [preset(img, generator=_gen(seed)) for seed in range(6)]
    distinct = {tuple(o.flatten()[::7].tolist()) for o in outs}
    assert len(distinct) == len(outs)


def test_train_without_augmentation_equals_eval() -> None:
    img = _asymmetric()
    p = _params(rotation_degrees=0.0, hflip_p=0.0, crop="brain")
    assert torch.equal(TrainPreset(params=p)(img, generator=_gen(3)), EvalPreset(params=p)(img))


def test_train_flip_always_with_p_one() -> None:
    img = _asymmetric()
    p = _params(rotation_degrees=0.0, hflip_p=1.0)
    flipped = TrainPreset(params=p)(img, generator=_gen(0))
    assert torch.equal(flipped, EvalPreset(params=p)(img).flip(-1))


def test_train_rotation_stays_within_range() -> None:
    # A centred bright bar: after a rotation by at most 10 degrees the centre row stays
    # bright near the middle and the corners stay black.
    img = np.zeros((S, S), np.float32)
    img[S // 2 - 2 : S // 2 + 2, 4:-4] = 1.0
    p = _params(rotation_degrees=10.0, hflip_p=0.0)
    for seed in range(5):
        out = _unnormalise(TrainPreset(params=p)(img, generator=_gen(seed)))[0]
        assert float(out[S // 2, S // 2]) > 0.9
        assert float(out[0, 0]) < 1e-5 and float(out[-1, -1]) < 1e-5


def test_train_uses_no_global_rng() -> None:
    img = _asymmetric()
    torch_state = torch.get_rng_state()
    np_state = pickle.dumps(np.random.get_state())
    TrainPreset(params=_params())(img, generator=_gen(1))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert pickle.dumps(np.random.get_state()) == np_state


def test_train_advances_the_generator_the_same_way_whatever_the_params() -> None:
    img = _asymmetric()
    g1, g2 = _gen(5), _gen(5)
    TrainPreset(params=_params())(img, generator=g1)
    TrainPreset(params=_params(rotation_degrees=0.0, hflip_p=0.0))(img, generator=g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_presets_pickle_for_dataloader_workers() -> None:
    img = _asymmetric()
    preset = TrainPreset(params=_params())
    clone = pickle.loads(pickle.dumps(preset))
    assert torch.equal(clone(img, generator=_gen(2)), preset(img, generator=_gen(2)))
    ev = pickle.loads(pickle.dumps(EvalPreset(params=_params())))
    assert torch.equal(ev(img), EvalPreset(params=_params())(img))


def test_importing_transforms_keeps_truncated_loading_off() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
