"""core.metrics: the ranking metrics of the evaluation reports."""

from __future__ import annotations

import numpy as np
import pytest

from core.metrics import roc_auc_binary


def test_roc_auc_with_ties_hand_computed() -> None:
    positive = np.array([True, True, False, False])
    scores = np.array([0.8, 0.5, 0.5, 0.2])
    # pairs: (.8,.5)=1 (.8,.2)=1 (.5,.5)=1/2 (.5,.2)=1 -> 3.5/4
    assert roc_auc_binary(positive, scores) == pytest.approx(0.875)
    assert roc_auc_binary(np.array([True, True]), np.array([0.1, 0.2])) is None
    assert roc_auc_binary(np.array([False, False]), np.array([0.1, 0.2])) is None
