"""Evaluation metrics, as the PTB-XL benchmark and the PhysioNet/CinC challenges report them.

Ranking metrics (AUROC, AUPRC) are scikit-learn's, per class and macro-averaged over the classes that have both a
positive and a negative record. Thresholded metrics (F1, F-beta and G-beta with beta 2, the CinC 2021 challenge
score) use per-class thresholds tuned on the validation split (``tune_thresholds``), never on the test split.
``bootstrap`` gives percentile intervals by resampling records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

FBETA = 2.0  # F-beta and G-beta as in the PhysioNet/CinC 2020 challenge and the PTB-XL benchmark


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

    def overlaps(a: tuple[int, int], bs: list[tuple[int, int]]) -> bool:
        return any(s < a[1] and a[0] < e for s, e in bs)

    return {"true_episodes": len(true_eps), "detected": sum(overlaps(t, pred_eps) for t in true_eps),
            "pred_episodes": len(pred_eps), "correct": sum(overlaps(p, true_eps) for p in pred_eps)}


# ------------------------------------------------------------------ per class ranking metrics
def _check(labels, scores, name: str = "scores"):
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and {name} {s.shape} must be the same [N, C] shape")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} hold NaN or infinite values")
    return y > 0.5, s


def _scorable(y: np.ndarray) -> np.ndarray:
    pos = y.sum(0)
    return (pos > 0) & (pos < y.shape[0])


def per_class_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each class (scikit-learn), NaN for a class without both a positive and a negative record."""
    y, s = _check(labels, scores)
    return np.array([roc_auc_score(y[:, c], s[:, c]) if ok else np.nan for c, ok in enumerate(_scorable(y))])


