"""Signal conditioning before tokenisation: resampling to 100 Hz, band-pass, NaN repair and lead quality flags.

All functions take ``[C, T]`` (or ``[T]``) arrays and work along the last axis, vectorised over leads.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import signal as sps

TARGET_FS = 100

# What a recording can plausibly be, checked before anything is allocated for it. ECGs are stored at 100 Hz
# (PTB-XL's low-rate copy) up to a few kHz; below 50 Hz a QRS is 2-4 samples wide, above 20 kHz no ECG device
# records. A rate outside the range is a damaged header: 0.001 Hz would make resampling to 100 Hz allocate
# gigabytes, 1e12 Hz cannot be resampled at all.
MIN_FS, MAX_FS = 50.0, 20_000.0
# Samples of all channels of one record: 2^29 float64 values are 4 GiB (24 h of 12 leads at 500 Hz).
MAX_VALUES = 2**29


def check_sampling_rate(fs: float) -> float:
    """``fs`` as a float, or ValueError when it is not a plausible ECG sampling rate (``MIN_FS`` to ``MAX_FS``)."""
    if isinstance(fs, bool) or not isinstance(fs, (int, float, np.integer, np.floating)):
        raise TypeError(f"fs must be a number, got {type(fs).__name__}")
    fs = float(fs)
    if not (math.isfinite(fs) and MIN_FS <= fs <= MAX_FS):
        raise ValueError(f"sampling rate {fs:g} Hz is outside the plausible range of an ECG "
                         f"({MIN_FS:g} to {MAX_FS:g} Hz)")
    return fs


def check_size(n_samples: int, n_channels: int, fs: float) -> None:
    """ValueError when a record of ``n_samples`` x ``n_channels`` would exceed ``MAX_VALUES``."""
    if n_samples * n_channels > MAX_VALUES:
        raise ValueError(f"{n_samples} samples x {n_channels} channels ({n_samples / fs / 3600:.1f} h at {fs:g} Hz) "
                         f"is more than the {MAX_VALUES} values one record may hold")


def resample_ratio(fs_in: float, fs_out: float = TARGET_FS, max_den: int = 1000) -> tuple[int, int]:
    """(up, down) integers with ``up / down`` close to ``fs_out / fs_in`` (500 Hz -> (1, 5), 360 Hz -> (5, 18)).

    A small denominator keeps the polyphase filter short; 1000 keeps the rate error below 0.1% for any
    sampling rate an ECG uses, far below what matters for 10 ms samples.
    """
    if fs_in <= 0 or fs_out <= 0:
        raise ValueError(f"sampling rates must be positive, got {fs_in} -> {fs_out}")
    frac = Fraction(float(fs_out) / float(fs_in)).limit_denominator(max_den)
    if frac.numerator == 0:
        raise ValueError(f"cannot resample {fs_in} Hz to {fs_out} Hz")
    return frac.numerator, frac.denominator


def resample(x: np.ndarray, fs_in: float, fs_out: float = TARGET_FS) -> np.ndarray:
    """Polyphase resampling (anti-aliased) along the last axis; returns float32. A no-op at the target rate."""
    x = np.asarray(x)
    fs_in = check_sampling_rate(fs_in)
    if abs(float(fs_in) - float(fs_out)) < 1e-9:
        return x.astype(np.float32, copy=False)
    up, down = resample_ratio(fs_in, fs_out)
    return sps.resample_poly(x.astype(np.float64), up, down, axis=-1).astype(np.float32)


@lru_cache(maxsize=64)
def butter_bandpass(fs: float, lo: float, hi: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Butterworth band-pass as second-order sections and their step-response initial state, cached per rate.

    Designing the filter and solving for its initial state cost more than filtering a 10 s strip, and every
    record of a dataset uses the same few rates. The upper edge is clamped below Nyquist for low rates, the
    lower edge below the upper one. Callers must not modify the returned arrays (they are shared).
    """
    nyq = 0.5 * fs
    hi = min(hi, 0.45 * fs)
    lo = min(lo, 0.5 * hi)
    sos = sps.butter(order, [lo / nyq, hi / nyq], btype="bandpass", output="sos")
    zi = sps.sosfilt_zi(sos)
    return sos, zi


