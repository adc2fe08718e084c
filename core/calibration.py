"""Confidence calibration: temperature scaling and the calibration metrics it is judged by.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
one scalar ``T > 0`` divides every logit before the softmax. It is fitted on the validation
split by minimising the negative log-likelihood, so it cannot change any argmax (dividing a
row by a positive number keeps its order) but makes the reported confidence match the
observed accuracy far better than the raw softmax of a network trained to low loss.

Metrics:

* ``ece``: expected calibration error with equal-width confidence bins (15 in the paper):
  ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|`` over the bins ``(lo, hi]`` of the top-1
  confidence.
* ``nll``: mean negative log-likelihood of the true class (scikit-learn's ``log_loss``).
* ``brier``: multi-class Brier score, the mean over samples of ``sum_k (p_k - y_k)^2``
  (scikit-learn's ``brier_score_loss``; in [0, 2]).

This module imports torch only inside :func:`fit_temperature`, so the report code that uses
the numpy metrics stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ECE_BINS = 15
# LBFGS iterations; Guo et al. use 50 and the one-dimensional problem converges in far fewer.
FIT_MAX_ITER = 50
# Bounds on the fitted T. A validation split the model classifies perfectly drives the NLL
# optimum towards T -> 0 (all confidences 1.0); clamping keeps such a small split from
# producing a degenerate model, and no sane network needs more than a 20x softening.
T_MIN = 0.05
T_MAX = 20.0

__all__ = [
    "ECE_BINS",
    "Calibration",
    "ReliabilityBins",
    "brier",
    "ece",
    "entropy",
    "fit_temperature",
    "nll",
    "reliability_bins",
    "softmax",
]


@dataclass(frozen=True)
class Calibration:
    """How a checkpoint's confidences are calibrated.

    ``calibrated`` is False for a model trained before calibration existed (or one whose
    validation split was empty): its temperature is 1.0, i.e. the raw softmax.
    The ``val_*`` numbers describe the fit on the validation split.
    """

    temperature: float = 1.0
    calibrated: bool = False
    method: str = "temperature"
    n: int = 0
    val_nll: float | None = None
    val_nll_uncalibrated: float | None = None
    val_ece: float | None = None
    val_ece_uncalibrated: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, not {self.temperature!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": float(self.temperature),
            "calibrated": bool(self.calibrated),
            "method": self.method,
            "n": int(self.n),
            "val_nll": self.val_nll,
            "val_nll_uncalibrated": self.val_nll_uncalibrated,
            "val_ece": self.val_ece,
            "val_ece_uncalibrated": self.val_ece_uncalibrated,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration:
        """``None`` or ``{}`` (a checkpoint from before calibration) -> uncalibrated, T = 1."""
        if not data:
            return cls()

        def opt(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(
            temperature=float(data.get("temperature", 1.0)),
            calibrated=bool(data.get("calibrated", False)),
            method=str(data.get("method", "temperature")),
            n=int(data.get("n", 0)),
            val_nll=opt("val_nll"),
            val_nll_uncalibrated=opt("val_nll_uncalibrated"),
            val_ece=opt("val_ece"),
            val_ece_uncalibrated=opt("val_ece_uncalibrated"),
        )


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (max-shifted, so no overflow)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def entropy(probs: Sequence[float] | np.ndarray) -> float:
    """Shannon entropy (nats) of one probability vector: 0 for a certain prediction,
    ``log(C)`` for a uniform one over C classes. Zeros contribute nothing (``0 log 0 = 0``);
    the vector is renormalised first, so rounding in stored probabilities does not matter."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    p = np.clip(p, 0.0, None)
    total = p.sum()
    if total <= 0.0:
        return 0.0
    p = p[p > 0.0] / total
    return float(max(0.0, -(p * np.log(p)).sum()))


