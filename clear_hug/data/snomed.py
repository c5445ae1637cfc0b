"""The one table from SNOMED-CT codes (as written in the ``# Dx:`` line of PhysioNet/CinC headers) to short names.

Short names follow the PhysioNet/CinC Challenge 2020/2021 abbreviations, so that results can be compared with
the literature on CPSC2018, Georgia and Chapman-Shaoxing-Ningbo. A code that is not in this table keeps its
number as its name (``"123456"``): labels are never dropped, only left unnamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

SNOMED_NAMES: dict[int, str] = {
    # rhythms
    426783006: "SNR",  # sinus rhythm (normal)
    427084000: "STach",  # sinus tachycardia
    426177001: "SB",  # sinus bradycardia
    427393009: "SA",  # sinus arrhythmia
    426627000: "Brady",  # bradycardia
    164889003: "AF",  # atrial fibrillation
    164890007: "AFL",  # atrial flutter
    713422000: "ATach",  # atrial tachycardia
    426761007: "SVT",  # supraventricular tachycardia
    67198005: "PSVT",  # paroxysmal supraventricular tachycardia
    164895002: "VTach",  # ventricular tachycardia
    10370003: "PR",  # pacing rhythm
    # ectopy
    284470004: "PAC",  # premature atrial contraction
    63593006: "SVPB",  # supraventricular premature beats
    427172004: "PVC",  # premature ventricular contraction
    17338001: "VPB",  # ventricular premature beats
    164884008: "VEB",  # ventricular ectopic beats (CPSC2018's PVC class)
    # conduction
    270492004: "IAVB",  # first-degree atrioventricular block
    195042002: "IIAVB",  # second-degree atrioventricular block
    27885002: "IIIAVB",  # complete (third-degree) heart block
    233917008: "AVB",  # atrioventricular block
    164947007: "LPR",  # prolonged PR interval
    49578007: "SPRI",  # shortened PR interval
    6374002: "BBB",  # bundle branch block
    59118001: "RBBB",  # right bundle branch block
    713427006: "CRBBB",  # complete right bundle branch block
    713426002: "IRBBB",  # incomplete right bundle branch block
    164909002: "LBBB",  # left bundle branch block
    733534002: "CLBBB",  # complete left bundle branch block
    445118002: "LAnFB",  # left anterior fascicular block
    698252002: "NSIVCB",  # nonspecific intraventricular conduction disorder
    74390002: "WPW",  # Wolff-Parkinson-White pattern
    # axis, voltage, hypertrophy
    39732003: "LAD",  # left axis deviation
    47665007: "RAD",  # right axis deviation
    251146004: "LQRSV",  # low QRS voltages
    164873001: "LVH",  # left ventricular hypertrophy
    89792004: "RVH",  # right ventricular hypertrophy
    67741000119109: "LAE",  # left atrial enlargement
    253352002: "LAA",  # left atrial abnormality
    251198002: "CR",  # clockwise cardiac rotation
    251199001: "CCR",  # counterclockwise cardiac rotation
    365413008: "PRWP",  # poor R wave progression
    # repolarisation, ischaemia, infarction
    164934002: "TAb",  # T-wave abnormality
    59931005: "TInv",  # T-wave inversion
    111975006: "LQT",  # prolonged QT interval
    164917005: "QAb",  # Q-wave abnormality
    429622005: "STD",  # ST depression
    164931005: "STE",  # ST elevation
    55930002: "STC",  # ST changes
    428750005: "NSSTTA",  # nonspecific ST-T abnormality
    164930006: "STIAb",  # ST interval abnormal
    164865005: "MI",  # myocardial infarction
    57054005: "AMI",  # acute myocardial infarction
    164861001: "MIs",  # myocardial ischaemia
    413444003: "AMIs",  # acute myocardial ischaemia
    426434006: "AnMIs",  # anterior ischaemia
}

# The PhysioNet/CinC 2021 challenge's scored classes: (name, the codes scored as that one diagnosis, position).
# Equivalent codes are merged as the challenge does (dx_mapping_scored.csv: "We score 713427006 and 59118001 as the
# same diagnosis", likewise PAC/SVPB, PVC/VPB, CLBBB/LBBB). The position ``a`` rebuilds the challenge's reward
# matrix (weights.csv of the CinC 2021 evaluation code): every off-diagonal entry is 0.5 (1 - |a_i - a_j|)
# and the diagonal is 1 (``cinc2021_weights``; tests/test_metrics.py checks it against entries of the published table).
# BBB (6374002) and PRWP (365413008), scored in the challenge's final round, are not in the table available
# offline, so they are not scored here.
CINC2021_SCORED = (
    ("IAVB", (270492004,), 0.0), ("AF", (164889003,), 0.4), ("AFL", (164890007,), 0.4),
    ("Brady", (426627000,), 0.0), ("CRBBB|RBBB", (713427006, 59118001), 0.2), ("IRBBB", (713426002,), 0.0),
    ("LAnFB", (445118002,), 0.1), ("LAD", (39732003,), 0.1), ("CLBBB|LBBB", (733534002, 164909002), 0.35),
    ("LQRSV", (251146004,), 0.25), ("NSIVCB", (698252002,), 0.1), ("PR", (10370003,), 0.15),
    ("PAC|SVPB", (284470004, 63593006), 0.075), ("PVC|VPB", (427172004, 17338001), 0.15),
    ("LPR", (164947007,), 0.0), ("LQT", (111975006,), 0.3), ("QAb", (164917005,), 0.6), ("RAD", (47665007,), 0.1),
    ("SA", (427393009,), 0.0), ("SB", (426177001,), 0.0), ("SNR", (426783006,), -0.1),
    ("STach", (427084000,), 0.15), ("TAb", (164934002,), 0.4), ("TInv", (59931005,), 0.4),
)
CINC2021_NORMAL = "SNR"  # the class the challenge's "inactive" baseline always predicts
_CINC2021_CLASS = {code: name for name, codes, _ in CINC2021_SCORED for code in codes}
_CINC2021_POSITION = {name: a for name, _, a in CINC2021_SCORED}
LABEL_SETS = ("all", "cinc2021")  # every code (one class per code), or the CinC 2021 scored classes


def snomed_name(code: int) -> str:
    """Short name of a SNOMED-CT code, or the code itself as text when the table does not know it."""
    return SNOMED_NAMES.get(int(code), str(int(code)))


def class_of(code: int, label_set: str = "all") -> str | None:
    """The class a code counts as: its short name (``"all"``), or its CinC 2021 scored class with equivalent
    codes merged (``"cinc2021"``; None for a code the challenge does not score)."""
    if label_set == "all":
        return snomed_name(code)
    if label_set == "cinc2021":
        return _CINC2021_CLASS.get(int(code))
    raise ValueError(f"label_set must be one of {LABEL_SETS}, got {label_set!r}")


def cinc2021_weights(class_names: Sequence[str]) -> tuple[np.ndarray, int] | None:
    """The CinC 2021 reward matrix ``[C, C]`` over ``class_names`` and the index of the normal class, or None
    when a class is not a scored class or the normal class is missing (then the challenge score is undefined)."""
    import numpy as np

    names = list(class_names)
    if not names or any(n not in _CINC2021_POSITION for n in names) or CINC2021_NORMAL not in names:
        return None
    a = np.array([_CINC2021_POSITION[n] for n in names])
    w = 0.5 * (1.0 - np.abs(a[:, None] - a[None, :]))
    np.fill_diagonal(w, 1.0)
    return w, names.index(CINC2021_NORMAL)
