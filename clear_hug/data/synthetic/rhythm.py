"""Beat timing: when each beat's QRS happens and what kind of beat it is.

Beat types: 0 conducted sinus beat (P wave precedes it), 1 conducted beat in atrial fibrillation (no P), 2 premature
ventricular contraction (no P, wide QRS).  Times are in seconds relative to the first sample of the strip; beats
are generated from before the strip starts to after it ends so that waves cut by the edges are still drawn.
"""
from __future__ import annotations

import numpy as np

LEAD_IN, LEAD_OUT = 1.0, 0.6   # keep beats with R in [-LEAD_IN, duration + LEAD_OUT]


def sinus_times(rng: np.random.Generator, hr: float, duration: float) -> np.ndarray:
    """Sinus rhythm with respiratory sinus arrhythmia (a sinusoid in the RR series) plus small random jitter.
    Both are zero-mean, so the labelled rate is the mean rate."""
    rr = 60.0 / hr
    n = int(np.ceil((duration + LEAD_IN + LEAD_OUT + 2 * rr) / (0.85 * rr))) + 2
    rsa = rng.uniform(0.01, 0.05) * min(1.0, 75.0 / hr)   # sinus arrhythmia fades at fast rates
    f_resp = rng.uniform(0.18, 0.35)
    k = np.arange(n)
    rrs = rr * (1.0 + rsa * np.sin(2 * np.pi * f_resp * k * rr + rng.uniform(0, 2 * np.pi))
                + rng.normal(0.0, rng.uniform(0.005, 0.018), size=n))
    t = -LEAD_IN - rng.uniform(0.0, rr) + np.concatenate([[0.0], np.cumsum(rrs[:-1])])
    return t[t <= duration + LEAD_OUT]


def afib_times(rng: np.random.Generator, hr: float, duration: float) -> np.ndarray:
    """Irregularly irregular ventricular response: independent RR intervals (log-normal, CV 0.15-0.35) with a
    refractory floor."""
    rr = 60.0 / hr
    cv = rng.uniform(0.15, 0.35)
    sigma = np.sqrt(np.log1p(cv ** 2))
    n = int(np.ceil((duration + LEAD_IN + LEAD_OUT + 2) / (0.5 * rr))) + 4
    rrs = np.maximum(rr * np.exp(rng.normal(-0.5 * sigma ** 2, sigma, size=n)), 0.3)
    t = -LEAD_IN - rng.uniform(0.0, rr) + np.concatenate([[0.0], np.cumsum(rrs[:-1])])
    return t[t <= duration + LEAD_OUT]


def insert_pvcs(rng: np.random.Generator, t: np.ndarray, duration: float) -> tuple[np.ndarray, np.ndarray]:
    """Replace 1-3 sinus beats by premature ventricular beats.  The PVC comes early (coupling 45-70% of the RR);
    the sinus impulse it replaces is blocked, and the next sinus beat arrives on time: a full compensatory pause
    (the interval around the PVC equals two sinus RR intervals)."""
    types = np.zeros(len(t), dtype=np.int8)
    # candidates: visible beats with a sinus predecessor and successor; no two PVCs adjacent
    cand = np.arange(1, len(t) - 1)
    cand = cand[(t[cand - 1] > 0.05) & (t[cand] < duration - 0.3)]   # the PVC lands inside the strip
    n = min(len(cand), 1 + int(rng.choice(3, p=[0.6, 0.3, 0.1])))
    chosen: list[int] = []
    for k in rng.permutation(cand):
        if len(chosen) == n:
            break
        if all(abs(int(k) - j) > 1 for j in chosen):
            chosen.append(int(k))
    t = t.copy()
    for k in chosen:
        rr = t[k] - t[k - 1]
        # the ectopic beat falls after the preceding T wave (no R-on-T), however fast the sinus rate
        t[k] = t[k - 1] + min(max(rng.uniform(0.45, 0.7) * rr, 0.32), 0.78 * rr)
        types[k] = 2
    return t, types


def make_rhythm(rng: np.random.Generator, state: dict, duration: float) -> tuple[np.ndarray, np.ndarray]:
    """Beat times (s) and beat types for a clinical state."""
    if state["rhythm"] == "AFIB":
        t = afib_times(rng, state["hr"], duration)
        return t, np.ones(len(t), dtype=np.int8)
    t = sinus_times(rng, state["hr"], duration)
    if state["pvc"]:
        return insert_pvcs(rng, t, duration)
    return t, np.zeros(len(t), dtype=np.int8)