def filtfilt_sos(sos: np.ndarray, zi: np.ndarray, x: np.ndarray, padlen: int) -> np.ndarray:
    """Forward-backward (zero-phase) filtering along the last axis, with odd extension of ``padlen`` samples.

    The same result as ``scipy.signal.sosfiltfilt`` but with the initial state ``zi`` passed in (cached), each pass
    starting in the steady state of the first sample so that no start-up transient is left at the edges.
    """
    n = x.shape[-1]
    padlen = max(0, min(int(padlen), n - 1))
    if padlen:
        head = 2 * x[..., :1] - x[..., padlen:0:-1]
        tail = 2 * x[..., -1:] - x[..., -2:-padlen - 2:-1]
        ext = np.concatenate([head, x, tail], axis=-1)
    else:
        ext = x
    shape = (zi.shape[0],) + (1,) * (x.ndim - 1) + (2,)
    z = zi.reshape(shape)
    y, _ = sps.sosfilt(sos, ext, axis=-1, zi=z * ext[None, ..., :1])
    y = y[..., ::-1]
    y, _ = sps.sosfilt(sos, y, axis=-1, zi=z * y[None, ..., :1])
    y = y[..., ::-1]
    return y[..., padlen:padlen + n] if padlen else y


def bandpass(x: np.ndarray, fs: float, lo: float = 0.67, hi: float = 40.0, order: int = 5) -> np.ndarray:
    """Zero-phase Butterworth band-pass (second-order sections, forward-backward), float32 out.

    0.67 Hz removes baseline wander without eating the ST segment (the AHA lower limit for diagnostic ECG);
    40 Hz removes mains and muscle noise. The upper edge is clamped below Nyquist for low rates.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] < 2:
        return x.astype(np.float32)
    sos, zi = butter_bandpass(float(fs), float(lo), float(hi), int(order))
    return filtfilt_sos(sos, zi, x, 3 * (2 * len(sos) + 1)).astype(np.float32)


def repair_nans(x: np.ndarray) -> np.ndarray:
    """Replace NaN/inf by linear interpolation between the finite neighbours, per lead.

    Edges take the nearest finite value; a lead with no finite sample becomes zeros (it is then flagged flat).
    """
    x = np.array(x, dtype=np.float32, copy=True)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[None]
    bad = ~np.isfinite(x)
    if bad.any():
        t = np.arange(x.shape[-1])
        for c in np.nonzero(bad.any(axis=-1))[0]:  # loop only over the (rare) leads that need it
            ok = ~bad[c]
            x[c] = np.interp(t, t[ok], x[c, ok]) if ok.any() else 0.0
    return x[0] if squeeze else x


def flat_leads(x: np.ndarray, fs: float, min_range_mv: float = 0.02, max_flat_fraction: float = 0.5) -> np.ndarray:
    """Bool ``[C]``: leads that are flat or disconnected.

    A lead is flagged when its whole peak-to-peak range is below ``min_range_mv`` (no ECG is that small), or when
    more than ``max_flat_fraction`` of its one-second windows are constant (a lead that dropped out, or sat on a
    rail, for most of the strip).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    finite = np.where(np.isfinite(x), x, 0.0)
    flat = np.ptp(finite, axis=-1) < min_range_mv
    win = max(int(round(fs)), 1)
    nw = x.shape[-1] // win
    if nw >= 1:
        w = finite[:, : nw * win].reshape(x.shape[0], nw, win)
        const = np.ptp(w, axis=-1) < 1e-6
        flat |= const.mean(axis=-1) > max_flat_fraction
    return flat


def preprocess(x: np.ndarray, fs: float, bandpass_filter: bool = False,
               fs_out: float = TARGET_FS) -> tuple[np.ndarray, np.ndarray]:
    """NaN repair, resampling to ``fs_out`` and the optional band-pass: ``(signal [C, T'] float32, flat [C])``.

    Flat leads are judged on the repaired signal at the original rate, before filtering can smear a step.
    """
    fs = check_sampling_rate(fs)
    x = repair_nans(x)
    flat = flat_leads(x, fs)
    y = resample(x, fs, fs_out)
    if bandpass_filter:
        y = bandpass(y, fs_out)
    return y, flat
