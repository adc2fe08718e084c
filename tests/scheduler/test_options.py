"""Training options derived from ``core.config.TrainConfig``: the model, its refusals, and
what the API and the CLI read from it. Pure Python: no database, no torch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.config import ARCHITECTURES, TrainConfig, option, option_fields
from scheduler.api_models import TrainRequest
from scheduler.options import (
    EXPLAIN_MODES,
    REVIEW_BELOW_DEFAULT,
    TrainOptions,
    option_bounds,
    option_choices,
    option_default,
    option_help,
    option_names,
    options_model,
    validate_classify_options,
    validate_train_options,
)
from scheduler.refusals import InvalidOptionsError


@dataclass(frozen=True)
class _WithDropout(TrainConfig):
    dropout: float = option(0.2, "Dropout before the head.", ge=0, le=0.9)
    # Not an option: a field without option metadata stays out of the job options.
    internal: int = 7


def test_a_new_option_field_appears_in_the_options_model() -> None:
    model = options_model(_WithDropout)
    assert "dropout" in model.model_fields and "internal" not in model.model_fields
    assert model.model_fields["dropout"].default == 0.2
    assert model.model_fields["dropout"].description == "Dropout before the head."
    assert model(dropout=0.5).model_dump()["dropout"] == 0.5
    with pytest.raises(ValidationError, match="less than or equal to 0.9"):
        model(dropout=0.95)
    assert "dropout" not in TrainOptions.model_fields  # TrainConfig itself is unchanged


def test_options_are_the_option_fields_of_train_config_plus_the_job_systems() -> None:
    config_options = [f.name for f in option_fields(TrainConfig)]
    assert list(option_names()) == [*config_options, "warm_start", "with_reviews",
                                    "reviews_from"]
    assert {"optimizer", "data_dir", "out_dir", "resume"}.isdisjoint(option_names())
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name in config_options:
        expected = None if name == "device" else defaults[name]  # None: the settings' one
        assert option_default(name) == expected, name
    assert option_default("warm_start") is False
    assert option_default("with_reviews") is False and option_default("reviews_from") is None


def test_cli_reads_help_bounds_and_choices() -> None:
    assert option_choices("arch") == ARCHITECTURES
    assert option_choices("labels") == ("15", "44")
    assert option_choices("epochs") == ()
    assert option_bounds("epochs") == (1, 10_000)
    assert option_bounds("image_size") == (32, 2048)
    assert option_bounds("lr") == (0, 10)
    assert option_help("lr") == "Learning rate."
    assert "cuda:N" in option_help("device")
    with pytest.raises(KeyError):
        option_help("optimizer")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "vgg16"}, f"arch: 'vgg16' is not one of {', '.join(ARCHITECTURES)}"),
        ({"epochs": 0}, "epochs: must be between 1 and 10000, not 0"),
        ({"epochs": True}, "epochs: must be an integer, not True"),
        ({"epochs": "5"}, "epochs: must be an integer, not '5'"),
        ({"image_size": 8}, "image_size: must be between 32 and 2048, not 8"),
        ({"batch_size": 5000}, "batch_size: must be between 1 and 4096, not 5000"),
        ({"seed": 2**32}, "seed: must be between 0 and 4294967295, not 4294967296"),
        ({"lr": 0}, "lr: must be a number in (0, 10], not 0"),
        ({"lr": True}, "lr: must be a number in (0, 10], not True"),
        ({"lr": float("nan")}, "lr: must be a number in (0, 10], not nan"),
        ({"labels": "12"}, "labels: must be 15 or 44, not '12'"),
        ({"finetune": "yes"}, "finetune: must be true or false, not 'yes'"),
        ({"warm_start": 1}, "warm_start: must be true or false, not 1"),
        ({"weights": ""}, "weights: must be auto, none, imagenet or a path, not ''"),
        ({"device": "tpu"}, "device: must be one of auto, cpu, cuda, mps or cuda:N, not 'tpu'"),
        (
            {"optimizer": "sgd"},
            "unknown training option(s): optimizer; known: arch, batch_size, device, epochs, "
            "finetune, image_size, labels, lr, reviews_from, seed, warm_start, weights, "
            "with_reviews",
        ),
    ],
)
def test_submission_refusals_keep_their_messages(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidOptionsError) as caught:
        validate_train_options(options, roots=[tmp_path])
    assert str(caught.value) == message


def test_valid_options_are_completed_and_normalised(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    out = validate_train_options(
        {"lr": 1, "labels": 44, "device": None, "weights": str(weights)},
        roots=[tmp_path],
        default_device="cuda:1",
    )
    assert out == {
        "arch": "efficientnet_b0", "epochs": 10, "image_size": 224, "batch_size": 32,
        "lr": 1.0, "finetune": False, "weights": str(weights), "labels": "44", "seed": 0,
        "device": "cuda:1", "warm_start": False, "with_reviews": False, "reviews_from": None,
    }
    assert isinstance(out["lr"], float)
    with pytest.raises(InvalidOptionsError, match="no such checkpoint file"):
        validate_train_options({"weights": str(tmp_path / "nope.pt")}, roots=[tmp_path])


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        ({"arch": "vgg"}, "Input should be 'efficientnet_b0', 'efficientnet_b3'"),
        ({"epochs": 0}, "Input should be greater than or equal to 1"),
        ({"image_size": 4096}, "Input should be less than or equal to 2048"),
        ({"lr": 0}, "Input should be greater than 0"),
        ({"labels": "12"}, "Input should be '15' or '44'"),
        ({"device": "tpu"}, "String should match pattern"),
        ({"weights": "a\x00b"}, "Value error, must not contain NUL characters"),
        ({"optimizer": "sgd"}, "Extra inputs are not permitted"),
    ],
)
def test_api_request_refusals_keep_their_messages(body: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainRequest.model_validate({"data": "d", **body})
    assert caught.value.errors()[0]["msg"].startswith(msg)


def test_api_request_is_the_options_plus_data() -> None:
    assert set(TrainRequest.model_fields) == {*option_names(), "data"}
    # JSON is parsed laxly (a JSON "5" is 5 epochs), unlike Python callers of submission.
    assert TrainRequest.model_validate({"data": "d", "epochs": "5"}).model_dump()["epochs"] == 5


def test_review_options_of_a_train_job(tmp_path: Path) -> None:
    plain = validate_train_options({}, roots=[tmp_path])
    assert plain["with_reviews"] is False and plain["reviews_from"] is None
    chosen = validate_train_options({"with_reviews": True}, roots=[tmp_path])
    assert chosen["with_reviews"] is True and chosen["reviews_from"] is None
    # The reviews of one classify job are reviews too: reviews_from implies with_reviews.
    one_job = validate_train_options({"reviews_from": 7}, roots=[tmp_path])
    assert one_job["with_reviews"] is True and one_job["reviews_from"] == 7
    for bad in (0, "7", True, 2.5):
        with pytest.raises(InvalidOptionsError, match="^reviews_from: must be the id of a "):
            validate_train_options({"reviews_from": bad}, roots=[tmp_path])
    with pytest.raises(InvalidOptionsError, match="^with_reviews: must be true or false"):
        validate_train_options({"with_reviews": "yes"}, roots=[tmp_path])


def test_classify_options_are_checked_and_named() -> None:
    assert validate_classify_options() == {"top_k": 3, "review_below": REVIEW_BELOW_DEFAULT,
                                           "explain": "none"}
    assert validate_classify_options(top_k=5, review_below=0, explain="uncertain") == {
        "top_k": 5, "review_below": 0.0, "explain": "uncertain"}
    assert EXPLAIN_MODES == ("none", "uncertain", "all")
    for kwargs, name in [({"top_k": 0}, "top_k"), ({"top_k": True}, "top_k"),
                         ({"review_below": 1.5}, "review_below"),
                         ({"review_below": -0.1}, "review_below"),
                         ({"review_below": float("nan")}, "review_below"),
                         ({"review_below": True}, "review_below"),
                         ({"explain": "some"}, "explain")]:
        with pytest.raises(InvalidOptionsError, match=f"^{name}: "):
            validate_classify_options(**kwargs)  # type: ignore[arg-type]
