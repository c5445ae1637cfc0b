"""How well the R-peak detector finds the generator's ground-truth beats, per class and rhythm.

Used by ``bench/bench_rpeaks.py --synthetic N`` (the printed table) and by the tests (the 0.99 floor).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .rpeaks import detect_rpeaks, match_beats
from .synthetic import generate_dataset


def synthetic_detection_counts(n_records: int, seed: int = 0, fs: int = 100,
                               tolerance_s: float = 0.15) -> dict[str, np.ndarray]:
    """``{label: [TP, FN, FP]}`` summed over the records carrying each label (a record counts for every label it
    has), plus ``"all"``."""
    data = generate_dataset(n_records, seed=seed, fs=fs, task="all")
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3, dtype=np.int64))
    tolerance = int(round(tolerance_s * fs))
    for signal, truth, labels in zip(data.signals, data.rpeaks, data.labels):
        found = np.asarray(match_beats(truth, detect_rpeaks(signal, fs), tolerance))
        counts["all"] += found
        for name in np.asarray(data.class_names)[labels > 0]:
            counts[str(name)] += found
    return dict(counts)


def scores(tp_fn_fp: np.ndarray) -> tuple[float, float]:
    """Sensitivity and positive predictivity from ``[TP, FN, FP]``."""
    tp, fn, fp = (int(x) for x in tp_fn_fp)
    return (tp / (tp + fn) if tp + fn else 1.0), (tp / (tp + fp) if tp + fp else 1.0)
