"""Shared helpers for the data tests: where the real records are, and a simple synthetic ECG with known beats.

The real records live beside the repository (``../shared/ecg``), never inside it; ``CLEAR_HUG_ECG_DIR`` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def ecg_dir() -> Path:
    env = os.environ.get("CLEAR_HUG_ECG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "ecg"


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
