"""Assembling one synthetic record, and a dataset of them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .beats import beat_tables, build_templates
from .labels import CLASS_NAMES, label_vector, sample_clinical_state, task_classes
from .noise import add_noise
from .physics import evaluate_dipole, perturbed_lead_matrix, unit
from .rhythm import make_rhythm

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


@dataclass
class SyntheticSet:
    signals: np.ndarray        # float32 [N, 12, T] in mV, lead order I, II, III, aVR, aVL, aVF, V1..V6
    fs: int
    labels: np.ndarray         # float32 [N, C] multi-hot
    class_names: list[str]
    rpeaks: list[np.ndarray]   # int64 sample indices per record
    splits: np.ndarray         # int8 [N]: 0 train, 1 val, 2 test


def derive_limb_leads(i: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """III, aVR, aVL, aVF from I and II (Einthoven, Goldberger), computed in the dtype of the inputs so that the
    relations hold exactly for the stored float32 values."""
    return np.stack([ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2])


def split_of(index: int | np.ndarray) -> np.ndarray:
    """Deterministic 80/10/10 split from a SplitMix64 hash of the record index (independent of the seed, so a
    record's split never changes when a dataset is regenerated or extended)."""
    z = np.asarray(index, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    d = (z % np.uint64(10)).astype(np.int64)
    return np.where(d < 8, 0, np.where(d == 8, 1, 2)).astype(np.int8)


def _fibrillatory_waves(rng: np.random.Generator, n: int, fs: int, gain: float) -> np.ndarray:
    """Atrial fibrillation f-waves as a [3, n] dipole: two 4-9 Hz oscillations whose frequency wanders (a smoothed
    random walk) and whose amplitude waxes and wanes, along an atrial direction that favours V1 and the inferior
    leads."""
    t = np.arange(n) / fs
    out = np.zeros(n)
    for _ in range(2):
        f0 = rng.uniform(4.5, 8.5)
        df = np.cumsum(rng.normal(0.0, 0.08, size=n))
        df = np.convolve(df - df.mean(), np.ones(fs // 4) / (fs // 4), mode="same")
        phase = 2 * np.pi * np.cumsum(f0 + np.clip(df, -1.5, 1.5)) / fs + rng.uniform(0, 2 * np.pi)
        am = 0.7 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))
        out += rng.uniform(0.3, 1.0) * am * np.sin(phase)
    amp = rng.uniform(0.025, 0.1) * gain
    u = unit([-0.3, 0.5, 0.8] + rng.normal(0, 0.2, 3))
    return amp * u[:, None] * out[None, :]


def generate_record(seed: int, index: int, fs: int = 100, duration_s: float = 10.0, *,
                    noise: float = 1.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """One labelled 12-lead record; depends only on (seed, index, fs, duration_s, noise).

    Returns the signal float32 [12, T] in mV, the ground-truth R-peak sample indices (int64, the R time of every
    beat inside the strip, rounded to the nearest sample) and an info dict: labels by name (subclasses,
    superclasses, rhythms), severities, latent intervals and amplitudes, heart rate, beat types and noise."""
    rng = np.random.default_rng([int(seed), int(index)])
    n = int(round(duration_s * fs))
    state = sample_clinical_state(rng)
    tpl, pvc, latent = build_templates(rng, state)
    times, types = make_rhythm(rng, state, n / fs)
    rr_prev = np.diff(times, prepend=times[0] - 60.0 / state["hr"])
    c, sl, sr, a, u = beat_tables(tpl, pvc, types, rr_prev, latent["qtc_ms"] / 1000, latent["qrs_ms"] / 1000, rng)
    # Respiration also modulates the QRS amplitude slightly (the heart moves against the electrodes).
    a = a * (1.0 + 0.04 * np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * times + rng.uniform(0, 6.3)))[:, None]
    dip = evaluate_dipole(times, c, sl, sr, a, u, fs, n, 0.0)
    if state["rhythm"] == "AFIB":
        dip += _fibrillatory_waves(rng, n, fs, latent["gain"])
    leads8 = perturbed_lead_matrix(rng) @ dip
    leads8, noise_info = add_noise(rng, leads8, fs, noise)
    leads8 = leads8.astype(np.float32)
    sig = np.empty((12, n), dtype=np.float32)
    sig[0:2] = leads8[0:2]
    sig[2:6] = derive_limb_leads(leads8[0], leads8[1])
    sig[6:12] = leads8[2:8]
    idx = np.rint(times * fs).astype(np.int64)
    keep = (idx >= 0) & (idx < n)
    rpeaks = idx[keep]
    vis_t = times[keep]
    rr = np.diff(vis_t)
    if state["pvc"] and not (types[keep] == 2).any():   # a very short strip had no room for an ectopic beat
        state["labels"]["PVC"] = 0
    info = {
        "index": int(index), "seed": int(seed), "fs": int(fs),
        "labels": state["labels"], "rhythm": state["rhythm"], "present": list(state["present"]),
        "severity": state["severity"], "subclinical": state["subclinical"],
        "hr_bpm": state["hr"],
        "mean_hr_bpm": float(60.0 / rr.mean()) if len(rr) else float("nan"),
        "beat_types": types[keep].copy(), "latent": latent, "noise": noise_info,
        "split": int(split_of(index)),
    }
    return sig, rpeaks, info


def generate_dataset(n_records: int, seed: int = 0, fs: int = 100, duration_s: float = 10.0,
                     task: str = "all", *, start: int = 0, noise: float = 1.0) -> SyntheticSet:
    """Records start .. start + n_records - 1 of the dataset `seed`; shards with different `start` concatenate
    to exactly the records of one big call."""
    names = task_classes(task)
    n = int(round(duration_s * fs))
    signals = np.empty((n_records, 12, n), dtype=np.float32)
    labels = np.empty((n_records, len(names)), dtype=np.float32)
    rpeaks: list[np.ndarray] = []
    for k in range(n_records):
        sig, rp, info = generate_record(seed, start + k, fs, duration_s, noise=noise)
        signals[k] = sig
        labels[k] = label_vector(info["labels"], task)
        rpeaks.append(rp)
    splits = split_of(np.arange(start, start + n_records))
    return SyntheticSet(signals, int(fs), labels, names, rpeaks, splits)


__all__ = ["SyntheticSet", "generate_record", "generate_dataset", "derive_limb_leads", "split_of", "LEADS",
           "CLASS_NAMES"]
