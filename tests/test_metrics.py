"""Evaluation metrics against scikit-learn, brute force and the published CinC 2021 weights table."""


import numpy as np
import pytest
from sklearn.metrics import average_precision_score, fbeta_score, roc_auc_score

from clear_hug.data.snomed import CINC2021_SCORED, cinc2021_weights
from clear_hug.metrics import (
    THRESHOLD_METRICS,
    apply_thresholds,
    bootstrap,
    challenge_score,
    classification_report,
    counts,
    per_class_auprc,
    per_class_auroc,
    tune_thresholds,
)


def _fixed(n=60, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(float)
    s = np.round(0.4 * y + rng.random((n, c)), 1)  # rounded: ties between scores, as real outputs have
    y[:, -1] = 0  # a class without positives: AUROC/AUPRC undefined
    return y, s


def test_ranking_metrics_equal_scikit_learn():
    y, s = _fixed()
    auroc, auprc = per_class_auroc(y, s), per_class_auprc(y, s)
    for c in range(3):
        assert auroc[c] == pytest.approx(roc_auc_score(y[:, c], s[:, c]))
        assert auprc[c] == pytest.approx(average_precision_score(y[:, c], s[:, c]))
    assert np.isnan(auroc[3]) and np.isnan(auprc[3])
    with pytest.raises(ValueError, match="same \\[N, C\\] shape"):
        per_class_auroc(y, s[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        per_class_auroc(y, np.full_like(s, np.nan))


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_fbeta_equals_scikit_learn_and_gbeta_its_formula(beta):
    y, s = _fixed(seed=1)
    p = (s > 0.7).astype(float)
    k = counts(y, p)
    metric = THRESHOLD_METRICS["f1" if beta == 1.0 else "fbeta"]
    expected = fbeta_score(y, p, beta=beta, average=None, zero_division=0)
    np.testing.assert_allclose(metric(k["tp"], k["fp"], k["fn"]), expected)
    # G-beta = TP / (TP + FP + beta FN) (CinC 2020): 3 / (3 + 1 + 2 * 2) for these counts.
    assert THRESHOLD_METRICS["gbeta"](np.array([3]), np.array([1]), np.array([2]))[0] == pytest.approx(3 / 8)


def _brute_threshold(y, s, metric):
    """Every candidate threshold tried one by one with explicit counting; the last maximum wins (ties: largest)."""
    best_t, best_v = None, -1.0
    for t in sorted(set(s.tolist())) + [np.inf]:
        p = s >= t
        tp, fp, fn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y)
        v = THRESHOLD_METRICS[metric](np.array([tp]), np.array([fp]), np.array([fn]))[0]
        if v >= best_v:
            best_t, best_v = t, v
    return best_t, best_v


@pytest.mark.parametrize("metric", sorted(THRESHOLD_METRICS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_equal_a_brute_force_search(metric, seed):
    y, s = _fixed(n=40, c=5, seed=seed)
    y[:, 0] = 0
    y[0, 0] = 1  # a single positive
    t = tune_thresholds(y, s, metric)
    for c in range(y.shape[1]):
        bt, bv = _brute_threshold(y[:, c] > 0.5, s[:, c], metric)
        assert t[c] == bt, (c, t[c], bt)
    assert t[-1] == np.inf  # no positives: never predicted, not always
    pred = apply_thresholds(s, t)
    assert pred[:, -1].sum() == 0


def _challenge_by_loops(labels, outputs, weights, normal):
    """The challenge's rule written out record by record, pair by pair."""
    def reward(out):
        a = np.zeros_like(weights)
        for i in range(len(labels)):
            union = max(1, int(np.sum(labels[i] | out[i])))
            for j in range(labels.shape[1]):
                for k in range(labels.shape[1]):
                    if labels[i, j] and out[i, k]:
                        a[j, k] += 1.0 / union
        return np.sum(weights * a)
    inactive = np.zeros_like(labels)
    inactive[:, normal] = True
    o, c, b = reward(outputs), reward(labels), reward(inactive)
    return (o - b) / (c - b)


# Entries of the challenge's published reward matrix (weights.csv of the CinC 2021 evaluation code), quoted as
# reference values; the table itself is not copied into this repository.
PUBLISHED_WEIGHTS = {
    ("IAVB", "AF"): 0.3, ("AF", "AFL"): 0.5, ("IAVB", "PAC|SVPB"): 0.4625, ("AF", "SB"): 0.3,
    ("LQT", "IAVB"): 0.35, ("TAb", "TInv"): 0.5, ("SNR", "STach"): 0.375, ("CRBBB|RBBB", "CLBBB|LBBB"): 0.425,
}


def test_challenge_weights_match_published_entries():
    names = [name for name, _, _ in CINC2021_SCORED]
    w, normal = cinc2021_weights(names)
    assert w.shape == (24, 24) and names[normal] == "SNR"
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_array_equal(np.diag(w), 1.0)
    assert ((w >= 0) & (w <= 1)).all()
    for (a, b), value in PUBLISHED_WEIGHTS.items():
        assert w[names.index(a), names.index(b)] == pytest.approx(value, abs=1e-12), (a, b)
    assert cinc2021_weights(["SNR", "LVH"]) is None and cinc2021_weights(["AF"]) is None


def test_challenge_score_follows_the_rule():
    names = ["AF", "IAVB", "SNR", "TAb", "CRBBB|RBBB"]
    w, normal = cinc2021_weights(names)
    rng = np.random.default_rng(3)
    y = rng.random((30, 5)) < 0.3
    p = rng.random((30, 5)) < 0.3
    assert challenge_score(y, p, w, normal) == pytest.approx(_challenge_by_loops(y, p, w, normal))
    assert challenge_score(y, y, w, normal) == pytest.approx(1.0)
    only_normal = np.zeros_like(y)
    only_normal[:, normal] = True
    assert challenge_score(y, only_normal, w, normal) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="weights must be"):
        challenge_score(y, p, w[:2, :2], normal)


def test_bootstrap_intervals_and_undefined_resamples():
    x = np.arange(50, dtype=float)
    ci = bootstrap(lambda idx: {"mean": float(x[idx].mean()), "never": float("nan")}, 50, n_boot=300, seed=0)
    assert ci["mean"]["low"] < x.mean() < ci["mean"]["high"]
    assert ci["mean"]["n_undefined"] == 0 and ci["never"]["n_undefined"] == 300 and np.isnan(ci["never"]["low"])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap(lambda idx: {}, 50, n_boot=0)


def test_report_tunes_thresholds_on_validation_only():
    yv, sv = _fixed(seed=4)
    yt, st = _fixed(seed=5)
    names = ["AF", "SNR", "TAb", "IAVB"]
    w, normal = cinc2021_weights(names)
    a = classification_report(yv, sv, yt, st, names, n_boot=20, weights=w, normal=normal)
    b = classification_report(yv, sv, 1 - yt, st, names, n_boot=20)  # other test labels, same thresholds
    assert [r["threshold_fbeta"] for r in a["per_class"]] == [r["threshold_fbeta"] for r in b["per_class"]]
    t = tune_thresholds(yv, sv, "fbeta")
    expected = fbeta_score(yt, apply_thresholds(st, t), beta=2, average="macro", zero_division=0)
    assert a["macro"]["fbeta"] == pytest.approx(expected)
    assert "challenge" in a["macro"] and a["ci95"]["auroc"]["low"] <= a["ci95"]["auroc"]["high"]
    assert a["per_class"][3]["threshold_fbeta"] is None  # no validation positives: never predicted
