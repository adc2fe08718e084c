"""The metrics (class counts, ranking, calibration) of :mod:`core.evaluation`'s reports,
with mriq's conventions (see :mod:`core.evaluation`'s docstring).

scikit-learn is imported lazily (light consumers of reports stay light).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CalibrationInput",
    "ClassCounts",
    "calibration_fields",
    "class_counts",
    "is_distribution",
    "roc_auc_binary",
    "top_k_accuracy",
]


def roc_auc_binary(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC of ``scores`` for the boolean ``positive`` mask (ties count 1/2).

    Returns None when there are no positives or no negatives (AUC is undefined).
    """
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool).reshape(-1)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        return None
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64).reshape(-1)))


def top_k_accuracy(y: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest scores; ties -> lower index.

    ``top_k_accuracy_score`` ranks tied scores higher index first; scoring the columns in
    reverse order turns that into lower index first, the tie-break argmax (and so top-1 of
    this ranking) uses.
    """
    from sklearn.metrics import top_k_accuracy_score

    n_classes = scores.shape[1]
    if y.size == 0:
        return 0.0
    if k >= n_classes:
        return 1.0  # every class is in the top k (sklearn warns and says the same)
    return float(
        top_k_accuracy_score(
            n_classes - 1 - y, scores[:, ::-1], k=k, labels=list(range(n_classes))
        )
    )


@dataclass(frozen=True)
class ClassCounts:
    """Confusion matrix, per-class precision/recall/F1/support and the two averages
    (``(precision, recall, f1, support)`` as ``precision_recall_fscore_support`` gives)."""

    confusion: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    macro: tuple[float, float, float, None]
    weighted: tuple[float, float, float, None]


def class_counts(y: np.ndarray, scores: np.ndarray, n_classes: int) -> ClassCounts:
    """The counts of argmax predictions of ``scores`` against ``y`` (all zeros when empty)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(n_classes))
    if not y.size:
        # sklearn refuses empty input; an empty evaluation is all zeros.
        zeros = np.zeros(n_classes)
        return ClassCounts(
            np.zeros((n_classes, n_classes), dtype=np.int64), zeros, zeros, zeros,
            np.zeros(n_classes, dtype=np.int64), (0.0, 0.0, 0.0, None), (0.0, 0.0, 0.0, None),
        )
    y_pred = scores.argmax(axis=1)
    p, r, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=labels, zero_division=0
    )
    return ClassCounts(
        confusion_matrix(y, y_pred, labels=labels),
        p,
        r,
        f1,
        support,
        precision_recall_fscore_support(y, y_pred, average="macro", zero_division=0),
        precision_recall_fscore_support(
            y, y_pred, labels=labels, average="weighted", zero_division=0
        ),
    )


@dataclass(frozen=True)
class CalibrationInput:
    """The temperature a report states and the probabilities before it (None: the same)."""


    temperature: float
    calibrated: bool
    uncalibrated: np.ndarray | None


def calibration_fields(
    y: np.ndarray, probs: np.ndarray, cal: CalibrationInput
) -> dict[str, float | None]:
    """ECE, NLL and Brier score after and before calibration; none for ranking scores."""
    from core.calibration import brier, ece, nll

    before = probs if cal.uncalibrated is None else cal.uncalibrated
    if y.size == 0 or not (is_distribution(probs) and is_distribution(before)):
        # Ranking scores (allowed for the other metrics) have no calibration to measure.
        return {}
    return {
        "ece": ece(probs, y),
        "ece_uncalibrated": ece(before, y),
        "nll": nll(probs, y),
        "nll_uncalibrated": nll(before, y),
        "brier": brier(probs, y),
        "brier_uncalibrated": brier(before, y),
    }


def is_distribution(rows: np.ndarray) -> bool:
    return bool(np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))
