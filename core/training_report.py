"""What a training run reports: per-epoch metrics, the run's result, ``metrics.json``, the
test split's report and plots, and the temperature fitted on the validation split."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomicio import write_text_atomically
from core.calibration import Calibration, ece, fit_temperature, nll, softmax
from core.checkpoint import LoadedCheckpoint
from core.dataset import Sample
from core.evaluation import EvalReport, evaluate_checkpoint_outputs
from core.plots import plot_confusion_matrix, write_evaluation_plots

__all__ = [
    "CONFUSION_PNG",
    "CURVES_PNG",
    "METRICS_JSON",
    "TEST_REPORT_JSON",
    "EpochMetrics",
    "TrainResult",
    "fit_calibration",
    "write_metrics",
    "write_test_report",
]

METRICS_JSON = "metrics.json"
TEST_REPORT_JSON = "test_report.json"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"


# A frozen record like core.evaluation.ClassMetrics (see the note there on why the
# look-alike field lists and to_dict lines are not shared).
@dataclass(frozen=True)
class EpochMetrics:
    """One completed epoch (``epoch`` counts from 1)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    lr: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochMetrics:
        return cls(
            epoch=int(data["epoch"]),
            **{f.name: float(data[f.name]) for f in fields(cls) if f.name != "epoch"},
        )


@dataclass(frozen=True)
class TrainResult:
    """Outcome of ``train``. ``epochs`` includes epochs from before a resume."""

    best_checkpoint: Path
    last_checkpoint: Path
    best_sha256: str
    epochs: tuple[EpochMetrics, ...]
    test_report: EvalReport | None
    stopped_early: bool
    cancelled: bool
    resumed_from_epoch: int
    # Additions to the contract (all defaulted): what was printed as the class table, the
    # class weights given to the loss (class-index order; None when unweighted) and the
    # device used. They make the run auditable without re-reading its files.
    class_table: str = ""
    loss_weights: tuple[float, ...] | None = None
    device: str = "cpu"


# --------------------------------------------------------------------------------------
# small helpers


def write_metrics(out_dir: Path, history: Sequence[EpochMetrics]) -> None:
    """``metrics.json``: every completed epoch, rewritten whole after each one."""
    write_text_atomically(
        out_dir / METRICS_JSON, json.dumps([m.to_dict() for m in history], indent=2) + "\n"
    )


def write_test_report(
    ckpt: LoadedCheckpoint,
    samples: Sequence[Sample],
    out_dir: Path,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    should_stop: Callable[[], bool],
    roots: Sequence[Path | str] | None,
) -> EvalReport:
    """Evaluate ``ckpt`` on ``samples`` and write ``test_report.json`` and its plots.
    Raises ``EvaluationCancelled`` when ``should_stop`` fires."""
    outputs = evaluate_checkpoint_outputs(
        ckpt,
        samples,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        should_stop=should_stop,
        roots=roots,
    )
    report = outputs.report
    write_text_atomically(
        out_dir / TEST_REPORT_JSON, json.dumps(report.to_dict(), indent=2) + "\n"
    )
    plot_confusion_matrix(report, out_dir / CONFUSION_PNG)
    write_evaluation_plots(outputs, out_dir)
    return report


def fit_calibration(
    logits: np.ndarray, labels: np.ndarray, *, min_n: int, log: Callable[[str], None]
) -> Calibration:
    """The temperature fitted on validation ``logits`` and the NLL/ECE before and after;
    below ``min_n`` images no fit (``Calibration(n=...)``, temperature 1.0), said to ``log``."""
    if labels.size < min_n:
        log(
            f"calibration skipped: {labels.size} validation images, fewer than "
            f"{min_n}; confidences stay the raw softmax (temperature 1.0)"
        )
        return Calibration(n=int(labels.size))
    t = fit_temperature(logits, labels)
    raw, scaled = softmax(logits), softmax(logits, t)
    calibration = Calibration(
        temperature=t,
        calibrated=True,
        n=int(labels.size),
        val_nll=nll(scaled, labels),
        val_nll_uncalibrated=nll(raw, labels),
        val_ece=ece(scaled, labels),
        val_ece_uncalibrated=ece(raw, labels),
    )
    log(
        f"calibration: temperature {t:.3f} on {labels.size} validation images, "
        f"ECE {calibration.val_ece_uncalibrated:.4f} -> {calibration.val_ece:.4f}"
    )
    return calibration
