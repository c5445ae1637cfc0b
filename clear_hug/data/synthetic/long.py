"""Long synthetic records (minutes) with paroxysmal episodes, labelled per beat: the long-record task.

One patient per record (templates, axis, noise from the strip generator's models), in sinus rhythm, with:

* paroxysmal atrial fibrillation: 1-3 episodes of 20 s to a third of the record in about half of the records;
  inside an episode the RR intervals are irregularly irregular, P waves vanish and f-waves appear;
* runs of ectopic beats: 1-4 runs of 3-8 premature ventricular beats at 130-190 bpm in about half of the
  records, each followed by a compensatory pause.

Beats are labelled by the episodes their R peak falls in (``BEAT_CLASSES``: "AFIB", "ECTOPIC"); a record carries
a class when any of its beats does. Record ``index`` of dataset ``seed`` depends on nothing else, so shards
made with different ``start`` concatenate to one big call's records.

    >>> ds = generate_long_dataset(4, seed=0, min_minutes=1, max_minutes=2)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..annotations import Episode, episode_labels
from .beats import beat_tables, build_templates
from .generator import _fibrillatory_waves, derive_limb_leads, split_of
from .labels import HR_RANGE, sample_clinical_state
from .noise import add_noise
from .physics import W, evaluate_dipole, perturbed_lead_matrix
from .rhythm import afib_times, sinus_times

BEAT_CLASSES = ["AFIB", "ECTOPIC"]
_MIN_RR = 0.3  # s: no two beats closer than this where segments meet


@dataclass
class LongSet:
    signals: list[np.ndarray]  # float32 [12, T_i] in mV (T_i differs per record)
    fs: int
    labels: np.ndarray  # float32 [N, 2]: any AFIB beat, any ECTOPIC beat
    class_names: list[str]
    rpeaks: list[np.ndarray]  # int64 sample indices
    splits: np.ndarray  # int8 [N]
    episodes: list[list[Episode]]


def _af_segments(rng: np.random.Generator, duration: float, p_af: float) -> list[tuple[float, float]]:
    if rng.random() >= p_af:
        return []
    out: list[tuple[float, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        length = rng.uniform(20.0, max(21.0, duration / 3))
        start = rng.uniform(2.0, max(2.5, duration - length - 2.0))
        end = min(start + length, duration - 1.0)
        # Keep episodes apart by at least 10 s of sinus rhythm, so each is its own paroxysm.
        if end - start > 10 and all(end + 10 < s or start > e + 10 for s, e in out):
            out.append((start, end))
    return sorted(out)


def _beats(rng: np.random.Generator, duration: float, hr: float, af: list[tuple[float, float]]):
    """Beat times and types (0 sinus, 1 conducted AF, 2 ventricular ectopic) over the whole record."""
    cuts = [0.0] + [x for seg in af for x in seg] + [duration]
    times, types = [], []
    for k in range(len(cuts) - 1):
        a, b = cuts[k], cuts[k + 1]
        in_af = k % 2 == 1
        if in_af:
            t = afib_times(rng, rng.uniform(*HR_RANGE["AFIB"]), b - a)
        else:
            t = sinus_times(rng, hr, b - a)
        lo = -1.0 if k == 0 else 0.0  # the first segment keeps its lead-in beats (waves cut by the edge)
        hi = (b - a) + (0.6 if k == len(cuts) - 2 else 0.0)
        t = a + t[(t >= lo) & (t < hi)]
        times.append(t)
        types.append(np.full(len(t), 1 if in_af else 0, np.int8))
    t, ty = np.concatenate(times), np.concatenate(types)
    keep = np.concatenate([[True], np.diff(t) >= _MIN_RR])
    while not keep.all():  # drop beats that crowd the one before them where segments meet
        t, ty = t[keep], ty[keep]
        keep = np.concatenate([[True], np.diff(t) >= _MIN_RR])
    return t, ty


def _ectopic_runs(rng: np.random.Generator, t: np.ndarray, ty: np.ndarray, duration: float, p_ectopic: float):
    """Replace stretches of sinus beats by runs of 3-8 premature ventricular beats; returns the new beats and the
    run episodes."""
    episodes: list[Episode] = []
    if rng.random() >= p_ectopic:
        return t, ty, episodes
    for _ in range(int(rng.integers(1, 5))):
        n_run = int(rng.integers(3, 9))
        cand = np.flatnonzero((ty[:-n_run - 3] == 0) & (t[:-n_run - 3] > 3.0) & (t[:-n_run - 3] < duration - 8.0))
        cand = [k for k in cand if (ty[k:k + n_run + 3] == 0).all()]
        if not cand:
            break
        k = int(rng.choice(cand))
        rr = t[k] - t[k - 1]
        step = 60.0 / rng.uniform(130.0, 190.0)
        run = t[k - 1] + max(0.45 * rr, 0.34) + step * np.arange(n_run)
        # The sinus beats the run overlaps are blocked; the next sinus beat comes after a compensatory pause.
        resume = run[-1] + max(rr, 0.6)
        before, after = t < run[0] - 0.2, t >= resume
        t = np.concatenate([t[before], run, t[after]])
        ty = np.concatenate([ty[before], np.full(n_run, 2, np.int8), ty[after]])
        episodes.append(Episode(float(run[0] - 0.1), float(run[-1] + 0.1), "ECTOPIC"))
    return t, ty, episodes


def generate_long_record(seed: int, index: int, fs: int = 100, duration_s: float | None = None, *,
                         min_minutes: float = 1.0, max_minutes: float = 10.0, p_af: float = 0.5,
                         p_ectopic: float = 0.5, noise: float = 1.0):
    """One long record: ``(signal [12, T] float32 mV, R peaks int64, episodes, beat types int8)``."""
    if not 0 < min_minutes <= max_minutes:
        raise ValueError(f"need 0 < min_minutes <= max_minutes, got {min_minutes}, {max_minutes}")
    # A stream of its own (tag 7), so long records never repeat the strips of the same (seed, index).
    rng = np.random.default_rng([int(seed), int(index), 7])
    duration = float(duration_s) if duration_s is not None else 60.0 * rng.uniform(min_minutes, max_minutes)
    n = int(round(duration * fs))
    state = sample_clinical_state(rng)
    state["rhythm"], state["pvc"] = "SR", False  # the episodes bring the arrhythmias
    state["hr"] = rng.uniform(*HR_RANGE["SR"])
    tpl, pvc, latent = build_templates(rng, state)
    af = _af_segments(rng, duration, p_af)
    t, ty = _beats(rng, duration, state["hr"], af)
    t, ty, ectopic = _ectopic_runs(rng, t, ty, duration, p_ectopic)
    rr_prev = np.diff(t, prepend=t[0] - 60.0 / state["hr"])
    c, sl, sr, a, u = beat_tables(tpl, pvc, ty, rr_prev, latent["qtc_ms"] / 1000, latent["qrs_ms"] / 1000, rng)
    a = a.copy()
    a[np.ix_(ty == 1, [W["P1"], W["P2"]])] = 0.0  # no P wave in AF
    dip = evaluate_dipole(t, c, sl, sr, a, u, fs, n, 0.0)
    if af:
        secs = np.arange(n) / fs
        gate = np.zeros(n)
        for s, e in af:
            gate = np.maximum(gate, np.clip(np.minimum(secs - s, e - secs) / 0.5 + 0.5, 0.0, 1.0))
        dip += _fibrillatory_waves(rng, n, fs, latent["gain"]) * gate[None, :]
    leads8, _ = add_noise(rng, perturbed_lead_matrix(rng) @ dip, fs, noise)
    leads8 = leads8.astype(np.float32)
    sig = np.empty((12, n), dtype=np.float32)
    sig[0:2] = leads8[0:2]
    sig[2:6] = derive_limb_leads(leads8[0], leads8[1])
    sig[6:12] = leads8[2:8]
    idx = np.rint(t * fs).astype(np.int64)
    keep = (idx >= 0) & (idx < n)
    episodes = sorted([Episode(float(s), float(e), "AFIB") for s, e in af] + ectopic, key=lambda e: e.start_s)
    return sig, idx[keep], episodes, ty[keep]


def generate_long_dataset(n_records: int, seed: int = 0, fs: int = 100, *, start: int = 0, **options) -> LongSet:
    """Records ``start .. start + n_records - 1`` of long dataset ``seed`` (options: ``generate_long_record``)."""
    signals, rpeaks, episodes = [], [], []
    labels = np.zeros((n_records, len(BEAT_CLASSES)), np.float32)
    for k in range(n_records):
        sig, r, eps, _ = generate_long_record(seed, start + k, fs, **options)
        signals.append(sig)
        rpeaks.append(r)
        episodes.append(eps)
        labels[k] = episode_labels(r / fs, eps, BEAT_CLASSES).max(0) if len(r) else 0
    splits = split_of(np.arange(start, start + n_records))
    return LongSet(signals, int(fs), labels, list(BEAT_CLASSES), rpeaks, splits, episodes)


__all__ = ["BEAT_CLASSES", "LongSet", "generate_long_record", "generate_long_dataset"]
