"""Multi-lead R-peak detection: one set of beats for all leads of a record.

Why multi-lead: single-lead detectors (Pan-Tompkins on lead II, say) fail on real strips where that lead is
noisy, low-voltage or disconnected. Here every lead votes: each lead's QRS slope energy is normalised by its
own typical beat level, leads are weighted by how "peaky" (ECG-like) they look and by how large their QRS is
above the noise (P and T waves are not larger where the QRS is), sample by sample turned down where their local
noise floor rises (an electrode moving) and silenced where they are flat (an electrode off), and the weighted
energies are pooled into one envelope. Beats are peaks of that envelope that pass an adaptive threshold, with a
refractory period, a search-back for missed beats in long gaps and a T-wave check; each accepted peak is then
moved to the local extremum of a combined wide-band signal, which is where the R wave is. Beats at the strip's
ends, where the filters see padding, are judged on the raw samples: one counts when its R is inside the strip.

Everything is vectorised numpy/scipy except two short loops over gaps and close pairs (a handful of items),
so a 10 s, 12-lead strip takes a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy import signal as sps

from .preprocess import butter_bandpass, filtfilt_sos

# Symbols of wfdb annotations that are heartbeats (the MIT-BIH / PhysioNet beat codes); everything else in an
# .atr file (rhythm changes "+", noise "~", comments, ...) is not a beat and must not be scored.
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")

_QRS_BAND = (5.0, 20.0)  # Hz, where QRS slope energy dominates P and T waves and baseline wander
_WIDE_BAND = (1.0, 40.0)  # Hz, keeps the R wave's shape for locating its extremum
_REFRACTORY_S = 0.20  # no two beats closer than this (300 bpm)
_INTEGRATION_S = 0.10  # about one QRS width
_REFINE_S = 0.08  # half-width of the window in which the R extremum is searched
_THRESHOLD = 0.50  # fraction of the local typical beat level a candidate must reach
_SEARCHBACK = 0.25  # lower fraction used when searching a gap that is too long
_LW_POWER = 3  # how hard a locally noisy lead is turned down (3: tuned on CPSC2021 noise, MIT-BIH, synthetic)
# Lead weighting by QRS size (see _combined_envelope): weight ~ (QRS slope above noise, relative to the median
# lead) ** _AMP_POWER, at most _AMP_CAP ** _AMP_POWER. Power 2 makes the pooled energy a (noise-gated) spatial
# slope magnitude in mV/s instead of an average of per-lead normalised slopes.
_AMP_POWER = 2
_AMP_CAP = 4.0
_NOISE_MAX = 5.0  # a 2 s block maximum of pure noise slope is about 4.5 times its median (Gaussian, 100-500 Hz)
_EDGE_SUMMIT = 0.7  # energy fraction of a typical R summit the edge sample needs: R within ~0.6 sample of it
_INNER_SUMMIT = 0.5  # the same for an edge-zone beat whose summit is inside the strip (rejects T, P waves)
_T_WAVE_S = 0.36  # beats closer than this to the previous one are checked for being T waves


def _bandpass(x: np.ndarray, fs: float, lo: float, hi: float, order: int = 2) -> np.ndarray:
    """Zero-phase Butterworth band-pass along the last axis (cached design)."""
    sos, zi = butter_bandpass(float(fs), float(lo), float(hi), int(order))
    return filtfilt_sos(sos, zi, x, 3 * (2 * len(sos) + 1) * 4)


def _block_max_median(x: np.ndarray, block: int, alive: np.ndarray | None = None) -> np.ndarray:
    """Per row, the median over consecutive blocks of the block maxima: the typical peak level.

    A block of 2 s holds at least one beat at any rate above 30 bpm, so a block maximum is a beat's peak (or
    an artifact), and the median over blocks ignores the few artifacts. With ``alive`` (same shape, bool), blocks
    that are mostly dead (a lead flat for part of the strip) are left out: their zero maxima would otherwise pull
    the lead's level towards zero and blow its live part up when normalising.
    """
    n = x.shape[-1]
    nb = n // block
    if nb < 1:
        return x.max(axis=-1)
    shape = x.shape[:-1] + (nb, block)
    blocks = x[..., : nb * block].reshape(shape).max(axis=-1)
    if alive is None:
        return np.median(blocks, axis=-1)
    live = alive[..., : nb * block].reshape(shape).mean(axis=-1) > 0.5
    if live.all():  # the usual case, one vectorised call
        return np.median(blocks, axis=-1)
    return np.array([np.median(b[m]) if m.any() else 0.0 for b, m in zip(blocks, live)])


def _alive(x: np.ndarray, fs: float) -> np.ndarray:
    """[C, T] bool: where each lead moves at all within +-50 ms. A disconnected electrode clamped by the amplifier
    (or a zero-filled gap) gives exactly constant samples; any real recording, even a quiet one, has
    quantisation-level changes within 100 ms."""
    moving = np.diff(x, axis=-1, prepend=x[:, :1]) != 0
    return ndimage.maximum_filter1d(moving, max(int(round(0.1 * fs)), 1), axis=-1, mode="nearest")


def _combined_envelope(x: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Pooled QRS envelope [T] and per-lead weights [C] (zero for flat leads)."""
    alive = _alive(x, fs)
    bp = _bandpass(x, fs, *_QRS_BAND)
    d = np.abs(np.diff(bp, axis=-1, prepend=bp[:, :1]))
    block = max(int(round(2.0 * fs)), 1)
    level = _block_max_median(d, block, alive)  # typical QRS slope per lead, over its live part
    # Typical slope between beats (noise floor), over the live part too (a flat stretch has none).
    all_alive = bool(alive.all())
    typical = np.median(d, axis=-1) if all_alive else np.array(
        [np.median(r[a]) if a.any() else 0.0 for r, a in zip(d, alive)])
    amp = np.abs(x).max(axis=-1)
    flat = (level <= 1e-12) | (level <= 1e-9 * max(float(amp.max()), 1e-30))
    safe = np.where(flat, 1.0, level)
    dn = d / safe[:, None]
    # Peakiness: an ECG lead has QRS slopes many times its typical slope; a lead of pure noise has a ratio of
    # only a few. Weighting by the excess keeps a noisy lead from flooding the pooled envelope.
    ratio = level / np.maximum(typical, 1e-12 * safe)
    w = np.clip(ratio - 2.0, 0.0, None)
    w[flat] = 0.0
    if _AMP_POWER:
        # P and T waves are about as large in mV in every lead, the QRS is not: normalising each lead by its own
        # QRS level blows up the P/T of leads with a small QRS (LBBB limb leads with a sharp P, for one), until
        # they pass as beats. Weighting leads by their QRS size undoes that. The size counted is the QRS slope
        # above what noise alone reaches, so a loud noise lead (big "level", no beats) gains nothing.
        qrs = np.clip(level - _NOISE_MAX * typical, 0.0, None)
        qrs[flat] = 0.0
        if (qrs > 0).any():
            rel = qrs / np.median(qrs[qrs > 0])
            w = w * np.minimum(rel, _AMP_CAP) ** _AMP_POWER
    if w.sum() <= 0:
        w = (~flat).astype(np.float64)
    if w.sum() <= 0:
        return np.zeros(x.shape[-1]), w
    w = w / w.sum()
    if x.shape[0] > 1:
        # Noise bursts are usually in one lead at a time (an electrode moving). A lead's mean slope over the
        # surrounding second rises in a burst; weighting each lead down by it, sample by sample, lets the clean
        # leads speak there.
        floor = ndimage.uniform_filter1d(dn, max(int(round(fs)), 1), axis=-1, mode="nearest")
        ref = np.median(floor, axis=-1, keepdims=True) if all_alive else np.array(
            [[np.median(f[a]) if a.any() else 0.0] for f, a in zip(floor, alive)])
        # A lead that is flat here (electrode off, amplifier clamped) has no vote here: a zero from it would
        # otherwise dilute the pooled energy of every beat in that stretch.
        wl = alive * (w[:, None] / np.maximum(floor / np.maximum(ref, 1e-12), 1.0) ** _LW_POWER)
        energy = (wl * dn * dn).sum(axis=0) / np.maximum(wl.sum(axis=0), 1e-12)
    else:
        energy = np.tensordot(w, dn * dn, axes=(0, 0))
    width = max(int(round(_INTEGRATION_S * fs)), 1)
    # A running mean of non-negative energy can come out a rounding error below zero (cancellation in the
    # filter's running sum); its square root would be NaN and silently lose the beats around it.
    env = np.sqrt(np.maximum(ndimage.uniform_filter1d(energy, width, mode="nearest"), 0.0))
    return env, w


