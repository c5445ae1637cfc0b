"""Labels from WFDB annotation files (``.atr``): per-beat symbols and rhythm episodes, and per-beat labels.

A WFDB annotation file marks each reference beat with a symbol (``N`` normal, ``V`` ventricular ectopic, ``A``
atrial premature...) and each change of rhythm with a ``+`` annotation whose aux note names the rhythm that
starts there (``(AFIB``, ``(N``, ``(AFL``...). A rhythm holds until the next change or the end of the record.

Labels go to the beats the tokenizer detected (not to the reference beats): a beat's rhythm is the episode its
R peak falls in, its symbol that of the nearest reference beat within a tolerance. A record without any rhythm
annotation has no episodes, so its beats carry no rhythm label; this is how the CPSC 2021 data marks records
without AF.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .rpeaks import BEAT_SYMBOLS

RHYTHM_CHANGE = "+"


@dataclass(frozen=True)
class Episode:
    """A rhythm episode ``[start_s, end_s)`` of a record, in seconds from its first sample."""

    start_s: float
    end_s: float
    rhythm: str


@dataclass
class Annotations:
    fs: float
    duration_s: float
    beat_times_s: np.ndarray  # float64 [n] reference beats (R peaks), seconds
    beat_symbols: np.ndarray  # str [n]
    episodes: list[Episode]


def _clean_aux(note: str | None) -> str:
    # WFDB pads aux strings with NUL bytes (MIT-BIH writes "(N\x00"); wfdb-python reads absent notes as "None".
    text = "" if note is None else str(note).replace("\x00", "").strip()
    return "" if text == "None" else text


def rhythm_episodes(times_s: Sequence[float], symbols: Sequence[str], aux_notes: Sequence[str | None],
                    duration_s: float) -> list[Episode]:
    """Episodes from annotations in time order: each ``+`` with a ``(NAME`` aux note starts rhythm ``NAME``,
    which lasts until the next such change or ``duration_s``."""
    changes: list[tuple[float, str]] = []
    for t, sym, note in zip(times_s, symbols, aux_notes):
        text = _clean_aux(note)
        if sym == RHYTHM_CHANGE and text.startswith("("):
            changes.append((float(t), text[1:]))
    episodes = []
    for k, (t, name) in enumerate(changes):
        end = changes[k + 1][0] if k + 1 < len(changes) else float(duration_s)
        if end > t:
            episodes.append(Episode(t, end, name))
    return episodes


def read_annotations(record: str | os.PathLike, extension: str = "atr") -> Annotations:
    """Read ``record.<extension>`` with its header (for the sampling rate and duration)."""
    import wfdb

    from .readers import RecordReadError, _record_base

    base = _record_base(record)
    try:
        header = wfdb.rdheader(base)
        ann = wfdb.rdann(base, extension)
    except Exception as exc:  # wfdb raises many types for missing or damaged files
        raise RecordReadError(f"{base}: cannot read annotations .{extension} ({type(exc).__name__}: {exc})") from exc
    fs = float(header.fs or 0)
    if fs <= 0 or not header.sig_len:
        raise RecordReadError(f"{base}: header gives no sampling rate or length (fs={header.fs}, "
                              f"sig_len={header.sig_len})")
    if ann.fs and float(ann.fs) != fs:
        raise RecordReadError(f"{base}: annotations at {ann.fs} Hz but the record at {fs} Hz")
    times = np.asarray(ann.sample, dtype=np.float64) / fs
    symbols = np.asarray(ann.symbol, dtype=str)
    aux = list(ann.aux_note) if ann.aux_note is not None else [""] * len(symbols)
    duration = header.sig_len / fs
    is_beat = np.isin(symbols, list(BEAT_SYMBOLS))
    return Annotations(fs=fs, duration_s=duration, beat_times_s=times[is_beat], beat_symbols=symbols[is_beat],
                       episodes=rhythm_episodes(times, symbols, aux, duration))


def episode_labels(times_s: np.ndarray, episodes: Sequence[Episode], class_names: Sequence[str]) -> np.ndarray:
    """Multi-hot ``[n, K]`` uint8: beat ``i`` carries class ``k`` when its time falls in an episode named
    ``class_names[k]``. Episodes of other names (and beats in no episode) leave the row zero."""
    t = np.asarray(times_s, dtype=np.float64)
    out = np.zeros((len(t), len(class_names)), dtype=np.uint8)
    column = {name: k for k, name in enumerate(class_names)}
    for ep in episodes:
        k = column.get(ep.rhythm)
        if k is not None:
            out[(t >= ep.start_s) & (t < ep.end_s), k] = 1
    return out


def match_symbols(times_s: np.ndarray, ann: Annotations, tolerance_s: float = 0.15) -> np.ndarray:
    """The symbol of the reference beat nearest to each detected beat, ``""`` where none is within
    ``tolerance_s`` (150 ms, the usual detector-matching window)."""
    t = np.asarray(times_s, dtype=np.float64)
    ref = ann.beat_times_s
    out = np.full(len(t), "", dtype=object)
    if len(ref) == 0 or len(t) == 0:
        return out.astype(str)
    j = np.clip(np.searchsorted(ref, t), 1, len(ref) - 1) if len(ref) > 1 else np.zeros(len(t), np.int64)
    if len(ref) > 1:
        j = np.where(np.abs(ref[j - 1] - t) <= np.abs(ref[j] - t), j - 1, j)
    near = np.abs(ref[j] - t) <= tolerance_s
    out[near] = ann.beat_symbols[j[near]]
    return out.astype(str)
