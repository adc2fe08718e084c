"""Classification metrics, checkpoint evaluation and report plots.

The metric code is plain numpy (no scikit-learn in the environment) and this module imports
neither torch nor matplotlib at import time, so light consumers (e.g. code that only reads a
stored report) stay light; :func:`evaluate_checkpoint` and the plot functions import them lazily.

Conventions (they match scikit-learn's defaults, written down here because they matter for
imbalanced data):

* ``precision`` of a class that is never predicted and ``recall`` of a class with no true
  samples are 0.0 (sklearn's ``zero_division`` fallback), and ``f1`` is 0.0 when P + R = 0.
* Macro averages are taken over the labels that occur in ``y_true`` **or** in the
  predictions (sklearn's ``labels=None`` behaviour): a class that is absent from the data and
  never predicted says nothing about the model and would otherwise drag every macro score
  towards 0 for a 15-class model evaluated on a 3-class folder. A class that is predicted
  but absent from ``y_true`` *is* included (its precision is 0: every such prediction is a
  false positive).
* Weighted averages weight each class by its support (so absent classes weigh 0).
* One-vs-rest ROC-AUC per class uses the Mann-Whitney U statistic with average ranks for
  ties; it is ``None`` when the class has no positives or no negatives (undefined), and the
  macro ROC-AUC is the mean over the defined classes (``None`` when none is defined). Unlike
  sklearn's ``roc_auc_score(multi_class="ovr")``, which refuses data where some class is
  missing, this still reports the classes that can be scored.
* Top-3 accuracy uses ``k = min(3, n_classes)``; ties in scores are broken by class index
  (stable sort), deterministically.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from core.checkpoint import LoadedCheckpoint
    from core.dataset import Sample


TOP_K = 3


class EvaluationCancelled(RuntimeError):
    """Raised by :func:`evaluate_checkpoint` when ``should_stop()`` returned True.

    A report over part of the data would look like a valid report, so cancellation is an
    exception rather than a silently truncated result.
    """


@dataclass(frozen=True)
class ClassMetrics:
    """Per-class precision / recall / F1 and support (number of true samples)."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "support": self.support,
        }


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
        )


# --------------------------------------------------------------------------------------
# metrics


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Unique values come out sorted; the last rank a group occupies is its cumulative count,
    # so the group's average rank is that minus (count - 1) / 2.
    avg = np.cumsum(counts).astype(np.float64) - (counts.astype(np.float64) - 1.0) / 2.0
    return avg[inverse.reshape(-1)]


def roc_auc_binary(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC of ``scores`` for the boolean ``positive`` mask (Mann-Whitney, ties = 1/2).

    Returns None when there are no positives or no negatives (AUC is undefined).
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def compute_report(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    errors: Sequence[tuple[str, str]] = (),
) -> EvalReport:
    """Metrics for class scores ``probs`` (n x C, any monotone scores work) vs ``y_true``.

    The prediction is ``argmax`` over a row (first maximum on ties). See the module docstring
    for the averaging / zero-division / AUC conventions.
    """
    classes = tuple(classes)
    n_classes = len(classes)
    if n_classes == 0:
        raise ValueError("classes must not be empty")
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    scores = np.asarray(probs, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (y.size, n_classes):
        # An empty evaluation may legitimately come in as shape (0,) — normalise it.
        if y.size == 0 and scores.size == 0:
            scores = scores.reshape(0, n_classes)
        else:
            raise ValueError(
                f"probs must have shape (n={y.size}, C={n_classes}), got {scores.shape}"
            )
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true holds labels outside [0, {n_classes})")
    if not np.all(np.isfinite(scores)):
        raise ValueError("probs contains NaN or infinite values")

    n = int(y.size)
    y_pred = scores.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)

    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, y_pred), 1)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)

    per_class: list[ClassMetrics] = []
    for i, name in enumerate(classes):
        p = _safe_div(tp[i], predicted[i])
        r = _safe_div(tp[i], support[i])
        f1 = _safe_div(2 * p * r, p + r)
        per_class.append(ClassMetrics(name, p, r, f1, int(support[i])))

    present = (support > 0) | (predicted > 0)
    if present.any():
        idx = np.flatnonzero(present)
        macro_p = float(np.mean([per_class[i].precision for i in idx]))
        macro_r = float(np.mean([per_class[i].recall for i in idx]))
        macro_f1 = float(np.mean([per_class[i].f1 for i in idx]))
    else:
        macro_p = macro_r = macro_f1 = 0.0
    weights = support.astype(np.float64)
    total = float(weights.sum())

    def weighted(values: list[float]) -> float:
        return float(np.dot(weights, values) / total) if total > 0 else 0.0

    k = min(TOP_K, n_classes)
    if n:
        # Stable sort on -scores: among equal scores the lower class index ranks first, the
        # same tie-break argmax uses, so top-1 of this ranking equals y_pred.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top3 = float(np.mean(np.any(order == y[:, None], axis=1)))
    else:
        top3 = 0.0

    aucs: list[float | None] = [roc_auc_binary(y == i, scores[:, i]) for i in range(n_classes)]
    defined = [a for a in aucs if a is not None]
    auc_macro = float(np.mean(defined)) if defined else None

    return EvalReport(
        n=n,
        classes=classes,
        accuracy=_safe_div(int(tp.sum()), n),
        macro_precision=macro_p,
        macro_recall=macro_r,
        macro_f1=macro_f1,
        weighted_precision=weighted([c.precision for c in per_class]),
        weighted_recall=weighted([c.recall for c in per_class]),
        weighted_f1=weighted([c.f1 for c in per_class]),
        top3_accuracy=top3,
        roc_auc_ovr_macro=auc_macro,
        per_class=tuple(per_class),
        roc_auc_per_class=tuple(aucs),
        confusion_matrix=tuple(tuple(int(v) for v in row) for row in cm),
        errors=tuple((str(p), str(r)) for p, r in errors),
    )


