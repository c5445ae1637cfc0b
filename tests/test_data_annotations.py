"""Labels from WFDB annotations, checked against wfdb.rdann on the real records; every beat of MIT-BIH 100."""

from __future__ import annotations

import numpy as np
import wfdb
from _ecgdata import need_ecg

from clear_hug.data.annotations import (
    BEAT_SYMBOLS,
    Episode,
    episode_labels,
    match_symbols,
    read_annotations,
    rhythm_episodes,
)
from clear_hug.data.readers import read_record
from clear_hug.data.tokenize import TARGET_FS, tokenize_beats


def test_rhythm_episodes_from_change_annotations():
    # NUL-padded notes (as MIT-BIH writes them) and "None" notes on beats (as wfdb-python reads them).
    eps = rhythm_episodes([0.0, 1.0, 4.0, 5.0, 9.0], ["+", "N", "+", "N", "+"],
                          ["(N\x00", "None", "(AFIB", "", "(N"], duration_s=12.0)
    assert eps == [Episode(0.0, 4.0, "N"), Episode(4.0, 9.0, "AFIB"), Episode(9.0, 12.0, "N")]
    lab = episode_labels(np.array([0.5, 4.0, 8.99, 9.0, 11.9]), eps, ["AFIB", "N"])
    assert lab.tolist() == [[0, 1], [1, 0], [1, 0], [0, 1], [0, 1]]
    assert rhythm_episodes([1.0], ["N"], [""], 5.0) == []  # no rhythm annotation: no episode


def _expected_rhythm(ann, fs):
    """Independently of the module: the rhythm of each reference beat is the aux note of the last rhythm change
    at or before it (None before the first)."""
    current, out = None, []
    for sym, note in zip(ann.symbol, ann.aux_note):
        note = (note or "").replace("\x00", "").strip()
        if sym == "+" and note.startswith("("):
            current = note[1:]
        if sym in BEAT_SYMBOLS:
            out.append(current)
    return out


def test_cpsc2021_episode_labels_match_rdann():
    folder = need_ecg("cpsc2021")
    records = sorted(p.with_suffix("") for p in folder.glob("*.atr"))
    assert len(records) == 18
    n_af = 0
    for rec in records:
        ann = wfdb.rdann(str(rec), "atr")
        got = read_annotations(rec)
        assert got.fs == ann.fs == 200
        want = _expected_rhythm(ann, ann.fs)
        assert len(got.beat_times_s) == len(want)
        lab = episode_labels(got.beat_times_s, got.episodes, ["AFIB", "N"])
        assert lab[:, 0].tolist() == [int(r == "AFIB") for r in want], rec.name
        assert lab[:, 1].tolist() == [int(r == "N") for r in want], rec.name
        n_af += int(lab[:, 0].sum())
    assert n_af > 1000  # the folder's paroxysmal and persistent AF records
    persistent = read_annotations(folder / "data_84_1")
    # Persistent AF: one episode from the first sample to the last (where a "(N" closes it).
    first = persistent.episodes[0]
    assert first.rhythm == "AFIB" and first.start_s == 0 and first.end_s > persistent.duration_s - 0.01


def test_mitdb_100_every_beat_tokenised_and_labelled():
    """All 2273 reference beats of the 30-minute record are tokenised (no cap, nothing dropped) and the detected
    beats get the reference symbols: its 33 atrial premature beats and its one ventricular ectopic beat."""
    base = need_ecg("mitdb") / "100"
    signal, fs, meta = read_record(base)
    bt = tokenize_beats(signal, fs, max_beats=None, missing_leads=meta["missing_leads"])
    ann = read_annotations(base)
    assert len(ann.beat_times_s) == 2273
    assert bt.n_dropped == 0 and bt.tokens.shape == (12, len(bt.rpeaks), 96)
    assert abs(len(bt.rpeaks) - 2273) <= 5
    present = [1, 10]  # MLII -> II, V5
    assert bt.valid[present].mean() > 0.99 and not bt.valid[[i for i in range(12) if i not in present]].any()
    assert bt.time.max() == int(bt.rpeaks.max() // TARGET_FS) > 1790  # seconds from the record's start
    symbols = match_symbols(bt.rpeaks / TARGET_FS, ann)
    assert (symbols != "").mean() > 0.995
    assert abs(int((symbols == "A").sum()) - 33) <= 1 and int((symbols == "V").sum()) == 1
    assert [e.rhythm for e in ann.episodes] == ["N"]
    # With a cap, the beats left out are counted, never silently lost.
    capped = tokenize_beats(signal, fs, max_beats=15, missing_leads=meta["missing_leads"])
    assert capped.n_dropped == len(bt.rpeaks) - 15