def _local_level(env: np.ndarray, fs: float, at: np.ndarray) -> np.ndarray:
    """Typical beat height of the envelope around each index in ``at`` (a running median of 2 s maxima)."""
    n = env.shape[0]
    win = max(int(round(2.0 * fs)), 1)
    rolled = ndimage.maximum_filter1d(env, win, mode="nearest")
    step = max(int(round(0.5 * fs)), 1)
    grid = np.arange(0, n, step)
    med = ndimage.median_filter(rolled[grid], size=21, mode="nearest")  # ~10 s of 0.5 s steps
    return np.interp(at, grid, med)


def _searchback(peaks: np.ndarray, cand: np.ndarray, heights: np.ndarray, levels: np.ndarray,
                fs: float) -> np.ndarray:
    """Fill RR gaps much longer than their neighbours with the best sub-threshold candidate in the gap."""
    refr = _REFRACTORY_S * fs
    for _ in range(3):  # a second pass catches two missed beats in the same gap
        if len(peaks) < 3:
            return peaks
        rr = np.diff(peaks)
        med_rr = ndimage.median_filter(rr.astype(np.float64), size=9, mode="nearest")
        # Near a strip's end the local median sees mostly the gaps themselves (missed ectopic beats late in
        # a strip leave doubled intervals there): the record's median interval bounds it.
        med_rr = np.minimum(med_rr, np.median(rr))
        gaps = np.nonzero(rr > 1.6 * med_rr)[0]
        added = []
        for g in gaps:
            a, b = peaks[g], peaks[g + 1]
            sel = (cand > a + refr) & (cand < b - refr) & (heights >= _SEARCHBACK * levels)
            if sel.any():
                idx = np.nonzero(sel)[0]
                added.append(cand[idx[np.argmax(heights[idx])]])
        if not added:
            return peaks
        peaks = np.sort(np.concatenate([peaks, np.asarray(added, dtype=peaks.dtype)]))
    return peaks


