"""Label vocabulary of the synthetic ECG generator and the sampling of a record's clinical state.

The hierarchy mirrors PTB-XL's diagnostic statements: five superclasses, each holding one or more subclasses,
plus an independent rhythm axis.  A record's *clinical state* is the set of labels it carries together with a
continuous severity per abnormality (0 = just past the diagnostic threshold, 1 = marked) and, for the classes a
record does NOT carry, a "subclinical" tendency in [0, 1) that pushes the same physical parameter towards (but
never past) the threshold.  The two together make the classes overlap near the border, as real labels do.
"""
from __future__ import annotations

import numpy as np

# Diagnostic subclasses, grouped under their superclass (order is the order of the label columns).
SUBCLASSES: dict[str, tuple[str, ...]] = {
    "NORM": ("NORM",),
    "CD": ("RBBB", "LBBB", "1AVB"),
    "HYP": ("LVH",),
    "MI": ("IMI", "AMI"),
    "STTC": ("STTC",),
}
SUPERCLASSES: list[str] = list(SUBCLASSES)
SUBDIAGNOSTIC: list[str] = [s for subs in SUBCLASSES.values() for s in subs]
RHYTHMS: list[str] = ["SR", "SBRAD", "STACH", "AFIB", "PVC"]
CLASS_NAMES: list[str] = SUBDIAGNOSTIC + RHYTHMS
ABNORMALITIES: list[str] = [s for s in SUBDIAGNOSTIC if s != "NORM"]
SUPER_OF: dict[str, str] = {sub: sup for sup, subs in SUBCLASSES.items() for sub in subs}

TASKS: dict[str, list[str]] = {
    "superdiagnostic": SUPERCLASSES,
    "subdiagnostic": SUBDIAGNOSTIC,
    "rhythm": RHYTHMS,
    "all": CLASS_NAMES,
}

# Priors (see the table in the package docstring).  A record is morphologically normal with P_NORM; otherwise it
# carries 1, 2 or 3 abnormalities drawn without replacement with these relative weights.
P_NORM = 0.37
N_ABNORMAL_P = np.array([0.62, 0.29, 0.09])
ABNORMAL_WEIGHTS = {"RBBB": 1.0, "LBBB": 0.75, "1AVB": 1.0, "LVH": 1.15, "IMI": 1.0, "AMI": 0.95, "STTC": 1.25}
# Mutually exclusive pairs (a ventricle cannot conduct through both bundles blocked and still look like either).
EXCLUSIVE = {("RBBB", "LBBB")}
# Primary rhythm (exactly one) and the independent PVC flag (not with AFIB: the compensatory pause is a sinus idea).
RHYTHM_P = {"SR": 0.62, "SBRAD": 0.125, "STACH": 0.125, "AFIB": 0.13}
P_PVC = 0.12
# Heart-rate ranges (bpm) of the primary rhythms; they touch at the thresholds so borderline rates exist.
HR_RANGE = {"SR": (60.0, 100.0), "SBRAD": (40.0, 60.0), "STACH": (100.0, 150.0), "AFIB": (60.0, 150.0)}


def sample_clinical_state(rng: np.random.Generator) -> dict:
    """Draw labels, severities and subclinical tendencies of one record."""
    rhythm = str(rng.choice(list(RHYTHM_P), p=np.array(list(RHYTHM_P.values()))))
    pvc = rhythm != "AFIB" and rng.random() < P_PVC / (1.0 - RHYTHM_P["AFIB"])
    present: list[str] = []
    if rng.random() >= P_NORM:
        n = 1 + int(rng.choice(3, p=N_ABNORMAL_P))
        names = list(ABNORMAL_WEIGHTS)
        w = np.array([ABNORMAL_WEIGHTS[k] for k in names])
        if rhythm == "AFIB":  # no P waves, so no PR interval to prolong
            w[names.index("1AVB")] = 0.0
        while len(present) < n and w.sum() > 0:
            k = names[int(rng.choice(len(names), p=w / w.sum()))]
            w[names.index(k)] = 0.0
            if any((k, o) in EXCLUSIVE or (o, k) in EXCLUSIVE for o in present):
                continue
            present.append(k)
    # Severity for present classes: Beta(1, 1.6) puts much of the mass near 0, i.e. near the diagnostic border.
    severity = {k: float(rng.beta(1.0, 1.6)) for k in present}
    # Subclinical tendency for absent classes: squared uniform, mostly small, sometimes close to the border.
    sub = {k: float(rng.random() ** 2) for k in ABNORMALITIES if k not in present}
    lo, hi = HR_RANGE[rhythm]
    hr = float(rng.uniform(lo, hi))
    labels = {name: 0 for name in CLASS_NAMES + SUPERCLASSES}
    for k in present:
        labels[k] = 1
        labels[SUPER_OF[k]] = 1
    if not present:
        labels["NORM"] = 1
    labels[rhythm] = 1
    labels["PVC"] = int(pvc)
    return {"rhythm": rhythm, "pvc": bool(pvc), "present": present, "severity": severity,
            "subclinical": sub, "hr": hr, "labels": labels}


def label_vector(labels: dict, task: str) -> np.ndarray:
    names = task_classes(task)
    return np.array([labels[n] for n in names], dtype=np.float32)


def task_classes(task: str) -> list[str]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return list(TASKS[task])
