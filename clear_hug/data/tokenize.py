"""ECG records to heartbeat tokens.

A token is one heartbeat of one lead: 96 samples at 100 Hz with the R peak at index 48. The R peaks are
detected once on all leads together, so token ``[lead, j]`` is the same cardiac cycle for every lead, which is
what the conduction attention of the model relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .leads import LEADS, NUM_LEADS, lead_index
from .preprocess import TARGET_FS, preprocess
from .rpeaks import detect_rpeaks

TOKEN_LEN = 96
R_INDEX = TOKEN_LEN // 2  # 48: samples [r-48, r+48) of the strip, R at index 48
_EPS = 1e-6
_FLAT_SPAN_MV = 1e-3


class NoBeatsError(ValueError):
    """The record has no detectable heartbeat (flat, disconnected, or too short)."""


@dataclass
class BeatTokens:
    """Heartbeat tokens of one record (or, from ``tokenize_records``, a batch with a leading record axis).

    tokens  float32 [12, beats, 96]  z-normalised beat windows, zeros where invalid
    valid   bool    [12, beats]      beat exists, the lead is present and not flat, the window not constant
    time    int64   [12, beats]      the second of the record the beat's R peak falls in (0 where invalid)
    rpeaks  int64   [n_beats]        R peaks at 100 Hz (all detected, not only the first max_beats)
    flat    bool    [12]             leads judged flat, disconnected or missing
    n_dropped                        detected beats left out by the ``max_beats`` cap (0 without a cap)

    ``beats`` is ``max_beats`` (missing beats are padding), or every detected beat when ``max_beats`` is None.
    """

    tokens: np.ndarray
    valid: np.ndarray
    time: np.ndarray
    rpeaks: np.ndarray | list[np.ndarray]
    flat: np.ndarray
    failed: list[tuple[int, str]] = field(default_factory=list)
    n_dropped: int | np.ndarray = 0


def beat_windows(rpeaks: np.ndarray, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(start, end)`` sample bounds (end exclusive) of each beat's window.

    From the midpoint of the previous RR interval to the midpoint of the next; the first and last beats use
    their one neighbouring interval on both sides. Each side is capped at 48 samples so the R peak lands at
    index 48 (a window over 96 samples is thereby re-centred as R +- 48), and the window is clipped to the strip.
    """
    r = np.asarray(rpeaks, dtype=np.int64)
    if len(r) == 0:
        return r.copy(), r.copy()
    if len(r) == 1:
        prev = nxt = np.array([2 * R_INDEX])  # no neighbour: the widest window allowed
    else:
        rr = np.diff(r)
        prev = np.concatenate([rr[:1], rr])
        nxt = np.concatenate([rr, rr[-1:]])
    left = np.minimum(prev // 2, R_INDEX)  # samples before R
    right = np.minimum((nxt + 1) // 2, TOKEN_LEN - R_INDEX)  # samples from R on (R included)
    start = np.maximum(r - left, 0)
    end = np.minimum(r + right, n_samples)
    return start, end


def _missing_mask(missing_leads: Sequence[str | int] | np.ndarray | None) -> np.ndarray:
    mask = np.zeros(NUM_LEADS, dtype=bool)
    if missing_leads is None:
        return mask
    arr = np.asarray(missing_leads)
    if arr.dtype == bool and arr.shape == (NUM_LEADS,):
        return arr.copy()
    for name in missing_leads:
        i = lead_index(name) if isinstance(name, str) else int(name)
        if i is not None:
            mask[i] = True
    return mask


def tokenize_beats(
    signal: np.ndarray,
    fs: float,
    max_beats: int | None = 15,
    rpeaks: np.ndarray | None = None,
    bandpass: bool = False,
    missing_leads: Sequence[str | int] | np.ndarray | None = None,
) -> BeatTokens:
    """Tokenise a 12-lead record ``[12, T]`` sampled at ``fs`` (see ``BeatTokens``).

    ``rpeaks``, when given, are sample indices at ``fs`` (ground truth from a generator, say) and replace the
    detector. ``missing_leads`` (names, indices or a bool mask) marks leads whose tokens are invalid; leads that
    are flat are invalid too. ``max_beats=None`` tokenises every beat of the record (Holter, long records);
    with a cap, the beats after it are counted in ``n_dropped``. Raises ``NoBeatsError`` when no beat is found.
    """
    x = np.asarray(signal)
    if x.ndim != 2 or x.shape[0] != NUM_LEADS:
        raise ValueError(f"signal must be [{NUM_LEADS}, T] in the order {LEADS}, got shape {x.shape}")
    _check_max_beats(max_beats)
    y, flat = preprocess(x, fs, bandpass_filter=bandpass)
    flat = flat | _missing_mask(missing_leads)
    n = y.shape[-1]
    if flat.all():
        raise NoBeatsError("no beats: every lead is flat or missing")
    if rpeaks is None:
        # Detect on the usable leads only, so zero rows do not dilute the pooled envelope.
        r = detect_rpeaks(y[~flat], TARGET_FS)
    else:
        r = np.round(np.asarray(rpeaks, dtype=np.float64) * TARGET_FS / float(fs)).astype(np.int64)
        r = np.unique(r[(r >= 0) & (r < n)])
    if len(r) == 0:
        raise NoBeatsError(f"no beats detected in a record of {n / TARGET_FS:.1f} s")

    start, end = beat_windows(r, n)
    cap = len(r) if max_beats is None else max_beats
    rb, sb, eb = r[:cap], start[:cap], end[:cap]
    nb = len(rb)
    if max_beats is None:
        max_beats = nb
    # Gather every window at once: sample index of token position k of beat j is r_j - 48 + k.
    idx = rb[:, None] + (np.arange(TOKEN_LEN) - R_INDEX)[None, :]  # [nb, 96]
    inside = (idx >= sb[:, None]) & (idx < eb[:, None])
    raw = y[:, np.clip(idx, 0, n - 1)]  # [12, nb, 96]
    win = raw * inside[None]
    mean = win.mean(axis=-1, keepdims=True)
    std = win.std(axis=-1, keepdims=True)
    win = np.where(std > _EPS, (win - mean) / np.maximum(std, _EPS), 0.0)

    tokens = np.zeros((NUM_LEADS, max_beats, TOKEN_LEN), dtype=np.float32)
    valid = np.zeros((NUM_LEADS, max_beats), dtype=bool)
    time = np.zeros((NUM_LEADS, max_beats), dtype=np.int64)
    # A lead can also go flat for part of a strip (a loose electrode): a window whose own samples span less than
    # a microvolt (below any ECG's quantisation step; resampling ripple on a constant is ~0.05 uV) carries no beat.
    held = np.where(inside[None], raw, np.nan)
    alive = (np.nanmax(held, axis=-1) - np.nanmin(held, axis=-1)) > _FLAT_SPAN_MV  # [12, nb]
    valid[:, :nb] = ~flat[:, None] & alive
    tokens[:, :nb] = np.where(valid[:, :nb, None], win, 0.0)
    time[:, :nb] = np.where(valid[:, :nb], (rb // TARGET_FS)[None, :], 0)
    return BeatTokens(tokens=tokens, valid=valid, time=time, rpeaks=r, flat=flat, n_dropped=len(r) - nb)


def _check_max_beats(max_beats: int | None) -> None:
    if max_beats is None:
        return
    if isinstance(max_beats, bool) or not isinstance(max_beats, (int, np.integer)):
        raise TypeError(f"max_beats must be an int or None, got {type(max_beats).__name__}")
    if max_beats < 1:
        raise ValueError(f"max_beats must be >= 1 or None, got {max_beats}")


def split_windows(bt: BeatTokens, window_s: float, stride_s: float,
                  duration_s: float) -> list[tuple[float, BeatTokens]]:
    """Cut the tokens of a whole record (``tokenize_beats(..., max_beats=None)``) into windows of ``window_s``
    seconds every ``stride_s`` seconds, for records of hours.

    A beat belongs to a window when its R peak does; its token is the one of the whole record (so beats at a
    window's edge keep their full shape). Times restart at 0 in each window. Windows with no beat are left out
    (the caller counts them); a window with fewer beats than others is simply shorter, padded when batched.
    Returns ``[(start_s, BeatTokens)]``.
    """
    for name, v in (("window_s", window_s), ("stride_s", stride_s)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
    r = np.asarray(bt.rpeaks)
    if bt.tokens.shape[1] != len(r):
        raise ValueError("split_windows needs the tokens of every beat (tokenize_beats with max_beats=None)")
    out = []
    n_windows = max(1, int(np.ceil((duration_s - window_s) / stride_s - 1e-9)) + 1)
    for w in range(n_windows):
        start = w * stride_s
        lo, hi = np.searchsorted(r, [start * TARGET_FS, (start + window_s) * TARGET_FS])
        if hi <= lo:
            continue
        valid = bt.valid[:, lo:hi]
        time = np.where(valid, ((r[lo:hi] - int(round(start * TARGET_FS))) // TARGET_FS)[None, :], 0)
        out.append((float(start), BeatTokens(tokens=bt.tokens[:, lo:hi], valid=valid, time=time,
                                             rpeaks=r[lo:hi], flat=bt.flat)))
    return out


def tokenize_records(
    records: Sequence[tuple[np.ndarray, float]],
    max_beats: int = 15,
    bandpass: bool = False,
    errors: str = "raise",
) -> BeatTokens:
    """Tokenise many ``(signal, fs)`` records into stacked arrays with a leading record axis.

    ``errors="raise"`` propagates the first ``NoBeatsError``; ``errors="skip"`` leaves that record's row all
    padding and lists ``(position, reason)`` in ``failed``. ``n_dropped`` ``[N]`` counts each record's beats
    beyond ``max_beats`` (a stacked batch needs a cap; the token cache stores records of any length).
    """
    if max_beats is None:
        raise ValueError("tokenize_records stacks records and needs an int max_beats; use the token cache "
                         "(build_cache(..., max_beats=None)) for records of any length")
    _check_max_beats(max_beats)
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    n = len(records)
    tokens = np.zeros((n, NUM_LEADS, max_beats, TOKEN_LEN), dtype=np.float32)
    valid = np.zeros((n, NUM_LEADS, max_beats), dtype=bool)
    time = np.zeros((n, NUM_LEADS, max_beats), dtype=np.int64)
    flat = np.ones((n, NUM_LEADS), dtype=bool)
    rpeaks: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    dropped = np.zeros(n, dtype=np.int64)
    for i, (sig, fs) in enumerate(records):
        try:
            bt = tokenize_beats(sig, fs, max_beats=max_beats, bandpass=bandpass)
        except NoBeatsError as exc:
            if errors == "raise":
                raise NoBeatsError(f"record {i}: {exc}") from exc
            failed.append((i, str(exc)))
            rpeaks.append(np.zeros(0, dtype=np.int64))
            continue
        tokens[i], valid[i], time[i], flat[i], dropped[i] = bt.tokens, bt.valid, bt.time, bt.flat, bt.n_dropped
        rpeaks.append(bt.rpeaks)
    return BeatTokens(tokens=tokens, valid=valid, time=time, rpeaks=rpeaks, flat=flat, failed=failed,
                      n_dropped=dropped)
