"""Training options of a train job: derived from ``core.config.TrainConfig``, never copied.

Every ``TrainConfig`` field declared with ``core.config.option(...)`` is a job option: its
default, choices, bounds and help come from there, so adding one to ``TrainConfig`` adds it
to :data:`TrainOptions` (the API's request body), to :func:`validate_train_options` (job
submission) and to what the CLI reads here (:func:`option_help`, :func:`option_default`,
:func:`option_bounds`, :func:`option_choices`). The job system adds what only it knows: a
device may name a GPU index (``cuda:N``) and defaults to ``settings.default_device``,
``weights`` is a path confined to the data roots, ``warm_start``, and the review options
``with_reviews``/``reviews_from`` (train on the review queue's decisions too).

A classify job's options live here as well (:func:`validate_classify_options`): ``top_k``,
``review_below`` (``scheduler.review.check_review_below``) and ``explain``
(:data:`EXPLAIN_MODES`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import Field as DataclassField
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from core.config import OptionSpec, TrainConfig, option_fields, option_spec
from scheduler.paths import confine
from scheduler.pathtext import PathText, check_text
from scheduler.refusals import InvalidOptionsError
from scheduler.review import ReviewError, check_review_below
from scheduler.schema import REVIEW_BELOW_DEFAULT

__all__ = [
    "EXPLAIN_MODES",
    "JOB_DEVICES",
    "MAX_TOP_K",
    "REVIEW_BELOW_DEFAULT",
    "ExplainMode",
    "TrainOptions",
    "option_bounds",
    "option_choices",
    "option_default",
    "option_help",
    "option_names",
    "options_model",
    "refusal",
    "validate_classify_options",
    "validate_train_options",
]

#: What a classify job explains with Grad-CAM: nothing, exactly the predictions that enter
#: the review queue (error-free, confidence below ``review_below``), or every prediction.
EXPLAIN_MODES: tuple[str, ...] = ("none", "uncertain", "all")
ExplainMode = Literal["none", "uncertain", "all"]
#: A classify job keeps at most this many labels per image (the 44-class label space).
MAX_TOP_K = 44

#: Devices a train job may ask for, besides ``cuda:N`` (the worker maps them onto
#: TrainConfig's auto/cpu/cuda).
JOB_DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
_DEVICE_PATTERN = r"^(auto|cpu|cuda|mps|cuda:\d{1,3})$"
_WEIGHT_KEYWORDS = ("auto", "none", "imagenet")

# The job system's own view of some TrainConfig options, and its options TrainConfig lacks.
_JOB_SPECS: dict[str, OptionSpec] = {
    "device": OptionSpec(
        help="auto, cpu, cuda or cuda:N (default: settings.default_device).",
        allowed=f"one of {', '.join(JOB_DEVICES)} or cuda:N",
    ),
    "warm_start": OptionSpec(help="Start from the production model's weights."),
    "with_reviews": OptionSpec(
        help="Add the reviewed predictions (the review queue's decisions) to the data."
    ),
    "reviews_from": OptionSpec(
        help="Only the reviews of this classify job (implies with_reviews).",
        ge=1, allowed="the id of a classify job",
    ),
}
_JOB_FIELDS: dict[str, tuple[Any, Any]] = {
    "device": (
        str | None,
        Field(None, max_length=16, pattern=_DEVICE_PATTERN,
              description=_JOB_SPECS["device"].help),
    ),
    "warm_start": (bool, Field(False, description=_JOB_SPECS["warm_start"].help)),
    "with_reviews": (bool, Field(False, description=_JOB_SPECS["with_reviews"].help)),
    "reviews_from": (
        int | None,
        Field(None, ge=1, le=2**31 - 1, description=_JOB_SPECS["reviews_from"].help),
    ),
}
# The weights option is a path in a request body (no NUL, bounded length).
_PATH_OPTIONS = frozenset({"weights"})


def options_model(config_cls: type[Any], *, name: str = "TrainOptions") -> type[BaseModel]:
    """The pydantic model of ``config_cls``'s job options (``TrainConfig`` or a subclass)."""
    hints = get_type_hints(config_cls)
    definitions: dict[str, Any] = {}
    for f in option_fields(config_cls):
        definitions[f.name] = _JOB_FIELDS.get(f.name) or _definition(f, hints[f.name])
    for job_name, definition in _JOB_FIELDS.items():
        definitions.setdefault(job_name, definition)
    model: type[BaseModel] = create_model(
        name, __config__=ConfigDict(extra="forbid"), **definitions
    )
    return model


def _definition(f: DataclassField[Any], annotation: Any) -> tuple[Any, Any]:
    spec = option_spec(f)
    if spec.choices:
        annotation = Literal[spec.choices]
    elif f.name in _PATH_OPTIONS:
        annotation = PathText
    return annotation, Field(
        f.default, description=spec.help, ge=spec.ge, gt=spec.gt, le=spec.le
    )


if TYPE_CHECKING:

    class TrainOptions(BaseModel):
        """Fields built at run time from TrainConfig (see :func:`options_model`)."""

