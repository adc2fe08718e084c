"""Classification metrics and checkpoint evaluation (the report plots live in core.plots).

The metrics come from ``sklearn.metrics``; this module imports neither torch, matplotlib nor
scikit-learn at import time, so light consumers (e.g. code that only reads a stored report)
stay light: :func:`compute_report` and :func:`evaluate_checkpoint` import
them lazily.

Conventions (scikit-learn's, written down here because they matter for imbalanced data):

* ``precision`` of a class that is never predicted and ``recall`` of a class with no true
  samples are 0.0 (``zero_division=0``), and ``f1`` is 0.0 when P + R = 0.
* Macro averages are taken over the labels that occur in ``y_true`` **or** in the
  predictions (``labels=None``): a class that is absent from the data and never predicted
  says nothing about the model and would otherwise drag every macro score towards 0 for a
  15-class model evaluated on a 3-class folder. A class that is predicted but absent from
  ``y_true`` *is* included (its precision is 0: every such prediction is a false positive).
* Weighted averages weight each class by its support (so absent classes weigh 0).
* One-vs-rest ROC-AUC per class is ``roc_auc_score`` of that class's column against the
  rest; it is ``None`` when the class has no positives or no negatives (undefined), and the
  macro ROC-AUC is the mean over the defined classes (``None`` when none is defined).
  ``roc_auc_score(multi_class="ovr")`` itself refuses data where some class is missing;
  scoring column by column still reports the classes that can be scored.
* Top-3 accuracy uses ``k = min(3, n_classes)``; ties in scores are broken by class index
  (the lower index ranks first, as argmax does), deterministically.
* Confidences are the calibrated ones (the checkpoint's temperature, see
  :mod:`core.calibration`); ECE, NLL and Brier score are reported before and after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import numpy as np

from core.metrics import (
    CalibrationInput,
    calibration_fields,
    class_counts,
    roc_auc_binary,
    top_k_accuracy,
)

if TYPE_CHECKING:
    from core.checkpoint import LoadedCheckpoint
    from core.dataset import Sample
    from core.inference import Predictor


__all__ = [
    "ClassMetrics",
    "EvalOptions",
    "EvalOutputs",
    "EvalReport",
    "EvaluationCancelled",
    "Mistake",
    "compute_report",
    "evaluate_checkpoint",
    "evaluate_checkpoint_outputs",
]

TOP_K = 3
# How many of the most confident mistakes a report lists (and the gallery shows).
MAX_MISTAKES = 16


class EvaluationCancelled(RuntimeError):
    """Raised by :func:`evaluate_checkpoint` when ``should_stop()`` returned True.

    A report over part of the data would look like a valid report, so cancellation is an
    exception rather than a silently truncated result.
    """


# Frozen records with a to_dict each (ClassMetrics, Mistake, core.training_report's
# EpochMetrics, core.checkpoint's CheckpointMeta): their field lists look alike to
# ``duplicates``, but a shared base for one asdict() line would be coupling, not sharing.
@dataclass(frozen=True)
class ClassMetrics:
    """Per-class precision / recall / F1 and support (number of true samples)."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Mistake:
    """A wrong prediction: the file, its true and predicted class and the confidence."""

    path: str
    true: str
    predicted: str
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class EvalReport:
    """Everything we report about a model on a labelled set; JSON-ready via :meth:`to_dict`."""

    n: int
    classes: tuple[str, ...]
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    top3_accuracy: float
    roc_auc_ovr_macro: float | None
    per_class: tuple[ClassMetrics, ...]
    roc_auc_per_class: tuple[float | None, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]
    errors: tuple[tuple[str, str], ...] = field(default=())
    # Calibration (core.calibration): the temperature the confidences were computed with,
    # whether the model was calibrated at all, and ECE/NLL/Brier after and before it. None
    # where there were no samples (or in a report stored before calibration existed).
    temperature: float = 1.0
    calibrated: bool = False
    ece: float | None = None
    ece_uncalibrated: float | None = None
    nll: float | None = None
    nll_uncalibrated: float | None = None
    brier: float | None = None
    brier_uncalibrated: float | None = None
    most_confident_mistakes: tuple[Mistake, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain floats/ints/None; no numpy scalars)."""
        return {
            "n": self.n,
            "classes": list(self.classes),
            "accuracy": self.accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "weighted_precision": self.weighted_precision,
            "weighted_recall": self.weighted_recall,
            "weighted_f1": self.weighted_f1,
            "top3_accuracy": self.top3_accuracy,
            "roc_auc_ovr_macro": self.roc_auc_ovr_macro,
            "per_class": [c.to_dict() for c in self.per_class],
            "roc_auc_per_class": list(self.roc_auc_per_class),
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
            "n_errors": len(self.errors),
            "errors": [{"path": p, "reason": r} for p, r in self.errors],
            "temperature": self.temperature,
            "calibrated": self.calibrated,
            "ece": self.ece,
            "ece_uncalibrated": self.ece_uncalibrated,
            "nll": self.nll,
            "nll_uncalibrated": self.nll_uncalibrated,
            "brier": self.brier,
            "brier_uncalibrated": self.brier_uncalibrated,
            "most_confident_mistakes": [m.to_dict() for m in self.most_confident_mistakes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        """Inverse of :meth:`to_dict` (e.g. to re-plot a stored report)."""
        return cls(
            n=int(data["n"]),
            classes=tuple(data["classes"]),
            accuracy=float(data["accuracy"]),
            macro_precision=float(data["macro_precision"]),
            macro_recall=float(data["macro_recall"]),
            macro_f1=float(data["macro_f1"]),
            weighted_precision=float(data["weighted_precision"]),
            weighted_recall=float(data["weighted_recall"]),
            weighted_f1=float(data["weighted_f1"]),
            top3_accuracy=float(data["top3_accuracy"]),
            roc_auc_ovr_macro=(
                None if data["roc_auc_ovr_macro"] is None else float(data["roc_auc_ovr_macro"])
            ),
            per_class=tuple(
                ClassMetrics(
                    name=str(c["name"]),
                    precision=float(c["precision"]),
                    recall=float(c["recall"]),
                    f1=float(c["f1"]),
                    support=int(c["support"]),
                )
                for c in data["per_class"]
            ),
            roc_auc_per_class=tuple(
                None if v is None else float(v) for v in data["roc_auc_per_class"]
            ),
            confusion_matrix=tuple(tuple(int(v) for v in row) for row in data["confusion_matrix"]),
            errors=tuple((str(e["path"]), str(e["reason"])) for e in data.get("errors", [])),
            temperature=float(data.get("temperature", 1.0)),
            calibrated=bool(data.get("calibrated", False)),
            ece=_opt_float(data.get("ece")),
            ece_uncalibrated=_opt_float(data.get("ece_uncalibrated")),
            nll=_opt_float(data.get("nll")),
            nll_uncalibrated=_opt_float(data.get("nll_uncalibrated")),
            brier=_opt_float(data.get("brier")),
            brier_uncalibrated=_opt_float(data.get("brier_uncalibrated")),
            most_confident_mistakes=tuple(
                Mistake(
                    path=str(m["path"]),
                    true=str(m["true"]),
                    predicted=str(m["predicted"]),
                    confidence=float(m["confidence"]),
                )
                for m in data.get("most_confident_mistakes", [])
            ),
        )


# --------------------------------------------------------------------------------------
# metrics


def _mistakes(
    y: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], paths: Sequence[str] | None
) -> tuple[Mistake, ...]:
    if paths is None or y.size == 0:
        return ()
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(y.size), pred]
    wrong = np.flatnonzero(pred != y)
    # Most confident first; stable so equal confidences keep input order.
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:MAX_MISTAKES]
    return tuple(
        Mistake(str(paths[int(i)]), classes[int(y[i])], classes[int(pred[i])], float(conf[i]))
        for i in wrong
    )


def compute_report(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    errors: Sequence[tuple[str, str]] = (),
    uncalibrated_probs: np.ndarray | None = None,
    temperature: float = 1.0,
    calibrated: bool = False,
    paths: Sequence[str] | None = None,
) -> EvalReport:
    """Metrics for class scores ``probs`` (n x C) vs ``y_true``.

    The prediction is ``argmax`` over a row (first maximum on ties). ``probs`` are the
    reported (calibrated) probabilities; ``uncalibrated_probs`` (same shape) the raw softmax,
    used only for the ``*_uncalibrated`` calibration metrics (absent: same as ``probs``).
    ``paths`` (one per row) lets the report list its most confident mistakes. See the module
    docstring for the averaging / zero-division / AUC conventions.
    """
    classes = tuple(classes)
    n_classes = len(classes)
    if n_classes == 0:
        raise ValueError("classes must not be empty")
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    scores = _as_scores(probs, y.size, n_classes, "probs")
    uncal = (
        None
        if uncalibrated_probs is None
        else _as_scores(uncalibrated_probs, y.size, n_classes, "uncalibrated_probs")
    )
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true holds labels outside [0, {n_classes})")
    if paths is not None and len(paths) != y.size:
        raise ValueError(f"paths has {len(paths)} entries for {y.size} samples")

    n = int(y.size)
    counts = class_counts(y, scores, n_classes)
    cm, support = counts.confusion, counts.support
    p, r, f1 = counts.precision, counts.recall, counts.f1
    macro, weighted = counts.macro, counts.weighted
    per_class = tuple(
        ClassMetrics(name, float(p[i]), float(r[i]), float(f1[i]), int(support[i]))
        for i, name in enumerate(classes)
    )
    aucs: list[float | None] = [roc_auc_binary(y == i, scores[:, i]) for i in range(n_classes)]
    defined = [a for a in aucs if a is not None]
    cal = CalibrationInput(float(temperature), bool(calibrated), uncal)
    return EvalReport(
        n=n,
        classes=classes,
        accuracy=float(np.trace(cm)) / n if n else 0.0,
        macro_precision=float(macro[0]),
        macro_recall=float(macro[1]),
        macro_f1=float(macro[2]),
        weighted_precision=float(weighted[0]),
        weighted_recall=float(weighted[1]),
        weighted_f1=float(weighted[2]),
        top3_accuracy=top_k_accuracy(y, scores, min(TOP_K, n_classes)),
        roc_auc_ovr_macro=float(np.mean(defined)) if defined else None,
        per_class=per_class,
        roc_auc_per_class=tuple(aucs),
        confusion_matrix=tuple(tuple(int(v) for v in row) for row in cm),
        errors=tuple((str(p_), str(r_)) for p_, r_ in errors),
        temperature=cal.temperature,
        calibrated=cal.calibrated,
        most_confident_mistakes=_mistakes(y, scores, classes, paths),
        **calibration_fields(y, scores, cal),
    )


def _as_scores(values: np.ndarray, n: int, n_classes: int, name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (n, n_classes):
        # An empty evaluation may legitimately come in as shape (0,) — normalise it.
        if n == 0 and scores.size == 0:
            return scores.reshape(0, n_classes)
        raise ValueError(f"{name} must have shape (n={n}, C={n_classes}), got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return scores


# --------------------------------------------------------------------------------------
# checkpoint evaluation


@dataclass(frozen=True)
class EvalOutputs:
    """A report and the per-sample data behind it (for plots that need more than the report).

    ``probs`` are the calibrated probabilities, ``probs_uncalibrated`` the raw softmax; rows
    follow ``paths`` / ``y_true`` (readable files only).
    """

    report: EvalReport
    y_true: np.ndarray
    probs: np.ndarray
    probs_uncalibrated: np.ndarray
    paths: tuple[str, ...]


class EvalOptions(TypedDict, total=False):
    """The keyword options of :func:`evaluate_checkpoint_outputs` (its defaults apply)."""

    batch_size: int
    device: Any
    num_workers: int
    should_stop: Callable[[], bool] | None
    on_batch: Callable[[int, int], None] | None
    roots: Sequence[Path | str] | None


def evaluate_checkpoint(
    ckpt: LoadedCheckpoint, samples: Sequence[Sample], **options: Unpack[EvalOptions]
) -> EvalReport:
    """Evaluate a loaded checkpoint on labelled samples with the deterministic eval preset.

    ``samples[i].label`` must index ``ckpt.meta.classes``. Unreadable files are excluded from
    the metrics and listed in ``report.errors`` as ``(path, reason)``. ``on_batch(done, total)``
    is called after every batch (``done`` counts error files too); ``should_stop()`` is
    checked between batches and raises :class:`EvaluationCancelled`. ``roots`` confines
    every file when it is read (:mod:`core.safefile`); refused files are listed as errors.
    Probabilities are calibrated with the checkpoint's temperature; the report has
    ECE/NLL/Brier both ways.
    """
    return evaluate_checkpoint_outputs(ckpt, samples, **options).report


def evaluate_checkpoint_outputs(
    ckpt: LoadedCheckpoint,
    samples: Sequence[Sample],
    *,
    batch_size: int = 32,
    device: Any = "cpu",
    num_workers: int = 0,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    roots: Sequence[Path | str] | None = None,
) -> EvalOutputs:
    """:func:`evaluate_checkpoint` returning the per-sample arrays as well."""
    # Lazy: keeps torch out of this module's import (see module docstring).
    from core.calibration import softmax
    from core.inference import Predictor

    classes = tuple(ckpt.meta.classes)
    samples = list(samples)
    for s in samples:
        if not 0 <= s.label < len(classes):
            raise ValueError(
                f"{s.path}: label {s.label} is outside the checkpoint's {len(classes)} classes"
            )
    predictor = Predictor(
        ckpt, device=device, batch_size=batch_size, num_workers=num_workers, roots=roots
    )
    scored = _score(predictor, samples, should_stop, on_batch)
    logits_all = (
        np.stack(scored.rows).astype(np.float64)
        if scored.rows
        else np.zeros((0, len(classes)))
    )
    calibration = ckpt.meta.calibration
    probs = softmax(logits_all, calibration.temperature)
    raw = softmax(logits_all)
    report = compute_report(
        scored.y_true,
        probs,
        classes,
        errors=scored.errors,
        uncalibrated_probs=raw,
        temperature=calibration.temperature,
        calibrated=calibration.calibrated,
        paths=scored.paths,
    )
    return EvalOutputs(
        report=report,
        y_true=np.asarray(scored.y_true, dtype=np.int64),
        probs=probs,
        probs_uncalibrated=raw,
        paths=tuple(scored.paths),
    )


@dataclass(frozen=True)
class _Scored:
    """The logits of the readable samples (with their labels and paths) and the errors."""

    y_true: list[int]
    rows: list[np.ndarray]
    paths: list[str]
    errors: list[tuple[str, str]]


def _score(
    predictor: Predictor,
    samples: list[Sample],
    should_stop: Callable[[], bool] | None,
    on_batch: Callable[[int, int], None] | None,
) -> _Scored:
    total = len(samples)
    done = 0
    scored = _Scored([], [], [], [])

    def count(n_batch: int) -> None:
        nonlocal done
        done += n_batch
        if on_batch is not None:
            on_batch(done, total)

    stopped = False

    def stop() -> bool:
        nonlocal stopped
        stopped = bool(should_stop is not None and should_stop())
        return stopped

    results = predictor.predict_logits(
        (s.path for s in samples), should_stop=stop, on_batch=count
    )
    # predict_logits yields exactly one result per input, in input order, so the running
    # index pairs each result with its sample.
    for i, (path, logits, error) in enumerate(results):
        sample = samples[i]
        if logits is None:
            scored.errors.append((path, error or "unknown error"))
        else:
            scored.y_true.append(sample.label)
            scored.rows.append(logits)
            scored.paths.append(str(path))
    if stopped:
        raise EvaluationCancelled(f"evaluation cancelled after {done} of {total} images")
    return scored
