"""Tests of the synthetic 12-lead ECG generator (clear_hug.data.synthetic)."""
import numpy as np
import pytest

from clear_hug.data.synthetic import (
    CLASS_NAMES,
    RHYTHMS,
    SUBDIAGNOSTIC,
    SUPERCLASSES,
    SyntheticSet,
    generate_dataset,
    generate_record,
)

N_BIG = 2000


@pytest.fixture(scope="module")
def big():
    """2000 default records of seed 7: (signals [N,12,T], rpeaks, infos)."""
    sigs, rps, infos = [], [], []
    for i in range(N_BIG):
        s, r, info = generate_record(7, i)
        sigs.append(s)
        rps.append(r)
        infos.append(info)
    return np.stack(sigs), rps, infos


def _lab(infos, name):
    return np.array([info["labels"][name] for info in infos], dtype=bool)


# --- shapes, dtypes, interface --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,n_cls", [("all", 13), ("superdiagnostic", 5), ("subdiagnostic", 8), ("rhythm", 5)])
def test_dataset_shapes(task, n_cls):
    ds = generate_dataset(12, seed=1, task=task)
    assert isinstance(ds, SyntheticSet)
    assert ds.signals.shape == (12, 12, 1000) and ds.signals.dtype == np.float32
    assert ds.labels.shape == (12, n_cls) and ds.labels.dtype == np.float32
    assert len(ds.class_names) == n_cls and ds.fs == 100
    assert ds.splits.dtype == np.int8 and set(np.unique(ds.splits)) <= {0, 1, 2}
    assert len(ds.rpeaks) == 12 and all(r.dtype == np.int64 for r in ds.rpeaks)
    assert np.isfinite(ds.signals).all()
    assert set(np.unique(ds.labels)) <= {0.0, 1.0}


def test_other_rates_and_durations():
    s, r, _ = generate_record(0, 3, fs=500, duration_s=4.0)
    assert s.shape == (12, 2000) and r.max() < 2000 and r.min() >= 0
    s, r, _ = generate_record(0, 3, fs=250, duration_s=30.0)
    assert s.shape == (12, 7500) and len(r) >= 30 * 40 / 60 - 1


@pytest.mark.parametrize("fs,dur", [(50, 2.5), (128, 3.0), (360, 10.0)])
def test_short_strips_and_odd_rates(fs, dur):
    for i in range(40):
        s, r, info = generate_record(2, i, fs=fs, duration_s=dur)
        n = int(round(fs * dur))
        assert s.shape == (12, n) and np.isfinite(s).all()
        assert ((r >= 0) & (r < n)).all() and (np.diff(r) > 0).all()
        assert bool(info["labels"]["PVC"]) == bool((info["beat_types"] == 2).any())


def test_unknown_task():
    with pytest.raises(ValueError):
        generate_dataset(2, task="form")


def test_constants():
    assert SUPERCLASSES == ["NORM", "CD", "HYP", "MI", "STTC"]
    assert RHYTHMS == ["SR", "SBRAD", "STACH", "AFIB", "PVC"]
    assert CLASS_NAMES == SUBDIAGNOSTIC + RHYTHMS


# --- physics of the leads -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [1.0, 4.0])
def test_lead_relations_exact(noise):
    for i in range(60):
        s, _, _ = generate_record(11, i, noise=noise)
        lead_i, lead_ii = s[0], s[1]
        # bitwise: the derived leads are computed in float32 from the stored I and II
        assert np.array_equal(s[2], lead_ii - lead_i)
        assert np.array_equal(s[3], -(lead_i + lead_ii) / 2)
        assert np.array_equal(s[4], lead_i - lead_ii / 2)
        assert np.array_equal(s[5], lead_ii - lead_i / 2)
        # and to float32 precision whatever the order of operations (aVR + aVL + aVF = 0 as well)
        tol = 1e-6 * (1 + np.abs(s).max())
        assert np.abs(s[3] + s[4] + s[5]).max() < 4 * tol
        assert np.abs(1.5 * s[2] - (s[5] - s[4])).max() < 8 * tol   # aVF - aVL = 1.5 III


def test_plausible_amplitudes(big):
    sigs, _, infos = big
    norm = _lab(infos, "NORM") & _lab(infos, "SR")
    peak = np.percentile(np.abs(sigs[norm]), 99.9, axis=2)         # [n, 12] per-lead peak
    assert 0.5 < np.median(peak.max(1)) < 3.0                       # QRS of about 0.5-2 mV
    # normal V1 QRS is mostly negative (rS), aVR negative, II positive
    clean = [generate_record(7, i, noise=0.0) for i in np.flatnonzero(norm)[:80]]
    v1 = np.array([s[6].max() + s[6].min() for s, _, _ in clean])
    avr = np.array([s[3].max() + s[3].min() for s, _, _ in clean])
    ii = np.array([s[1].max() + s[1].min() for s, _, _ in clean])
    assert (v1 < 0).mean() > 0.8 and (avr < 0).mean() > 0.9 and (ii > 0).mean() > 0.9


