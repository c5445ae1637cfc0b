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


def episodes_from_beats(flags: np.ndarray, min_beats: int = 1) -> list[tuple[int, int]]:
    """Runs of consecutive True beats as ``[start, end)`` beat index pairs, keeping runs of ``min_beats`` or more."""
    f = np.asarray(flags, dtype=bool).astype(np.int8)
    edges = np.diff(np.concatenate([[0], f, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e - s >= min_beats]


def episode_scores(true_flags: np.ndarray, pred_flags: np.ndarray, min_beats: int = 1) -> dict:
    """Episode sensitivity and precision of per-beat predictions of one record (or records concatenated with a
    False beat between them): a true episode is detected when a predicted one overlaps it, a predicted episode
    is correct when it overlaps a true one. Returns counts, so records add up before dividing."""
    true_eps = episodes_from_beats(true_flags, 1)
    pred_eps = episodes_from_beats(pred_flags, min_beats)

    def overlaps(a, bs):
        return any(s < a[1] and a[0] < e for s, e in bs)

    return {"true_episodes": len(true_eps), "detected": sum(overlaps(t, pred_eps) for t in true_eps),
            "pred_episodes": len(pred_eps), "correct": sum(overlaps(p, true_eps) for p in pred_eps)}