def _drop_t_waves(peaks: np.ndarray, env: np.ndarray, fs: float) -> np.ndarray:
    """Of two beats closer than a T-wave distance, drop the later one when it is much weaker.

    A premature beat is as strong as its neighbours and is kept; a T wave, even a tall one, has far less
    QRS-band slope energy than the QRS before it.
    """
    lim = _T_WAVE_S * fs
    keep = np.ones(len(peaks), dtype=bool)
    last = 0
    for i in range(1, len(peaks)):
        if peaks[i] - peaks[last] < lim and env[peaks[i]] < 0.5 * env[peaks[last]]:
            keep[i] = False
        elif peaks[i] - peaks[last] < lim and env[peaks[last]] < 0.5 * env[peaks[i]]:
            keep[last] = False
            last = i
        else:
            last = i
    return peaks[keep]


def _refine(peaks: np.ndarray, x: np.ndarray, w: np.ndarray, fs: float) -> np.ndarray:
    """Move each beat to the extremum of the weighted wide-band energy within +-80 ms."""
    if len(peaks) == 0:
        return peaks
    wide = _bandpass(x, fs, *_WIDE_BAND)
    level = _block_max_median(np.abs(wide), max(int(round(2.0 * fs)), 1))
    level = np.where(level > 0, level, 1.0)
    comb = np.tensordot(w, (wide / level[:, None]) ** 2, axes=(0, 0))
    half = max(int(round(_REFINE_S * fs)), 1)
    offs = np.arange(-half, half + 1)
    idx = np.clip(peaks[:, None] + offs[None, :], 0, len(comb) - 1)
    best = idx[np.arange(len(peaks)), np.argmax(comb[idx], axis=1)]
    best = _edge_beats(best, x, w, level, fs)  # beats at the strip's ends are judged on the raw samples
    # Two envelope peaks may refine onto the same R wave; keep one.
    return np.unique(best)