else:
    TrainOptions = options_model(TrainConfig)


def _specs(config_cls: type[Any]) -> dict[str, OptionSpec]:
    specs = {f.name: option_spec(f) for f in option_fields(config_cls)}
    for job_name, spec in _JOB_SPECS.items():
        specs[job_name] = spec
    return specs


_SPECS: dict[str, OptionSpec] = _specs(TrainConfig)


def option_names() -> tuple[str, ...]:
    """Every training option of a train job, in declaration order."""
    return tuple(TrainOptions.model_fields)


def option_help(name: str) -> str:
    """The help text of option ``name`` (for CLI options and API docs)."""
    return _SPECS[name].help


def option_default(name: str) -> Any:
    """The default of option ``name`` (``device``: None, meaning settings.default_device)."""
    return TrainOptions.model_fields[name].default


def option_bounds(name: str) -> tuple[float | None, float | None]:
    """``(min, max)`` of a numeric option (``gt`` bounds count as the minimum); Nones if
    unbounded."""
    spec = _SPECS[name]
    low = spec.ge if spec.ge is not None else spec.gt
    return low, spec.le


def option_choices(name: str) -> tuple[str, ...]:
    """The allowed values of a choice option (``arch``, ``labels``); () for the others."""
    return _SPECS[name].choices


def refusal(name: str, value: object) -> str:
    """Why ``value`` is not a valid option ``name``: the message submission raises."""
    spec = _SPECS[name]
    annotation = TrainOptions.model_fields[name].annotation
    if spec.choices or spec.allowed:
        if spec.allowed:
            return f"{name}: must be {spec.allowed}, not {value!r}"
        return f"{name}: {value!r} is not one of {', '.join(spec.choices)}"
    if annotation is bool:
        return f"{name}: must be true or false, not {value!r}"
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name}: must be an integer, not {value!r}"
        return f"{name}: must be between {_num(spec.ge)} and {_num(spec.le)}, not {value}"
    left = f"({_num(spec.gt)}" if spec.gt is not None else f"[{_num(spec.ge)}"
    return f"{name}: must be a number in {left}, {_num(spec.le)}], not {value!r}"


def _num(bound: float | None) -> str:
    if bound is None:
        return "inf"
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def validate_train_options(
    options: Mapping[str, Any] | None, *, roots: Sequence[Path], default_device: str = "auto"
) -> dict[str, Any]:
    """Check a train job's options without importing torch; returns the full option dict.

    Unknown keys are refused (a typo would otherwise silently train with a default); a None
    value means the default. ``weights`` may be ``auto``/``none``/``imagenet`` or a
    checkpoint path inside the roots. Raises ``InvalidOptionsError`` naming the option.
    """
    given = dict(options or {})
    known = option_names()
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InvalidOptionsError(
            f"unknown training option(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    merged = {k: v for k, v in given.items() if v is not None}
    merged.setdefault("device", default_device)
    if "labels" in merged:  # 15 and "15" name the same label space (core.labels)
        merged["labels"] = str(merged["labels"])
    try:
        # Strict: a bool is no epoch count, "5" no integer (the API's JSON is parsed laxly).
        parsed = TrainOptions.model_validate(merged, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0])
        if error["type"] == "value_error":  # a check of its own (PathText) says why
            raise InvalidOptionsError(f"{name}: {error['ctx']['error']}") from None
        raise InvalidOptionsError(refusal(name, merged[name])) from None
    out = parsed.model_dump()
    out["weights"] = _checkpoint(out["weights"], roots)
    if out["reviews_from"] is not None:  # the reviews of one job are still reviews
        out["with_reviews"] = True
    return out


def _checkpoint(weights: str, roots: Sequence[Path]) -> str:
    if weights in _WEIGHT_KEYWORDS:
        return weights
    check_text(weights, "weights")
    confined = str(confine(Path(weights).expanduser(), roots))
    if not Path(confined).is_file():
        raise InvalidOptionsError(f"weights: {confined}: no such checkpoint file")
    return confined


def validate_classify_options(
    *, top_k: int = 3, review_below: float = REVIEW_BELOW_DEFAULT, explain: str = "none"
) -> dict[str, Any]:
    """Check a classify job's options; returns them as stored (``review_below`` as a float).
    Raises ``InvalidOptionsError`` naming the option."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidOptionsError(f"top_k: must be between 1 and {MAX_TOP_K}, not {top_k!r}")
    if isinstance(review_below, bool):
        raise InvalidOptionsError(f"review_below: must be a number, not {review_below!r}")
    try:
        below = check_review_below(review_below)
    except ReviewError:
        raise InvalidOptionsError(
            f"review_below: must be a number between 0 and 1, not {review_below!r}"
        ) from None
    if explain not in EXPLAIN_MODES:
        raise InvalidOptionsError(
            f"explain: {explain!r} is not one of {', '.join(EXPLAIN_MODES)}"
        )
    return {"top_k": top_k, "review_below": below, "explain": explain}