# --- determinism --------------------------------------------------------------------------------------------------
def test_determinism():
    a = generate_record(5, 17)
    b = generate_record(5, 17)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])
    c = generate_record(6, 17)
    assert a[0].tobytes() != c[0].tobytes()
    d1 = generate_dataset(6, seed=5)
    d2 = generate_dataset(20, seed=5)
    assert d1.signals.tobytes() == d2.signals[:6].tobytes()
    assert np.array_equal(d2.signals[17], a[0]) and np.array_equal(d2.rpeaks[17], a[1])
    shard = generate_dataset(4, seed=5, start=16)                   # parallel shards concatenate exactly
    assert shard.signals.tobytes() == d2.signals[16:20].tobytes()
    assert np.array_equal(shard.splits, d2.splits[16:20]) and np.array_equal(shard.labels, d2.labels[16:20])


def test_splits(big):
    _, _, infos = big
    sp = np.array([info["split"] for info in infos])
    frac = np.bincount(sp, minlength=3) / len(sp)
    assert abs(frac[0] - 0.8) < 0.04 and abs(frac[1] - 0.1) < 0.03 and abs(frac[2] - 0.1) < 0.03
    assert np.array_equal(generate_dataset(50, seed=0).splits, generate_dataset(50, seed=9).splits)


# --- labels ---------------------------------------------------------------------------------------------------------
BOUNDS = {"NORM": (0.30, 0.45), "RBBB": (0.07, 0.20), "LBBB": (0.05, 0.16), "1AVB": (0.06, 0.18),
          "LVH": (0.08, 0.22), "IMI": (0.07, 0.20), "AMI": (0.06, 0.20), "STTC": (0.08, 0.22),
          "SR": (0.55, 0.70), "SBRAD": (0.08, 0.17), "STACH": (0.08, 0.17), "AFIB": (0.08, 0.18),
          "PVC": (0.07, 0.17), "CD": (0.2, 0.4), "HYP": (0.08, 0.22), "MI": (0.15, 0.35)}


def test_label_balance_and_consistency(big):
    _, _, infos = big
    for name, (lo, hi) in BOUNDS.items():
        assert lo <= _lab(infos, name).mean() <= hi, (name, _lab(infos, name).mean())
    primary = np.stack([_lab(infos, n) for n in ["SR", "SBRAD", "STACH", "AFIB"]], 1)
    assert (primary.sum(1) == 1).all()                               # exactly one primary rhythm
    assert not (_lab(infos, "RBBB") & _lab(infos, "LBBB")).any()
    assert not (_lab(infos, "AFIB") & (_lab(infos, "1AVB") | _lab(infos, "PVC"))).any()
    morph = np.stack([_lab(infos, n) for n in SUBDIAGNOSTIC[1:]], 1)
    assert np.array_equal(_lab(infos, "NORM"), morph.sum(1) == 0)
    assert (morph.sum(1) >= 2).mean() > 0.1                          # co-occurring labels
    for sup, subs in {"CD": ["RBBB", "LBBB", "1AVB"], "MI": ["IMI", "AMI"], "HYP": ["LVH"]}.items():
        assert np.array_equal(_lab(infos, sup), np.any([_lab(infos, s) for s in subs], 0))
    ds = generate_dataset(30, seed=7, task="superdiagnostic")
    assert np.array_equal(ds.labels[:, 1], _lab(infos[:30], "CD").astype(np.float32))


# --- R-peaks and rhythm ---------------------------------------------------------------------------------------------
def test_rpeaks_at_qrs_extrema():
    half = 4
    for i in range(150):
        s, rp, info = generate_record(3, i, noise=0.0)
        x = s[[0, 1, 6, 7, 8, 9, 10, 11]].astype(np.float64)
        x -= np.median(x, axis=1, keepdims=True)
        mag = np.linalg.norm(x, axis=0)                               # spatial magnitude of the heart vector
        for r in rp[(rp > half) & (rp < len(mag) - half - 1)]:   # beats cut by the strip edges aside
            # within +-40 ms of the ground-truth R time lies a local maximum of the heart vector's magnitude
            # that is at least 60% of the largest within +-120 ms (the R' of RBBB may be the largest)
            lo, hi = max(1, r - half), min(len(mag) - 1, r + half + 1)
            j = lo + int(np.argmax(mag[lo:hi]))
            wide = mag[max(0, r - 3 * half):r + 3 * half + 1].max()
            assert mag[j] >= mag[j - 1] and mag[j] >= mag[j + 1], (i, r, info["present"])
            assert mag[j] >= 0.6 * wide, (i, r, info["present"], info["rhythm"])