def per_class_auprc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Area under the precision-recall curve of each class (scikit-learn's average precision), NaN as above."""
    y, s = _check(labels, scores)
    return np.array([average_precision_score(y[:, c], s[:, c]) if ok else np.nan
                     for c, ok in enumerate(_scorable(y))])


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else float("nan")


# ------------------------------------------------------------------ thresholded metrics
def counts(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Per-class true/false positives and negatives of binary ``predictions`` ``[N, C]``."""
    y, p = _check(labels, predictions, "predictions")
    p = p > 0.5
    return {"tp": (y & p).sum(0), "fp": (~y & p).sum(0), "fn": (y & ~p).sum(0), "tn": (~y & ~p).sum(0)}


def _ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def fbeta_per_class(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float = FBETA) -> np.ndarray:
    """(1 + b^2) TP / ((1 + b^2) TP + FP + b^2 FN); 0 for a class never predicted nor present (as scikit-learn)."""
    b2 = beta * beta
    return _ratio((1 + b2) * np.asarray(tp), (1 + b2) * np.asarray(tp) + fp + b2 * np.asarray(fn))


def gbeta_per_class(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float = FBETA) -> np.ndarray:
    """TP / (TP + FP + b FN), the CinC 2020 challenge's G-beta; 0 where the denominator is 0."""
    return _ratio(tp, np.asarray(tp) + fp + beta * np.asarray(fn))


THRESHOLD_METRICS: dict[str, Callable] = {
    "f1": lambda tp, fp, fn: fbeta_per_class(tp, fp, fn, 1.0),
    "fbeta": fbeta_per_class,
    "gbeta": gbeta_per_class,
}


def tune_thresholds(labels: np.ndarray, scores: np.ndarray, metric: str = "fbeta") -> np.ndarray:
    """Per class, the threshold ``t`` maximising the class's ``metric`` when predicting ``score >= t``.

    Candidates are the class's distinct scores (every distinct way to split the records) and +inf (predict
    nothing); ties go to the largest threshold, so a class whose validation positives cannot be found (or that
    has none) is never predicted rather than always. A macro average of per-class metrics is maximised by
    maximising each class, so these thresholds also maximise the macro ``metric`` on this data. Tune on
    validation only.
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"metric must be one of {sorted(THRESHOLD_METRICS)}, got {metric!r}")
    y, s = _check(labels, scores)
    out = np.empty(y.shape[1])
    for c in range(y.shape[1]):
        cand = np.unique(s[:, c])  # ascending
        order = np.argsort(s[:, c], kind="stable")
        sorted_s, sorted_y = s[order, c], y[order, c]
        # Records with score >= cand[k]: those from the first position of cand[k] in the sorted scores on.
        first = np.searchsorted(sorted_s, cand, side="left")
        pos_from = np.concatenate([np.cumsum(sorted_y[::-1])[::-1], [0]])  # positives at positions >= i
        tp = pos_from[first]
        fp = (len(sorted_s) - first) - tp
        fn = sorted_y.sum() - tp
        values = np.concatenate([THRESHOLD_METRICS[metric](tp, fp, fn),
                                 THRESHOLD_METRICS[metric](np.array([0]), np.array([0]), np.array([sorted_y.sum()]))])
        # The last maximum: the largest threshold among equals (+inf when nothing beats predicting nothing).
        out[c] = np.concatenate([cand, [np.inf]])[len(values) - 1 - int(np.argmax(values[::-1]))]
    return out


def apply_thresholds(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if s.ndim != 2 or t.shape != (s.shape[1],):
        raise ValueError(f"thresholds {t.shape} must hold one value per class of scores {s.shape}")
    return (s >= t[None, :]).astype(np.float64)


# ------------------------------------------------------------------ the PhysioNet/CinC 2021 challenge score
def challenge_score(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray, normal: int) -> float:
    """The PhysioNet/CinC 2021 challenge metric of binary ``predictions`` ``[N, C]`` with the class-by-class
    reward ``weights`` ``[C, C]`` and the index of the normal (sinus rhythm) class.

    Each record spreads one unit of credit over the pairs (true class, predicted class) of its labels and outputs,
    normalised by the size of their union; the observed reward is the weighted sum of that matrix. It is scaled so
    that the true labels score 1 and always predicting only the normal class scores 0.
    """
    y, p = _check(labels, predictions, "predictions")
    p = p > 0.5
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (y.shape[1], y.shape[1]):
        raise ValueError(f"weights must be [C, C] for C={y.shape[1]} classes, got {w.shape}")
    if not 0 <= normal < y.shape[1]:
        raise ValueError(f"normal must index a class (0..{y.shape[1] - 1}), got {normal}")

    def reward(outputs: np.ndarray) -> float:
        norm = np.maximum((y | outputs).sum(1), 1).astype(np.float64)  # size of the union per record
        a = (y.astype(np.float64) / norm[:, None]).T @ outputs.astype(np.float64)  # [true class, predicted class]
        return float((w * a).sum())

    inactive = np.zeros_like(y)
    inactive[:, normal] = True
    observed, correct, base = reward(p), reward(y), reward(inactive)
    return (observed - base) / (correct - base) if correct != base else 0.0


# ------------------------------------------------------------------ bootstrap
def bootstrap(metrics: Callable[[np.ndarray], dict], n_records: int, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict:
    """Percentile intervals of each value of ``metrics(indices)`` (a dict of floats) over ``n_boot`` resamples of
    the records with replacement: ``{name: {"low", "high", "n_undefined"}}``.

    Resamples where a metric is undefined (NaN: a class left with a single label value, say) are left out of that
    metric's interval and counted, so an interval is never filled with guesses.
    """
    if n_boot < 1 or n_records < 1:
        raise ValueError(f"n_boot and n_records must be positive, got {n_boot} and {n_records}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    draws = [metrics(rng.integers(0, n_records, n_records)) for _ in range(n_boot)]
    alpha = (1 - level) / 2
    out = {}
    for key in draws[0]:
        values = np.array([d[key] for d in draws], dtype=np.float64)
        ok = values[~np.isnan(values)]
        low, high = np.quantile(ok, [alpha, 1 - alpha]) if len(ok) else (np.nan, np.nan)
        out[key] = {"low": float(low), "high": float(high), "n_undefined": int(len(values) - len(ok))}
    return out


def _finite_or_none(x: float):
    return float(x) if np.isfinite(x) else None


def classification_report(val_labels: np.ndarray, val_scores: np.ndarray, test_labels: np.ndarray,
                          test_scores: np.ndarray, class_names: Sequence[str],
                          n_boot: int = 200, seed: int = 0, weights: np.ndarray | None = None,
                          normal: int | None = None) -> dict:
    """Every metric of a test split, with per-class thresholds tuned on the validation split, and bootstrap 95%
    intervals of the macro metrics (``n_boot=0``: none). ``weights``/``normal`` (see ``challenge_score``) add
    the CinC 2021 challenge score, on the F-beta thresholds. A threshold of None: the class is never predicted
    (no validation threshold beat predicting nothing)."""
    yt, st = _check(test_labels, test_scores)
    yv, sv = _check(val_labels, val_scores)
    if yt.shape[1] != len(class_names) or yv.shape[1] != len(class_names):
        raise ValueError(f"class_names has {len(class_names)} names for {yt.shape[1]} classes")
    thresholds = {m: tune_thresholds(yv, sv, m) for m in THRESHOLD_METRICS}
    preds = {m: apply_thresholds(st, t) > 0.5 for m, t in thresholds.items()}

    def per_class(idx: np.ndarray) -> dict:
        y, s = yt[idx], st[idx]
        out = {"auroc": per_class_auroc(y, s), "auprc": per_class_auprc(y, s)}
        for m, p in preds.items():
            c = counts(y, p[idx])
            out[m] = THRESHOLD_METRICS[m](c["tp"], c["fp"], c["fn"])
        return out

    def macro(idx: np.ndarray) -> dict:
        out = {k: _nanmean(v) if k in ("auroc", "auprc") else float(np.mean(v)) for k, v in per_class(idx).items()}
        if weights is not None:
            out["challenge"] = challenge_score(yt[idx], preds["fbeta"][idx], weights, normal)
        return out

    everything = np.arange(len(yt))
    pc, k = per_class(everything), counts(yt, preds["fbeta"])
    return {
        "n_records": int(len(yt)), "n_val_records": int(len(yv)), "beta": FBETA, "macro": macro(everything),
        "ci95": bootstrap(macro, len(yt), n_boot, seed) if n_boot else {}, "n_boot": int(n_boot),
        "per_class": [{"class": name, "positives": int(yt[:, c].sum()), "val_positives": int(yv[:, c].sum()),
                       **{m: float(v[c]) for m, v in pc.items()},
                       **{f"threshold_{m}": _finite_or_none(t[c]) for m, t in thresholds.items()},
                       "tp": int(k["tp"][c]), "fp": int(k["fp"][c]), "fn": int(k["fn"][c])}
                      for c, name in enumerate(class_names)],
    }
