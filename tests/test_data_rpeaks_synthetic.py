"""The detector on the synthetic generator: >= 0.99 sensitivity and positive predictivity for every label."""

import pytest

from clear_hug.data.detector_eval import scores, synthetic_detection_counts


@pytest.fixture(scope="module")
def counts():
    return synthetic_detection_counts(600, seed=11)


def test_every_class_and_rhythm_is_detected(counts):
    assert {"NORM", "RBBB", "LBBB", "1AVB", "LVH", "IMI", "AMI", "STTC",
            "SR", "SBRAD", "STACH", "AFIB", "PVC"} <= set(counts)
    for name, tp_fn_fp in counts.items():
        se, ppv = scores(tp_fn_fp)
        assert tp_fn_fp[0] > 100, f"{name}: too few beats ({tp_fn_fp[0]}) for a meaningful score"
        assert se >= 0.99 and ppv >= 0.99, f"{name}: Se {se:.4f}, +P {ppv:.4f} (TP, FN, FP = {tp_fn_fp})"