def _tiny_detector(sig, fs):
    """Energy of the band-limited derivative summed over leads, peaks at least 250 ms apart (test helper)."""
    from scipy.signal import butter, filtfilt, find_peaks
    b, a = butter(2, [3 / (fs / 2), 30 / (fs / 2)], btype="band")
    y = filtfilt(b, a, sig.astype(np.float64), axis=1)
    e = (np.diff(y, axis=1, prepend=y[:, :1]) ** 2)
    e = e / (np.median(e, axis=1, keepdims=True) + 1e-12)
    e = np.convolve(np.median(e, axis=0), np.ones(5) / 5, mode="same")
    p, _ = find_peaks(e, distance=int(0.25 * fs), height=0.25 * np.percentile(e, 99))
    return p


def test_qrs_detectable_under_default_noise(big):
    sigs, rps, infos = big
    tp = fp = fn = 0
    for s, rp in zip(sigs[:400], rps[:400]):
        det = _tiny_detector(s, 100)
        d = np.abs(det[:, None] - rp[None, :])
        hit = d.min(1) <= 15 if len(rp) else np.zeros(len(det), bool)
        tp += int(hit.sum())
        fp += int((~hit).sum())
        fn += int((d.min(0) > 15).sum()) if len(det) else len(rp)
    sens, ppv = tp / (tp + fn), tp / (tp + fp)
    assert sens > 0.97 and ppv > 0.97, (sens, ppv)


def test_rr_matches_rhythm(big):
    _, rps, infos = big
    for rp, info in zip(rps, infos):
        lab, rr = info["labels"], np.diff(rp) / 100.0
        types = info["beat_types"]
        sinus_rr = rr[(types[1:] == 0) & (types[:-1] == 0)]
        if lab["AFIB"]:
            assert rr.std() / rr.mean() > 0.05 and (types == 1).all()
            continue
        assert (types != 1).all()
        if len(sinus_rr) == 0:        # e.g. slow sinus rhythm with PVC after every sinus beat
            continue
        hr = 60.0 / np.median(sinus_rr)
        if lab["SBRAD"]:
            assert hr < 62
        elif lab["STACH"]:
            assert hr > 98
        else:
            assert 58 < hr < 102
        assert sinus_rr.std() / sinus_rr.mean() < 0.08                # sinus: only mild variability
        v = np.flatnonzero(types == 2)
        assert (len(v) > 0) == bool(lab["PVC"])
        for k in v:
            if 0 < k < len(rp) - 1 and types[k - 1] == 0 and types[k + 1] == 0:
                pre, post = rp[k] - rp[k - 1], rp[k + 1] - rp[k]
                assert pre < 0.8 * np.median(sinus_rr) * 100           # premature
                assert abs((pre + post) / 100.0 - 2 * np.median(sinus_rr)) < 0.15 * np.median(sinus_rr) + 0.03


def test_afib_has_no_p_waves_but_f_waves():
    """Averaged over beats, the P-wave window before the QRS is flat in AFIB but not in sinus rhythm; the f-waves
    make the TQ segment of an AFIB record busier than in sinus rhythm."""
    act = {"AFIB": [], "SR": []}
    for i in range(400):
        s, rp, info = generate_record(21, i, noise=0.0)
        sinus_only = info["labels"]["SR"] and not info["labels"]["PVC"]
        kind = "AFIB" if info["labels"]["AFIB"] else "SR" if sinus_only else None
        if kind is None or len(rp) < 4:
            continue
        rp = rp[(rp > 40) & (rp < 990)]
        win = np.stack([s[1, r - 30:r - 8] for r in rp]).mean(0)         # II, 300..80 ms before R
        act[kind].append(np.ptp(win))
    assert np.median(act["SR"]) > 2 * np.median(act["AFIB"])