def fit_temperature(
    logits: Any, labels: Any, *, max_iter: int = FIT_MAX_ITER
) -> float:
    """The T minimising the NLL of ``softmax(logits / T)`` for ``labels`` (LBFGS).

    ``logits``: (n, C) array or tensor of raw (unscaled) logits; ``labels``: n class indices.
    Optimises log T, which keeps T positive without a constraint; the result is clamped to
    [T_MIN, T_MAX]. Returns 1.0 for an empty set or when no T beats T = 1 (a fit that did
    not converge must never make the model worse than the raw softmax).
    """
    import torch
    import torch.nn.functional as F

    z_np = np.asarray(logits, dtype=np.float64)
    y_np = np.asarray(labels, dtype=np.int64).reshape(-1)
    if z_np.ndim != 2 or z_np.shape[0] != y_np.shape[0]:
        raise ValueError(f"logits must have shape (n={y_np.shape[0]}, C), got {z_np.shape}")
    if z_np.shape[0] == 0:
        return 1.0
    if not np.all(np.isfinite(z_np)):
        raise ValueError("logits contain NaN or infinite values")
    # Tensors are made inside the block: ones created under the caller's inference_mode
    # (end of training, evaluation) could not take part in autograd.
    with torch.inference_mode(False), torch.enable_grad():
        z = torch.tensor(z_np)
        y = torch.tensor(y_np)
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        optimizer.step(closure)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            t = float(log_t.exp().clamp(T_MIN, T_MAX))
            fitted = float(F.cross_entropy(z / t, y))
            raw = float(F.cross_entropy(z, y))
    if not math.isfinite(t) or not fitted < raw:
        return 1.0
    return t


def _check(probs: np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"probs must have shape (n={y.size}, C), got {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels outside [0, {p.shape[1]})")
    return p, y


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin mean confidence, accuracy and count over ``n_bins`` equal-width bins."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability_bins(
    probs: np.ndarray, labels: Sequence[int] | np.ndarray, *, n_bins: int = ECE_BINS
) -> ReliabilityBins:
    """Top-1 confidence binned into ``(lo, hi]`` bins (the paper's convention); empty bins 0."""
    p, y = _check(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = p.max(axis=1) if y.size else np.zeros(0)
    correct = (p.argmax(axis=1) == y).astype(np.float64) if y.size else np.zeros(0)
    # right=True: a confidence equal to an upper edge belongs to that bin, as in (lo, hi].
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    nonzero = count > 0
    mean_conf = np.divide(conf_sum, count, out=np.zeros(n_bins), where=nonzero)
    mean_acc = np.divide(acc_sum, count, out=np.zeros(n_bins), where=nonzero)
    return ReliabilityBins(edges=edges, confidence=mean_conf, accuracy=mean_acc, count=count)


def ece(
    probs: np.ndarray, labels: Sequence[int] | np.ndarray, *, n_bins: int = ECE_BINS
) -> float:
    """Expected calibration error (equal-width bins); 0.0 for an empty set."""
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    total = int(bins.count.sum())
    if total == 0:
        return 0.0
    gaps = np.abs(bins.accuracy - bins.confidence) * bins.count
    return float(gaps.sum() / total)


def nll(probs: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped as sklearn does)."""
    from sklearn.metrics import log_loss

    p, y = _check(probs, labels)
    if y.size == 0:
        return 0.0
    return float(log_loss(y, p, labels=list(range(p.shape[1]))))


def brier(probs: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of the squared error to the one-hot truth."""
    from sklearn.metrics import brier_score_loss

    p, y = _check(probs, labels)
    if y.size == 0:
        return 0.0
    if p.shape[1] == 2:
        # sklearn treats two columns as a binary problem and scores only the positive class
        # (half the multi-class sum); the multi-class definition counts both.
        return float(np.mean(np.sum((p - np.eye(2)[y]) ** 2, axis=1)))
    return float(brier_score_loss(y, p, labels=list(range(p.shape[1]))))
