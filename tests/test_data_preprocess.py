import numpy as np
import pytest

from clear_hug.data.preprocess import bandpass, flat_leads, preprocess, repair_nans, resample, resample_ratio


@pytest.mark.parametrize("fs,ratio", [(500, (1, 5)), (360, (5, 18)), (200, (1, 2)), (1000, (1, 10)),
                                      (100, (1, 1)), (257, (100, 257)), (50, (2, 1))])
def test_resample_ratio(fs, ratio):
    assert resample_ratio(fs) == ratio


@pytest.mark.parametrize("fs", [250, 360, 500, 1000, 257])
def test_resample_keeps_a_sinusoid(fs):
    t = np.arange(int(10 * fs)) / fs
    x = np.stack([np.sin(2 * np.pi * 3.0 * t), np.cos(2 * np.pi * 7.0 * t)])
    y = resample(x, fs)
    assert y.dtype == np.float32 and y.shape == (2, 1000)
    t100 = np.arange(1000) / 100
    ref = np.stack([np.sin(2 * np.pi * 3.0 * t100), np.cos(2 * np.pi * 7.0 * t100)])
    assert np.max(np.abs(y[:, 50:-50] - ref[:, 50:-50])) < 0.02


def test_resample_removes_aliasing_components():
    fs = 500
    t = np.arange(5000) / fs
    y = resample(np.sin(2 * np.pi * 80.0 * t), fs)  # above the new Nyquist (50 Hz): must vanish, not alias
    assert np.max(np.abs(y[50:-50])) < 0.05


def test_bandpass_passes_qrs_band_and_removes_baseline():
    fs = 100
    t = np.arange(2000) / fs
    keep = np.sin(2 * np.pi * 10.0 * t)
    x = keep + 2.0 + 1.5 * np.sin(2 * np.pi * 0.1 * t) + 0.5 * np.sin(2 * np.pi * 48.0 * t)
    y = bandpass(x[None], fs)[0]
    assert y.dtype == np.float32
    assert np.max(np.abs(y[200:-200] - keep[200:-200])) < 0.1
    # zero-phase: a symmetric pulse stays centred
    pulse = np.exp(-0.5 * ((t - 10.0) / 0.03) ** 2)
    assert abs(int(np.argmax(bandpass(pulse, fs))) - 1000) <= 1


def test_repair_nans():
    x = np.tile(np.arange(10, dtype=np.float32), (3, 1))
    x[0, 3:6] = np.nan
    x[1, :2] = np.nan
    x[1, -1] = np.inf
    x[2] = np.nan
    y = repair_nans(x)
    np.testing.assert_allclose(y[0], np.arange(10))
    np.testing.assert_allclose(y[1], [2, 2, 2, 3, 4, 5, 6, 7, 8, 8])
    assert np.all(y[2] == 0) and np.isnan(x[2]).all()  # input untouched
    assert repair_nans(np.array([1.0, np.nan, 3.0])).tolist() == [1.0, 2.0, 3.0]


def test_flat_and_disconnected_leads():
    rng = np.random.default_rng(0)
    fs = 500
    x = rng.standard_normal((4, 5000)).astype(np.float32) * 0.3
    x[1] = 0.0  # missing / flat
    x[2] = 0.001 * rng.standard_normal(5000)  # tiny noise, no ECG
    x[3, 1500:] = 0.7  # disconnected after 3 s: stuck at a constant for 70% of the strip
    assert flat_leads(x, fs).tolist() == [False, True, True, True]
    y, flat = preprocess(x, fs, bandpass_filter=True)
    assert y.shape == (4, 1000) and flat.tolist() == [False, True, True, True]


@pytest.mark.parametrize("shape", [(7,), (3, 400), (2, 3, 50)])
def test_cached_filtfilt_matches_scipy(shape):
    from scipy import signal as sps

    from clear_hug.data.preprocess import butter_bandpass, filtfilt_sos

    x = np.random.default_rng(1).standard_normal(shape).cumsum(-1)
    sos, zi = butter_bandpass(100.0, 0.67, 40.0, 5)
    pad = min(shape[-1] - 1, 33)
    ref = sps.sosfiltfilt(sos, x, axis=-1, padlen=pad)
    np.testing.assert_allclose(filtfilt_sos(sos, zi, x, pad), ref, rtol=1e-9, atol=1e-9)
    assert butter_bandpass(100.0, 0.67, 40.0, 5)[0] is sos  # designed once per rate


@pytest.mark.parametrize("fs", [0.001, 10.0, 1e12, float("nan"), float("inf")])
def test_implausible_sampling_rates_are_refused_before_allocating(fs):
    x = np.zeros((12, 10), np.float32)  # at 0.001 Hz these 10 samples would become a million at 100 Hz
    with pytest.raises(ValueError, match="outside the plausible range of an ECG"):
        resample(x, fs)
    with pytest.raises(ValueError, match="outside the plausible range of an ECG"):
        preprocess(x, fs)
    with pytest.raises(TypeError, match="fs must be a number"):
        preprocess(x, "500")