# --- morphology physics ---------------------------------------------------------------------------------------------
def test_class_physics(big):
    _, _, infos = big
    lat = lambda key, mask: np.array([info["latent"][key] for info, m in zip(infos, mask) if m])  # noqa: E731
    norm = _lab(infos, "NORM")
    avb = _lab(infos, "1AVB")
    assert lat("pr_ms", avb).min() >= 190 and lat("pr_ms", avb).max() <= 300
    assert np.median(lat("pr_ms", avb)) > 200 > np.median(lat("pr_ms", norm)) + 30
    assert lat("pr_ms", norm).max() < 215
    for bb in ["RBBB", "LBBB"]:
        assert np.median(lat("qrs_ms", _lab(infos, bb))) > np.median(lat("qrs_ms", norm)) + 20
    assert lat("qrs_ms", _lab(infos, "LBBB")).min() >= 115
    lvh = _lab(infos, "LVH")
    assert np.median(lat("lvh_factor", lvh)) > 1.4 > np.median(lat("lvh_factor", norm))
    assert np.median(lat("q_inferior", _lab(infos, "IMI"))) > 3 * np.median(lat("q_inferior", norm))
    assert np.median(lat("q_anterior", _lab(infos, "AMI"))) > 3 * np.median(lat("q_anterior", norm))


def test_measured_morphology():
    """Measured on noise-free signals: LVH has larger QRS voltage; RBBB a terminal positive wave in V1 and wide
    QRS; IMI deeper Q / negative T in III; AMI negative T in V2-V3."""
    groups: dict[str, list] = {k: [] for k in ["NORM", "LVH", "RBBB", "LBBB", "IMI", "AMI"]}
    for i in range(500):
        s, rp, info = generate_record(31, i, noise=0.0)
        p = info["present"]
        key = "NORM" if not p else p[0] if len(p) == 1 else None
        if key not in groups or not info["labels"]["SR"] or info["labels"]["PVC"]:
            continue
        rp = rp[(rp > 30) & (rp < 960)]
        beat = np.stack([s[:, r - 30:r + 40] for r in rp]).mean(0)       # [12, 70], R at 30
        beat = beat - beat[:, :5].mean(1, keepdims=True)
        width = np.sum(np.linalg.norm(np.diff(beat[[0, 1, 6, 7, 8, 9, 10, 11]], axis=1), axis=0) > 0.08)
        groups[key].append({"volt": np.ptp(beat[6]) + np.ptp(beat[10]), "v1_term": beat[6, 33:38].max(),
                            "width": width, "t_v2": beat[7, 50:66].mean(), "t_iii": beat[2, 50:66].mean()})
    med = {k: {f: np.median([d[f] for d in v]) for f in v[0]} for k, v in groups.items()}
    assert med["LVH"]["volt"] > 1.3 * med["NORM"]["volt"]
    assert med["RBBB"]["v1_term"] > med["NORM"]["v1_term"] + 0.1
    assert med["RBBB"]["width"] > med["NORM"]["width"] and med["LBBB"]["width"] > med["NORM"]["width"] + 2
    assert med["AMI"]["t_v2"] < med["NORM"]["t_v2"] - 0.1
    assert med["IMI"]["t_iii"] < med["NORM"]["t_iii"] - 0.05


# --- difficulty -----------------------------------------------------------------------------------------------------
def test_learnable_but_not_trivial(big):
    """A linear probe (ridge regression onto the multi-hot labels, one closed-form solve) on the average beat
    (12 leads around the true R-peaks) plus RR statistics beats chance clearly, improves with more labels, and is
    not perfect."""
    from sklearn.metrics import roc_auc_score
    sigs, rps, infos = big
    X = []
    for s, rp in zip(sigs, rps):
        s = s - np.median(s, axis=1, keepdims=True)
        r_ok = rp[(rp >= 30) & (rp < s.shape[1] - 50)]
        w = np.stack([s[:, r - 30:r + 50:2] for r in r_ok]).mean(0)
        rr = np.diff(rp) / 100.0
        X.append(np.r_[w.ravel(), rr.mean(), rr.std() / rr.mean()])
    X = np.array(X)
    X = np.c_[(X - X.mean(0)) / (X.std(0) + 1e-6), np.ones(len(X))]
    names = ["NORM", "RBBB", "LBBB", "1AVB", "LVH", "IMI", "AMI", "STTC", "AFIB", "STACH"]
    Y = np.stack([_lab(infos, n) for n in names], 1).astype(np.float64)
    tr, te = np.arange(1500), np.arange(1500, N_BIG)

    def macro(idx, lam):
        a = X[idx]
        coef = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ Y[idx])
        score = X[te] @ coef
        return np.array([roc_auc_score(Y[te, c], score[:, c]) for c in range(len(names))])

    full = macro(tr, 30.0)
    small = macro(tr[:150], 30.0)
    assert full.mean() > 0.85 and full.min() > 0.7, full
    assert full.mean() < 0.985 and full.min() < 0.95, full            # borderline cases keep it imperfect
    assert full.mean() > small.mean() + 0.03, (full.mean(), small.mean())