# --------------------------------------------------------------------------------------
# checkpoint evaluation


def evaluate_checkpoint(
    ckpt: LoadedCheckpoint,
    samples: Sequence[Sample],
    *,
    batch_size: int = 32,
    device: Any = "cpu",
    num_workers: int = 0,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    roots: Sequence[Path | str] | None = None,
) -> EvalReport:
    """Evaluate a loaded checkpoint on labelled samples with the deterministic eval preset.

    ``samples[i].label`` must index ``ckpt.meta.classes``. Unreadable files are excluded from
    the metrics and listed in ``report.errors`` as ``(path, reason)``. ``on_batch(done, total)``
    is called after every batch (``done`` counts error files too); ``should_stop()`` is
    checked between batches and raises :class:`EvaluationCancelled`. ``roots`` confines
    every file when it is read (:mod:`core.safefile`); refused files are listed as errors.
    """
    # Lazy: keeps torch out of this module's import (see module docstring).
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
    total = len(samples)
    done = 0
    y_true: list[int] = []
    rows: list[np.ndarray] = []
    errors: list[tuple[str, str]] = []

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

    results = predictor.predict_proba(
        (s.path for s in samples), should_stop=stop, on_batch=count
    )
    # predict_proba yields exactly one result per input, in input order, so the running
    # index pairs each result with its sample.
    for i, (path, prob, error) in enumerate(results):
        sample = samples[i]
        if prob is None:
            errors.append((path, error or "unknown error"))
        else:
            y_true.append(sample.label)
            rows.append(prob)
    if stopped:
        raise EvaluationCancelled(f"evaluation cancelled after {done} of {total} images")
    probs = np.stack(rows) if rows else np.zeros((0, len(classes)), dtype=np.float32)
    return compute_report(y_true, probs, classes, errors=errors)


# --------------------------------------------------------------------------------------
# plots


class EpochLike(Protocol):
    """What :func:`plot_training_curves` reads (``core.training.EpochMetrics`` fits)."""

    @property
    def epoch(self) -> int: ...
    @property
    def train_loss(self) -> float: ...
    @property
    def val_loss(self) -> float: ...
    @property
    def val_accuracy(self) -> float: ...
    @property
    def val_macro_f1(self) -> float: ...
    @property
    def lr(self) -> float: ...


def _new_figure(width: float, height: float) -> Any:
    # A Figure bound to an Agg canvas directly, without pyplot: no display is needed, the
    # process-global pyplot backend/state is left alone, and it is safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: Path | str) -> Path:
    """Write atomically so a reader (API download, artifact listing) never sees half a PNG."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", bbox_inches="tight")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def plot_confusion_matrix(report: EvalReport, path: Path | str) -> Path:
    """PNG of the confusion matrix (rows = true class); colour = row-normalised share."""
    cm = np.asarray(report.confusion_matrix, dtype=np.int64).reshape(
        len(report.classes), len(report.classes)
    )
    n_classes = len(report.classes)
    rows = cm.sum(axis=1, keepdims=True)
    # Colour by recall share so small classes are as readable as big ones on imbalanced data.
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = max(4.0, 0.45 * n_classes + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n_classes))
    ax.set_yticks(range(n_classes))
    ax.set_xticklabels(report.classes, rotation=90, fontsize=8)
    ax.set_yticklabels(report.classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"n={report.n}  accuracy={report.accuracy:.3f}  macro F1={report.macro_f1:.3f}"
    )
    if n_classes <= 20:  # beyond that the numbers overlap and become noise
        for i in range(n_classes):
            for j in range(n_classes):
                if cm[i, j]:
                    ax.text(
                        j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    return _save_png(fig, path)


def plot_training_curves(epochs: Sequence[EpochLike], path: Path | str) -> Path:
    """PNG with loss, validation accuracy / macro F1 and learning rate per epoch."""
    fig = _new_figure(12.0, 3.8)
    ax_loss, ax_score, ax_lr = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    xs = [e.epoch for e in epochs]

    def finite(values: Sequence[float]) -> list[float]:
        # NaN losses (diverged epochs) are plotted as gaps instead of breaking the axis.
        return [v if v is not None and math.isfinite(v) else math.nan for v in values]

    ax_loss.plot(xs, finite([e.train_loss for e in epochs]), marker="o", label="train")
    ax_loss.plot(xs, finite([e.val_loss for e in epochs]), marker="o", label="val")
    ax_loss.set_title("loss")
    ax_score.plot(xs, finite([e.val_accuracy for e in epochs]), marker="o", label="val accuracy")
    ax_score.plot(xs, finite([e.val_macro_f1 for e in epochs]), marker="o", label="val macro F1")
    ax_score.set_ylim(0.0, 1.0)
    ax_score.set_title("validation")
    lrs = finite([e.lr for e in epochs])
    ax_lr.plot(xs, lrs, marker="o")
    if lrs and all(v > 0 for v in lrs):
        ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate")
    for ax in (ax_loss, ax_score, ax_lr):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    ax_loss.legend()
    ax_score.legend()
    if not xs:
        fig.suptitle("no epochs recorded")
    return _save_png(fig, path)
