"""Temperature scaling and calibration metrics against known cases and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.calibration import (
    T_MAX,
    T_MIN,
    Calibration,
    brier,
    ece,
    fit_temperature,
    nll,
    reliability_bins,
    softmax,
)


def _synthetic(true_t: float, n: int = 4000, c: int = 6, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Logits whose labels are drawn from softmax(logits / true_t): calibrated at true_t."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 4.0
    labels = torch.multinomial(torch.softmax(logits / true_t, dim=1), 1, generator=g).squeeze(1)
    return logits.numpy(), labels.numpy()


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(true_t: float) -> None:
    logits, labels = _synthetic(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.08)


def test_fit_lowers_nll_and_ece_of_overconfident_logits() -> None:
    logits, labels = _synthetic(3.0, seed=1)
    t = fit_temperature(logits, labels)
    raw, scaled = softmax(logits), softmax(logits, t)
    assert nll(scaled, labels) < nll(raw, labels)
    assert ece(scaled, labels) < ece(raw, labels) / 2


def test_fit_works_inside_inference_mode() -> None:
    # The end of training and evaluation run under torch.inference_mode.
    logits, labels = _synthetic(2.0, n=500)
    with torch.inference_mode():
        assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.2)


def test_fit_edge_cases() -> None:
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == 1.0
    # Every sample right with a margin: the NLL falls towards T -> 0 (sharpening), until
    # its gradient vanishes; never below T_MIN.
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]] * 4)
    labels = np.array([0, 1, 2] * 4)
    assert T_MIN <= fit_temperature(logits, labels) < 0.5
    # Already at NLL 0 in float64: no T does better, so the raw softmax stays.
    assert fit_temperature(logits * 100, labels) == 1.0
    # Every sample confidently wrong: softening as far as allowed.
    assert fit_temperature(logits, (labels + 1) % 3) == pytest.approx(T_MAX)
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros((3, 2)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[math.nan, 0.0]]), np.array([0]))


def test_temperature_never_changes_the_argmax() -> None:
    logits, _ = _synthetic(2.0, n=1000)
    for t in (0.05, 0.3, 1.0, 2.7, 20.0):
        assert np.array_equal(softmax(logits, t).argmax(axis=1), logits.argmax(axis=1))


def test_ece_hand_computed() -> None:
    # Top-1 confidences 0.9, 0.9 (one right, one wrong) -> bin (0.8667, 0.9333]: acc .5,
    # conf .9, gap .4, weight 2/4. Confidences 0.6 (right) and 0.55 (wrong) -> bin
    # (0.5333, 0.6]: acc .5, conf .575, gap .075, weight 2/4. ECE = .2 + .0375 = .2375.
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 0])
    assert ece(probs, labels) == pytest.approx(0.2375)
    bins = reliability_bins(probs, labels)
    assert bins.count.sum() == 4 and bins.count[13] == 2 and bins.count[8] == 2
    assert ece(np.zeros((0, 2)), np.zeros(0, dtype=np.int64)) == 0.0


def test_ece_bin_edges_are_right_closed() -> None:
    # 0.6 is the upper edge of bin 8 (0.5333, 0.6]; a perfectly calibrated bin has ECE 0.
    probs = np.array([[0.6, 0.4]] * 5)
    labels = np.array([0, 0, 0, 1, 1])
    assert reliability_bins(probs, labels).count[8] == 5
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_nll_and_brier_hand_computed() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    labels = np.array([0, 2])
    assert nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.4)) / 2)
    # (.09 + .04 + .01 + .01 + .25 + .36) / 2
    assert brier(probs, labels) == pytest.approx(0.38)
    # Two classes count both columns, like the multi-class definition.
    assert brier(np.array([[0.7, 0.3]]), np.array([0])) == pytest.approx(0.18)


def test_calibration_record_defaults_mean_uncalibrated() -> None:
    assert Calibration.from_dict(None) == Calibration(temperature=1.0, calibrated=False)
    assert Calibration.from_dict({}) == Calibration()
    record = Calibration(temperature=1.7, calibrated=True, n=30, val_ece=0.02)
    assert Calibration.from_dict(record.to_dict()) == record
    with pytest.raises(ValueError, match="positive"):
        Calibration(temperature=0.0)