def _raw_energy(x: np.ndarray, w: np.ndarray, level: np.ndarray, at: np.ndarray, fs: float) -> np.ndarray:
    """Weighted energy of the raw samples at indices ``at`` (baseline: each lead's median over +-0.3 s)."""
    n = x.shape[1]
    hw = max(int(round(0.3 * fs)), 1)
    # The window slides inwards at the ends rather than being clipped: repeating the edge sample would pull the
    # baseline onto a beat cut by the edge and hide it.
    start = np.clip(at - hw, 0, max(n - 2 * hw - 1, 0))
    win = np.minimum(start[:, None] + np.arange(2 * hw + 1)[None, :], n - 1)
    base = np.median(x[:, win], axis=-1)  # [C, len(at)]
    return np.tensordot(w, ((x[:, at] - base) / level[:, None]) ** 2, axes=(0, 0))


def _edge_beats(best: np.ndarray, x: np.ndarray, w: np.ndarray, level: np.ndarray, fs: float) -> np.ndarray:
    """Re-locate beats near the strip's ends on the raw samples, and drop those whose R lies outside.

    A beat counts when its R wave is inside the strip. Near an end the zero-phase filters see a padded signal,
    which pulls the extremum of a beat cut by the edge a few samples inwards: its R, just outside, would be
    reported just inside. The raw samples are not distorted. A beat whose raw energy peaks inside the strip is
    kept there; one whose energy still rises into the edge sample is kept only when that sample already reaches
    most of the record's typical R summit (the R is then within about a sample of it), else its R is outside.
    """
    n = x.shape[1]
    half = max(int(round(_REFINE_S * fs)), 1)
    zone = 2 * half  # an edge candidate may have been moved up to ``half`` inwards by the wide-band refinement
    near = (best < zone) | (best > n - 1 - zone)
    if not near.any():
        return best
    inner = best[~near]
    if len(inner) == 0:
        return best
    summit = np.median(_raw_energy(x, w, level, inner, fs))
    keep = np.ones(len(best), dtype=bool)
    sides = {}  # per end: sample indices from the edge inwards, and their raw energy (computed once)
    for k in np.nonzero(near)[0]:
        end = int(best[k] >= zone)
        if end not in sides:
            side = np.arange(0, zone + 1) if end == 0 else np.arange(n - 1, n - 2 - zone, -1)
            side = side[(side >= 0) & (side < n)]
            sides[end] = side, _raw_energy(x, w, level, side, fs)
        side, e = sides[end]
        j = int(np.argmax(e))
        if e[j] < (_EDGE_SUMMIT if j == 0 else _INNER_SUMMIT) * summit:
            keep[k] = False
        best[k] = side[j]
    return best[keep]


