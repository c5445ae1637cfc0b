import glob

import numpy as np
import pytest
from _ecgdata import need_ecg, toy_ecg
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_hug.data.readers import read_record
from clear_hug.data.rpeaks import BEAT_SYMBOLS, match_beats
from clear_hug.data.tokenize import R_INDEX, TOKEN_LEN, NoBeatsError, beat_windows, tokenize_beats, tokenize_records


def test_beat_windows_follow_rr_midpoints():
    r = np.array([30, 110, 150, 300, 380])
    start, end = beat_windows(r, 400)
    # beat 0: uses its next interval (80) on both sides -> 40 before, 40 from R on
    # beat 1: prev 80 -> 40 before; next 40 -> 20 from R on
    # beat 2: prev 40 -> 20; next 150 -> capped at 48 (window > 96 is re-centred to R +- 48)
    # beat 3: prev 150 -> 48 (cap); next 80 -> 40
    # beat 4: prev 80 -> 40 before; next uses prev (80) -> 40, clipped to the strip end (400)
    assert start.tolist() == [0, 70, 130, 252, 340]
    assert end.tolist() == [70, 130, 198, 340, 400]
    s1, e1 = beat_windows(np.array([200]), 1000)
    assert (s1[0], e1[0]) == (200 - R_INDEX, 200 + TOKEN_LEN - R_INDEX)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=60, unique=True), st.integers(1, 400))
def test_beat_window_invariants(peaks, extra):
    r = np.sort(np.array(peaks))
    n = int(r[-1]) + extra
    start, end = beat_windows(r, n)
    assert np.all(start <= r) and np.all(r < end)  # the R peak is inside its window
    assert np.all(r - start <= R_INDEX) and np.all(end - r <= TOKEN_LEN - R_INDEX)  # fits the token, R at 48
    assert np.all(start >= 0) and np.all(end <= n)
    assert np.all(end[:-1] <= start[1:])  # windows of neighbouring beats never overlap (midpoint split)


