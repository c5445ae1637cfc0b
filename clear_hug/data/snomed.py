"""The one table from SNOMED-CT codes (as written in the ``# Dx:`` line of PhysioNet/CinC headers) to short names.

Short names follow the PhysioNet/CinC Challenge 2020/2021 abbreviations, so that results can be compared with
the literature on CPSC2018, Georgia and Chapman-Shaoxing-Ningbo. A code that is not in this table keeps its
number as its name (``"123456"``): labels are never dropped, only left unnamed.
"""

from __future__ import annotations

from typing import Dict

SNOMED_NAMES: Dict[int, str] = {
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
}


def snomed_name(code: int) -> str:
    """Short name of a SNOMED-CT code, or the code itself as text when the table does not know it."""
    return SNOMED_NAMES.get(int(code), str(int(code)))