def detect_rpeaks(sig: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices (int64, sorted) of a ``[C, T]`` or ``[T]`` ECG sampled at ``fs`` Hz.

    One set of peaks for all leads together. NaNs are treated as zeros; flat leads are ignored; a record with
    no usable lead (all flat) gives an empty array.
    """
    x = np.asarray(sig, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"signal must be [C, T] or [T], got shape {np.shape(sig)}")
    if not fs or fs <= 0:
        raise ValueError(f"fs must be positive, got {fs}")
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    n = x.shape[1]
    if n < max(int(0.5 * fs), 8):
        return np.zeros(0, dtype=np.int64)
    env, w = _combined_envelope(x, fs)
    if not np.any(env > 0):
        return np.zeros(0, dtype=np.int64)
    dist = max(int(round(_REFRACTORY_S * fs)), 1)
    # Zero-pad by one sample so a beat cut by the strip's edge (envelope still rising there) can be a peak.
    cand, _ = sps.find_peaks(np.concatenate([[0.0], env, [0.0]]), distance=dist)
    cand = cand - 1
    if len(cand) == 0:
        return np.zeros(0, dtype=np.int64)
    heights = env[cand]
    levels = _local_level(env, fs, cand)
    peaks = cand[heights >= _THRESHOLD * levels]
    # Clean weak companions first: noise peaks next to real beats would shrink the local RR estimate and make
    # the search-back see gaps everywhere.
    peaks = _drop_t_waves(peaks, env, fs)
    # Beats found by the search-back are not T-wave checked again: a premature ventricular beat is wide, so weak in
    # the QRS band, comes early, and is followed by a compensatory pause, exactly the gap the search-back fills.
    peaks = _searchback(peaks, cand, heights, levels, fs)
    # A beat cut by an edge is only partly inside the integration window, so its envelope peak is lower:
    # edge candidates get the search-back threshold here and are then judged on the raw samples (_edge_beats).
    half = max(int(round(_REFINE_S * fs)), 1)
    at_edge = ((cand < half) | (cand > n - 1 - half)) & (heights >= _SEARCHBACK * levels)
    extra = cand[at_edge]
    if len(peaks):
        extra = extra[np.min(np.abs(extra[:, None] - peaks[None, :]), axis=1) >= dist]
    peaks = np.sort(np.concatenate([peaks, extra]))
    peaks = _refine(peaks, x, w, fs)
    # After refinement two beats can sit closer than the refractory period; keep the stronger.
    if len(peaks) > 1:
        close = np.nonzero(np.diff(peaks) < dist)[0]
        if len(close):
            drop = np.where(env[peaks[close]] < env[peaks[close + 1]], close, close + 1)
            peaks = np.delete(peaks, drop)
    return peaks.astype(np.int64)


def match_beats(reference: Sequence[int], detected: Sequence[int], tolerance: int) -> tuple[int, int, int]:
    """One-to-one matching of detected to reference beats within ``tolerance`` samples: (TP, FN, FP).

    Greedy in time order. It is optimal when neighbouring beats are further apart than twice the tolerance;
    closer beats (under 300 ms with 150 ms) are rare, and there it can only undercount, never overcount.
    """
    ref = np.sort(np.asarray(reference, dtype=np.int64))
    det = np.sort(np.asarray(detected, dtype=np.int64))
    i = j = tp = 0
    while i < len(ref) and j < len(det):
        d = det[j] - ref[i]
        if abs(d) <= tolerance:
            tp += 1
            i += 1
            j += 1
        elif d < 0:
            j += 1
        else:
            i += 1
    return tp, len(ref) - tp, len(det) - tp


def detection_scores(reference: Sequence[int], detected: Sequence[int], fs: float,
                     tolerance_s: float = 0.15) -> tuple[float, float]:
    """Sensitivity and positive predictivity of ``detected`` against ``reference`` beats."""
    tp, fn, fp = match_beats(reference, detected, int(round(tolerance_s * fs)))
    se = tp / (tp + fn) if tp + fn else 1.0
    ppv = tp / (tp + fp) if tp + fp else 1.0
    return se, ppv
