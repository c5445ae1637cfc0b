"""Shared helpers for the data tests: where the real records are, and a simple synthetic ECG with known beats.

The real records live beside the repository (``../shared/ecg``), never inside it; ``CLEAR_HUG_ECG_DIR`` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clear_hug.data.readers import shared_ecg_dir as ecg_dir


def need_ecg(sub: str) -> Path:
    """Path of a folder of real records, or skip the test with a message saying what is missing."""
    p = ecg_dir() / sub
    if not p.exists():
        pytest.skip(f"real ECG records not found at {p} (set CLEAR_HUG_ECG_DIR to the shared/ecg folder)")
    return p


def toy_ecg(fs: float, rr_s, n_leads: int = 12, seed: int = 0, noise: float = 0.02, start_s: float = 0.5):
    """A crude but ECG-like multi-lead signal: per beat a narrow QRS (Q, R, S) and a broad T wave.

    Each lead has its own QRS gain (some negative, as in aVR/V1) and T gain; returns (signal [C, T] float32 mV,
    R-peak sample indices). The R peak of the strongest lead is exactly at the returned index.
    """
    rng = np.random.default_rng(seed)
    r_times = start_s + np.concatenate([[0.0], np.cumsum(rr_s)])
    dur = r_times[-1] + 0.6
    t = np.arange(int(dur * fs)) / fs
    gains = rng.uniform(0.4, 1.5, n_leads) * rng.choice([-1, 1], n_leads)
    gains[0] = 1.5
    tg = rng.uniform(0.1, 0.3, n_leads) * np.sign(gains)
    x = np.zeros((n_leads, len(t)))
    for rt in r_times:
        qrs = (np.exp(-0.5 * ((t - rt) / 0.010) ** 2) - 0.15 * np.exp(-0.5 * ((t - rt + 0.025) / 0.008) ** 2)
               - 0.25 * np.exp(-0.5 * ((t - rt - 0.03) / 0.010) ** 2))
        tw = np.exp(-0.5 * ((t - rt - 0.28) / 0.05) ** 2)
        x += gains[:, None] * qrs[None] + tg[:, None] * tw[None]
    x += noise * rng.standard_normal(x.shape)
    x += 0.1 * np.sin(2 * np.pi * 0.3 * t)[None]  # baseline wander
    return x.astype(np.float32), np.round(r_times * fs).astype(np.int64)


PTBXL_NAMES = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]  # PTB-XL's spelling


def write_record(dirpath, name, sig, fs, names, units="mV", comments=None, gain=1000.0):
    """Write ``sig`` [C, T] as a WFDB record (16-bit .dat) and return its base path."""
    import wfdb

    os.makedirs(dirpath, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=[units] * len(names), sig_name=list(names), p_signal=np.asarray(sig, float).T,
                fmt=["16"] * len(names), adc_gain=[gain] * len(names), baseline=[0] * len(names),
                comments=comments or [], write_dir=str(dirpath))
    return os.path.join(str(dirpath), name)


STATEMENTS = [  # code, diagnostic, form, rhythm, class, subclass
    ("NORM", 1, None, None, "NORM", "NORM"),
    ("IMI", 1, None, None, "MI", "IMI"),
    ("ASMI", 1, None, None, "MI", "AMI"),
    ("LVH", 1, None, None, "HYP", "LVH"),
    ("NDT", 1, 1, None, "STTC", "STTC"),
    ("PVC", None, 1, None, None, None),
    ("ABQRS", None, 1, None, None, None),
    ("SR", None, None, 1, None, None),
    ("AFIB", None, None, 1, None, None),
]
RECORDS = [  # ecg_id, scp_codes, strat_fold
    (1, {"NORM": 100.0, "SR": 0.0}, 1),
    (2, {"IMI": 80.0, "ASMI": 50.0, "ABQRS": 0.0, "SR": 0.0}, 5),
    (3, {"LVH": 100.0, "NDT": 100.0, "AFIB": 0.0}, 9),
    (4, {"PVC": 100.0, "SR": 0.0}, 10),  # no diagnostic statement
    (5, {"NDT": 50.0, "UNKNOWNCODE": 100.0}, 10),  # no rhythm statement; an unknown code is ignored
]


def write_ptbxl_fixture(tmp_path):
    """A tiny PTB-XL folder (CSV files and records100/records500 WFDB records) written into ``tmp_path``."""
    import pandas as pd

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    st = pd.DataFrame([dict(code=c, description=c.lower(), diagnostic=dg, form=f, rhythm=r, diagnostic_class=k,
                            diagnostic_subclass=s) for c, dg, f, r, k, s in STATEMENTS]).set_index("code")
    st.index.name = None
    st.to_csv(tmp_path / "scp_statements.csv")
    rows = []
    for ecg_id, codes, fold in RECORDS:
        lr, hr = f"records100/00000/{ecg_id:05d}_lr", f"records500/00000/{ecg_id:05d}_hr"
        for rel, fs in ((lr, 100), (hr, 500)):
            x, _ = toy_ecg(fs, [0.85] * 10, n_leads=12, seed=ecg_id)
            write_record(tmp_path / os.path.dirname(rel), os.path.basename(rel), x, fs, PTBXL_NAMES)
        rows.append(dict(ecg_id=ecg_id, patient_id=100 + ecg_id, scp_codes=repr(codes), strat_fold=fold,
                         filename_lr=lr, filename_hr=hr))
    pd.DataFrame(rows).to_csv(tmp_path / "ptbxl_database.csv", index=False)
    return tmp_path