def test_tokens_with_given_rpeaks_exact_windows():
    fs = 100
    x, r = toy_ecg(fs, [0.8, 0.7, 1.2, 0.9, 0.6], n_leads=12, seed=1)
    bt = tokenize_beats(x, fs, max_beats=10, rpeaks=r)
    assert bt.tokens.shape == (12, 10, 96) and bt.tokens.dtype == np.float32
    assert bt.valid.dtype == bool and bt.time.dtype == np.int64
    nb = len(r)
    assert bt.valid[:, :nb].all() and not bt.valid[:, nb:].any()
    assert np.all(bt.tokens[:, nb:] == 0)
    start, end = beat_windows(r, x.shape[1])
    for j in range(nb):
        raw = np.zeros(96)
        raw[R_INDEX - (r[j] - start[j]): R_INDEX + (end[j] - r[j])] = x[4, start[j]:end[j]]
        z = (raw - raw.mean()) / raw.std()
        np.testing.assert_allclose(bt.tokens[4, j], z, atol=1e-4)
    # R of the strongest lead sits at index 48
    assert np.all(np.argmax(bt.tokens[0, :nb], axis=1) == R_INDEX)
    np.testing.assert_allclose(bt.tokens[:, :nb].mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(bt.tokens[:, :nb].std(-1), 1, atol=1e-4)
    assert bt.time[0, :nb].tolist() == (r // 100).tolist()


def test_detected_beats_at_other_rate_and_max_beats():
    fs = 500
    rr = [0.6] * 30  # 31 beats in ~19 s
    x, r = toy_ecg(fs, rr, n_leads=12, seed=2)
    bt = tokenize_beats(x, fs, max_beats=15)
    r100 = np.round(r * 100 / fs).astype(int)
    assert match_beats(r100, bt.rpeaks, 2)[1:] == (0, 0)
    assert len(bt.rpeaks) == 31 and bt.valid.sum() == 12 * 15  # long record: capped at max_beats
    assert np.all(np.abs(np.argmax(bt.tokens[0], axis=1) - R_INDEX) <= 1)
    assert bt.time[0].tolist() == (bt.rpeaks[:15] // 100).tolist()


def test_missing_and_flat_leads_are_invalid():
    x, r = toy_ecg(250, [0.8] * 10, n_leads=12)
    x[2] = 0.0
    bt = tokenize_beats(x, 250, missing_leads=["aVL"])
    assert bt.flat.tolist() == [i in (2, 4) for i in range(12)]
    assert not bt.valid[2].any() and not bt.valid[4].any() and np.all(bt.tokens[[2, 4]] == 0)
    assert bt.valid[0].sum() == 11 and np.all(bt.valid.sum(1)[[0, 1, 3, 5, 6, 11]] == 11)


def test_lead_flat_for_part_of_the_strip_gives_invalid_tokens_there():
    x, r = toy_ecg(250, [0.8] * 10, n_leads=12)
    half = x.shape[1] // 2
    x[7, half:] = 0.3  # V2's electrode comes loose halfway: a constant level, not a flat lead
    bt = tokenize_beats(x, 250)
    assert not bt.flat[7]
    late = bt.rpeaks * 250 // 100 > half + 60  # beats whose whole window lies in the constant part
    early = bt.rpeaks * 250 // 100 < half - 60
    n = min(len(bt.rpeaks), bt.valid.shape[1])
    assert late[:n].any() and early[:n].any()
    assert not bt.valid[7, :n][late[:n]].any() and bt.valid[7, :n][early[:n]].all()
    assert np.all(bt.tokens[7, :n][late[:n]] == 0)
    assert bt.valid[6, :n].all()


def test_no_beats_raises():
    with pytest.raises(NoBeatsError):
        tokenize_beats(np.zeros((12, 1000), np.float32), 100)
    x = np.full((12, 5000), np.nan, np.float32)
    with pytest.raises(NoBeatsError):
        tokenize_beats(x, 500)
    assert issubclass(NoBeatsError, ValueError)
    with pytest.raises(ValueError):
        tokenize_beats(np.zeros((8, 1000)), 100)


def test_bandpass_option_changes_tokens_but_not_beats():
    x, r = toy_ecg(100, [0.9] * 10, n_leads=12, seed=5)
    a = tokenize_beats(x, 100)
    b = tokenize_beats(x, 100, bandpass=True)
    assert np.array_equal(a.rpeaks, b.rpeaks)
    assert not np.allclose(a.tokens, b.tokens)


def test_batched_form():
    recs = [toy_ecg(fs, [0.8] * 12, seed=i)[:1] + (fs,) for i, fs in enumerate((100, 360, 500))]
    recs.insert(1, (np.zeros((12, 1000), np.float32), 100))
    with pytest.raises(NoBeatsError, match="record 1"):
        tokenize_records(recs)
    bt = tokenize_records(recs, max_beats=15, errors="skip")
    assert bt.tokens.shape == (4, 12, 15, 96) and bt.valid.shape == (4, 12, 15)
    assert [i for i, _ in bt.failed] == [1] and not bt.valid[1].any()
    one = tokenize_beats(*recs[2])
    np.testing.assert_array_equal(bt.tokens[2], one.tokens)
    np.testing.assert_array_equal(bt.time[2], one.time)


def test_every_cinc2021_record_tokenised():
    d = need_ecg("cinc2021")
    for hea in sorted(glob.glob(str(d / "*.hea"))):
        sig, fs, meta = read_record(hea)
        bt = tokenize_beats(sig, fs, max_beats=40)
        nb = len(bt.rpeaks)
        assert bt.tokens.shape == (12, 40, 96)
        assert bt.valid.sum(1).tolist() == [nb] * 12  # all 12 leads present: the same beats in every lead
        assert 5 <= nb <= 25, (hea, nb)
        dx = set(meta["dx"])
        if 426177001 in dx:  # sinus bradycardia: < 60 bpm
            assert nb <= 11, (hea, nb)
        if 427084000 in dx:  # sinus tachycardia: > 100 bpm
            assert nb >= 16, (hea, nb)
        if 426783006 in dx and not dx & {427084000, 426177001}:  # sinus rhythm 60-100 bpm
            assert 8 <= nb <= 18, (hea, nb)  # PTB-XL labels SR down to ~50 bpm
        # R at 48: the QRS (steepest part of the beat, summed over leads) is centred in each token
        slope = (np.diff(bt.tokens[:, :nb], axis=-1) ** 2).sum(0)
        assert np.all(np.abs(np.argmax(slope, axis=1) - R_INDEX) <= 8), hea
        assert np.all(np.diff(bt.time[0, :nb]) >= 0) and bt.time[0, :nb].max() <= 9


def test_cpsc2021_holter_excerpts_as_long_records():
    wfdb = pytest.importorskip("wfdb")
    d = need_ecg("cpsc2021")
    for hea in sorted(glob.glob(str(d / "*.hea")))[::3]:
        sig, fs, meta = read_record(hea)
        assert meta["missing_leads"] == ["III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
        bt = tokenize_beats(sig, fs, max_beats=600, missing_leads=meta["missing_leads"])
        ann = wfdb.rdann(hea[:-4], "atr")
        ref = np.array([s for s, y in zip(ann.sample, ann.symbol) if y in BEAT_SYMBOLS]) * 100 // int(fs)
        tp, fn, fp = match_beats(ref, bt.rpeaks, 15)
        assert tp >= 0.97 * len(ref), (hea, tp, fn, fp)
        nb = min(len(bt.rpeaks), 600)
        assert bt.valid[:2].sum(1).tolist() == [nb, nb] and not bt.valid[2:].any()
        assert bt.time[0, nb - 1] == bt.rpeaks[nb - 1] // 100
        assert bt.time[0, nb - 1] >= (sig.shape[1] / fs) - 3 or nb == 600  # beats run to the end
