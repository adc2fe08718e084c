"""core.calibration.entropy: the uncertainty the review queue is ordered by."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.calibration import entropy, softmax


def test_entropy_bounds_and_order() -> None:
    assert entropy([1.0, 0.0, 0.0]) == 0.0
    assert entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert entropy([0.5, 0.5]) == pytest.approx(math.log(2))
    confident = entropy([0.9, 0.05, 0.05])
    unsure = entropy([0.4, 0.35, 0.25])
    assert 0.0 < confident < unsure < math.log(3)


def test_entropy_renormalises_and_takes_softmax_rows() -> None:
    # Stored probabilities are rounded; a vector summing to 0.98 reads as its normalised self.
    assert entropy([0.49, 0.49]) == pytest.approx(math.log(2))
    row = softmax(np.array([[2.0, 1.0, 0.0]]))[0]
    expected = -sum(p * math.log(p) for p in row)
    assert entropy(row) == pytest.approx(expected)
    assert entropy([]) == 0.0
