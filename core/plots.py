"""Report plots (matplotlib Agg, one PNG each): the confusion matrix and training curves,
and the reliability diagram, per-class bars, ROC curves and a gallery of the most confident
mistakes.

The last four need the per-sample data of an evaluation (:class:`core.evaluation.EvalOutputs`),
not just the stored report, so training's test evaluation and evaluate jobs write them right
after evaluating. Every figure is bound to an Agg canvas without pyplot (safe in worker
threads) and written atomically. matplotlib is imported lazily, so importing this module
(which :mod:`core.evaluation` does) stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from core.atomicio import atomic_path
from core.calibration import ECE_BINS, reliability_bins
from core.errors import ImageReadError

if TYPE_CHECKING:
    from core.evaluation import EvalOutputs, EvalReport, Mistake

# Artifact kind -> file name; the worker records each written file under its kind.
PLOT_FILES: dict[str, str] = {
    "reliability_diagram": "reliability_diagram.png",
    "per_class_metrics": "per_class_metrics.png",
    "roc_curves": "roc_curves.png",
    "confident_mistakes": "confident_mistakes.png",
}
# Beyond this many classes a legend hides the curves it labels.
_MAX_LEGEND = 15
_THUMB_SIDE = 128
_GALLERY_COLUMNS = 4

__all__ = [
    "PLOT_FILES",
    "plot_confusion_matrix",
    "plot_training_curves",
    "plot_confident_mistakes",
    "plot_per_class_metrics",
    "plot_reliability_diagram",
    "plot_roc_curves",
    "write_evaluation_plots",
]


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
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
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


def write_evaluation_plots(outputs: EvalOutputs, out_dir: Path | str) -> dict[str, Path]:
    """Write every plot of this module into ``out_dir``; returns artifact kind -> path."""
    out = Path(out_dir)
    return {
        "reliability_diagram": plot_reliability_diagram(
            outputs, out / PLOT_FILES["reliability_diagram"]
        ),
        "per_class_metrics": plot_per_class_metrics(
            outputs.report, out / PLOT_FILES["per_class_metrics"]
        ),
        "roc_curves": plot_roc_curves(outputs, out / PLOT_FILES["roc_curves"]),
        "confident_mistakes": plot_confident_mistakes(
            outputs.report.most_confident_mistakes, out / PLOT_FILES["confident_mistakes"]
        ),
    }


def _reliability_panel(ax: Any, probs: np.ndarray, y: np.ndarray, title: str) -> None:
    bins = reliability_bins(probs, y, n_bins=ECE_BINS)
    width = 1.0 / ECE_BINS
    centres = bins.edges[:-1] + width / 2
    filled = bins.count > 0
    ax.bar(
        centres[filled], bins.accuracy[filled], width=width, edgecolor="black",
        color="tab:blue", label="accuracy",
    )
    # The gap between each bin's accuracy and its confidence: what ECE sums up.
    ax.bar(
        centres[filled], bins.confidence[filled] - bins.accuracy[filled],
        bottom=bins.accuracy[filled], width=width, edgecolor="tab:red", color="tab:red",
        alpha=0.3, label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)


def plot_reliability_diagram(outputs: EvalOutputs, path: Path | str) -> Path:
    """Two panels: the raw softmax and the temperature-scaled confidences (15 bins)."""
    report = outputs.report
    fig = _new_figure(10.0, 4.6)
    before, after = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    def ece_text(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f} %"

    _reliability_panel(
        before, outputs.probs_uncalibrated, outputs.y_true,
        f"uncalibrated: ECE {ece_text(report.ece_uncalibrated)}",
    )
    _reliability_panel(
        after, outputs.probs, outputs.y_true,
        f"T = {report.temperature:.3f}: ECE {ece_text(report.ece)}",
    )
    if not report.calibrated:
        fig.suptitle("model not calibrated (temperature 1.0)")
    elif report.n == 0:
        fig.suptitle("no samples")
    return _save_png(fig, path)


def plot_per_class_metrics(report: EvalReport, path: Path | str) -> Path:
    """Horizontal bars of precision, recall and F1 per class (support in the labels)."""
    n_classes = len(report.classes)
    fig = _new_figure(8.0, max(3.0, 0.42 * n_classes + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    ys = np.arange(n_classes)
    height = 0.27
    for offset, key, colour in (
        (-height, "precision", "tab:blue"),
        (0.0, "recall", "tab:orange"),
        (height, "f1", "tab:green"),
    ):
        values = [getattr(c, key) for c in report.per_class]
        ax.barh(ys + offset, values, height=height, color=colour, label=key)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{c.name} (n={c.support})" for c in report.per_class], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("score")
    ax.set_title(f"per class (macro F1 {report.macro_f1:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return _save_png(fig, path)


def plot_roc_curves(outputs: EvalOutputs, path: Path | str) -> Path:
    """One-vs-rest ROC curve per class that has positives and negatives."""
    from sklearn.metrics import roc_curve

    report = outputs.report
    fig = _new_figure(6.5, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, name in enumerate(report.classes):
        auc = report.roc_auc_per_class[i]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(outputs.y_true == i, outputs.probs[:, i])
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} ({auc:.3f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    macro = report.roc_auc_ovr_macro
    ax.set_title(
        "one-vs-rest ROC" + ("" if macro is None else f" (macro AUC {macro:.3f})")
        if drawn
        else "no class has both positives and negatives"
    )
    if 0 < drawn <= _MAX_LEGEND:
        ax.legend(loc="lower right", fontsize=7)
    return _save_png(fig, path)


def _thumbnail(path: str) -> np.ndarray | None:
    from core.imaging import read_image

    try:
        img = read_image(Path(path))
    except (ImageReadError, OSError):
        return None  # moved or deleted since the evaluation: the tile says so
    step = max(1, max(img.shape) // _THUMB_SIDE)
    return img[::step, ::step]


def plot_confident_mistakes(mistakes: Sequence[Mistake], path: Path | str) -> Path:
    """Thumbnails of the wrong predictions with the highest confidence, most confident first."""
    if not mistakes:
        fig = _new_figure(4.0, 1.5)
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center")
        return _save_png(fig, path)
    columns = min(_GALLERY_COLUMNS, len(mistakes))
    rows = (len(mistakes) + columns - 1) // columns
    fig = _new_figure(3.0 * columns, 3.4 * rows)
    for k, mistake in enumerate(mistakes):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.axis("off")
        thumb = _thumbnail(mistake.path)
        if thumb is None:
            ax.text(0.5, 0.5, "file unreadable", ha="center", va="center", fontsize=8)
        else:
            ax.imshow(thumb, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(
            f"true: {mistake.true}\npred: {mistake.predicted} ({mistake.confidence:.2f})\n"
            f"{Path(mistake.path).name}",
            fontsize=7,
        )
    fig.suptitle("most confident mistakes")
    return _save_png(fig, path)
