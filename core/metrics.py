"""The ranking metrics of :mod:`core.evaluation`'s reports, with mriq's tie-breaking.

scikit-learn is imported lazily (light consumers of reports stay light).
"""

from __future__ import annotations

import numpy as np

__all__ = ["roc_auc_binary", "top_k_accuracy"]


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
