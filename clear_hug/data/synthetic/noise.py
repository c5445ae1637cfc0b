"""Recording noise, added to the 8 independent leads (I, II, V1-V6) before the other 4 limb leads are derived.

Components, each with a per-record random level scaled by the `noise` knob (1.0 = default):
  baseline wander  respiration (shared by all leads with lead-specific weights) plus slow electrode drift;
  EMG              broadband muscle noise, sometimes in bursts (a patient moving or shivering);
  powerline        50 or 60 Hz, attenuated by the recorder's anti-alias filter as it nears or passes fs/2;
  motion           electrode-skin artefacts: a smooth baseline step decaying over a fraction of a second;
  dropout          one lead flat (electrode off, the amplifier clamps to 0) or disconnected (floating: large
                   drift and hum), for the whole strip or part of it.
The amplitudes are chosen so that the QRS complex stays the dominant fast deflection at the default level.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit


def _aa_gain(f: float, fs: int) -> float:
    """Magnitude of a steep (8th-order-like) anti-alias low-pass at 0.4 fs."""
    return 1.0 / np.sqrt(1.0 + (f / (0.4 * fs)) ** 16)


def add_noise(rng: np.random.Generator, x: np.ndarray, fs: int, noise: float = 1.0) -> tuple[np.ndarray, dict]:
    """Add noise in place to x [8, T] (mV) and return it with a description of what was added."""
    n_lead, n = x.shape
    t = np.arange(n) / fs
    info: dict = {}
    if noise <= 0:
        return x, {"level": 0.0}
    # baseline wander
    f_resp = rng.uniform(0.15, 0.4)
    bw_level = noise * rng.uniform(0.02, 0.15)
    resp = np.sin(2 * np.pi * f_resp * t + rng.uniform(0, 2 * np.pi))
    w = rng.normal(0.0, bw_level, size=(n_lead, 1))
    f_d = rng.uniform(0.03, 0.3, size=(n_lead, 2, 1))
    drift = (rng.normal(0.0, 0.6 * bw_level, size=(n_lead, 2, 1))
             * np.sin(2 * np.pi * f_d * t + rng.uniform(0, 2 * np.pi, size=(n_lead, 2, 1)))).sum(1)
    x += w * resp + drift
    info["baseline_mv"] = float(bw_level)
    # EMG: white noise, first-differenced half-way to tilt it to high frequencies, optional bursts
    emg_level = noise * float(np.exp(rng.normal(np.log(0.012), 0.6)))
    e = rng.standard_normal((n_lead, n + 1))
    e = (e[:, 1:] - 0.5 * e[:, :-1]) / np.sqrt(1.25)
    env = np.ones(n)
    if rng.random() < 0.25:
        for _ in range(rng.integers(1, 3)):
            env += rng.uniform(1.0, 4.0) * np.exp(-0.5 * ((t - rng.uniform(0, t[-1])) / rng.uniform(0.2, 1.0)) ** 2)
    x += emg_level * rng.uniform(0.5, 1.5, size=(n_lead, 1)) * env * e
    info["emg_mv"] = float(emg_level)
    # powerline
    info["powerline_hz"] = 0
    if rng.random() < 0.35:
        f_pl = 50.0 if rng.random() < 0.5 else 60.0
        amp = noise * rng.uniform(0.005, 0.05) * _aa_gain(f_pl, fs)
        x += amp * rng.uniform(0.3, 1.0, size=(n_lead, 1)) * np.sin(2 * np.pi * f_pl * t + rng.uniform(0, 2 * np.pi))
        info["powerline_hz"] = int(f_pl)
    # motion artefacts
    n_motion = int(rng.random() < 0.08 * noise) * int(rng.integers(1, 3))
    for _ in range(n_motion):
        t0, tau, rise = rng.uniform(0, t[-1]), rng.uniform(0.2, 0.6), rng.uniform(0.03, 0.08)
        # expit(z) = 1 / (1 + exp(-z)), a logistic step; computed without overflowing exp far before t0.
        shape = np.exp(-np.clip(t - t0, 0, None) / tau) * expit((t - t0) / rise)
        x += rng.normal(0.0, 0.3 * noise, size=(n_lead, 1)) * shape
    info["motion_events"] = n_motion
    # lead dropout
    info["dropout"] = None
    if rng.random() < 0.04 * noise:
        lead = int(rng.choice(n_lead, p=np.r_[[0.08, 0.08], np.full(6, 0.84 / 6)]))
        a, b = (0, n) if rng.random() < 0.5 else sorted(rng.integers(0, n, size=2))
        b = max(b, min(n, a + 2 * fs))
        if rng.random() < 0.6:
            x[lead, a:b] = 0.0
            kind = "flat"
        else:   # floating electrode: slow random walk plus hum replaces the signal
            walk = np.cumsum(rng.normal(0.0, 0.02, size=b - a))
            walk -= np.linspace(walk[0], walk[-1], b - a) * 0.5
            x[lead, a:b] = walk + 0.1 * np.sin(2 * np.pi * 50.0 * t[a:b]) * _aa_gain(50.0, fs)
            kind = "disconnected"
        info["dropout"] = {"lead": lead, "start": int(a), "stop": int(b), "kind": kind}
    info["level"] = float(noise)
    return x, info
