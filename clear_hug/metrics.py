"""Evaluation metrics: macro AUROC over the classes that can be scored."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> dict:
    """Macro AUROC (scikit-learn) over the classes that have both a positive and a negative in ``labels``.

    Returns ``{"auroc": float or nan, "classes_scored": int, "classes_excluded": int}``; AUROC is undefined for
    a class seen with a single label value, so such classes are left out and counted rather than guessed.
    """
    labels = np.asarray(labels) > 0.5
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be the same [N, C] shape")
    pos = labels.sum(0)
    usable = (pos > 0) & (pos < labels.shape[0])
    result = {"classes_scored": int(usable.sum()), "classes_excluded": int((~usable).sum())}
    if not usable.any():
        return {"auroc": float("nan"), **result}
    auroc = roc_auc_score(labels[:, usable].astype(np.int64), scores[:, usable], average="macro")
    return {"auroc": float(auroc), **result}
