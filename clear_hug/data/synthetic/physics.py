"""Cardiac dipole physics: lead vectors, wave templates of one beat, and their evaluation in time.

Coordinates of the heart vector (vectorcardiogram): x points to the patient's left, y to the feet (inferior),
z to the front (anterior).  A beat is a sum of waves; wave k is a fixed direction u_k (unit 3-vector) times an
amplitude a_k times an asymmetric Gaussian time course centred c_k seconds after the beat's R time:

    d(t) = sum_k a_k u_k exp(-(t - c_k)^2 / (2 s_k(t)^2)),  s_k = left width before c_k, right width after.

A lead measures the projection of d(t) onto its lead vector.  Only the 8 independent leads (I, II, V1-V6) are
projected; III, aVR, aVL, aVF are derived from I and II afterwards so that Einthoven's and Goldberger's laws hold
exactly, noise included.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

# --- lead vectors -------------------------------------------------------------------------------------------------
# Limb leads lie in the frontal plane (Einthoven triangle: lead I at 0 degrees, lead II at +60 degrees).
_LIMB = np.array([[1.0, 0.0, 0.0], [0.5, np.sqrt(3) / 2, 0.0]])
# Precordial electrodes wrap around the chest from right-anterior (V1) to left-lateral (V6).  Directions are
# unit vectors; the gains model proximity to the heart (V2-V4 sit closest and record the largest deflections).
_PRECORDIAL_DIR = np.array([
    [-0.42, 0.05, 0.90],   # V1
    [-0.10, 0.05, 1.00],   # V2
    [0.30, 0.10, 0.90],    # V3
    [0.62, 0.15, 0.72],    # V4
    [0.86, 0.15, 0.42],    # V5
    [0.97, 0.15, 0.10],    # V6
])
_PRECORDIAL_GAIN = np.array([1.7, 2.4, 2.2, 2.0, 1.7, 1.35])
INDEPENDENT_LEADS = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]


def base_lead_matrix() -> np.ndarray:
    """[8, 3] lead vectors of I, II, V1..V6 for a textbook electrode placement."""
    pre = _PRECORDIAL_DIR / np.linalg.norm(_PRECORDIAL_DIR, axis=1, keepdims=True)
    return np.vstack([_LIMB, pre * _PRECORDIAL_GAIN[:, None]])


def perturbed_lead_matrix(rng: np.random.Generator) -> np.ndarray:
    """Electrode misplacement and skin/body gains: the chest electrodes move (a few cm shifts their view of the
    heart noticeably), limb electrodes barely matter (they are far from the heart)."""
    m = base_lead_matrix()
    m[:2] += rng.normal(0.0, 0.03, size=(2, 3)) * np.array([1.0, 1.0, 0.3])
    m[2:] += rng.normal(0.0, 0.10, size=(6, 3)) * _PRECORDIAL_GAIN[:, None]
    m[2:] *= np.exp(rng.normal(0.0, 0.08, size=(6, 1)))
    return m


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation about x (tilt), y (horizontal-plane rotation) and z (frontal-plane axis) by angles in radians."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def unit(v: npt.ArrayLike) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def frontal_dir(angle_deg: float, z: float) -> np.ndarray:
    """Unit vector at a frontal-plane angle (0 = lead I, +90 = aVF) with anterior component z (before norming)."""
    a = np.deg2rad(angle_deg)
    return unit([np.cos(a), np.sin(a), z])


# --- wave templates -----------------------------------------------------------------------------------------------
# Every template has the same wave slots so that all beats of a record form one [beats, waves] table.
WAVES = ["P1", "P2", "Q", "R", "R2", "S", "RP", "QMI", "QAMI", "ST", "T"]
W = {name: i for i, name in enumerate(WAVES)}


class Template:
    """Arrays [len(WAVES)] of centre (s, relative to R), left/right widths (s), amplitude (mV), direction [.,3]."""

    def __init__(self) -> None:
        n = len(WAVES)
        self.c = np.zeros(n)
        self.sl = np.full(n, 0.01)
        self.sr = np.full(n, 0.01)
        self.a = np.zeros(n)
        self.u = np.tile(np.array([1.0, 0.0, 0.0]), (n, 1))

    def set(self, name: str, c: float, sl: float, sr: float, a: float, u: npt.ArrayLike) -> None:
        i = W[name]
        self.c[i], self.sl[i], self.sr[i], self.a[i] = c, sl, sr, a
        self.u[i] = unit(u)


def evaluate_dipole(times_r: np.ndarray, c: np.ndarray, sl: np.ndarray, sr: np.ndarray, a: np.ndarray,
                    u: np.ndarray, fs: int, n_samples: int, t0: float,
                    window: tuple[float, float] = (-0.55, 0.85)) -> np.ndarray:
    """Sum the waves of all beats into a [3, n_samples] dipole sampled at t0 + n / fs.

    times_r: [B] R times (s).  c, sl, sr, a: [B, K] per-beat wave tables.  u: [B, K, 3] directions.
    Each beat is evaluated only on a fixed window around its R time (all waves decay to < 1e-3 inside it), then
    scatter-added; this keeps the cost proportional to the number of beats, not beats x samples.

    Sampling a narrow Gaussian directly would alias (QRS waves are ~1 sample wide at 100 Hz).  A recorder low-passes
    before sampling; convolving a Gaussian with a Gaussian anti-alias kernel is again a Gaussian with the widths
    added in quadrature and the area preserved, so we apply exactly that, analytically.
    """
    live = np.abs(a).max(0) > 1e-5          # skip wave slots no beat of this record uses (e.g. R2 outside LBBB)
    c, sl, sr, a, u = c[:, live], sl[:, live], sr[:, live], a[:, live], u[:, live]
    s_aa = 0.45 / fs
    sl_e = np.sqrt(sl ** 2 + s_aa ** 2)
    sr_e = np.sqrt(sr ** 2 + s_aa ** 2)
    a_e = a * (sl + sr) / (sl_e + sr_e)
    lo = int(np.floor(window[0] * fs))
    n_win = int(np.ceil((window[1] - window[0]) * fs)) + 1
    # Sample index (relative to t0) of each beat's window start; the window is on the global sample grid.
    start = np.floor((times_r - t0) * fs).astype(np.int64) + lo
    idx = start[:, None] + np.arange(n_win)[None, :]                      # [B, L]
    t = t0 + idx / fs                                                      # [B, L]
    x = t[:, None, :] - (times_r[:, None] + c)[:, :, None]                 # [B, K, L]
    s = np.where(x < 0, sl_e[:, :, None], sr_e[:, :, None])
    g = np.exp(-0.5 * (x / s) ** 2) * a_e[:, :, None]                      # [B, K, L]
    contrib = np.einsum("bkl,bkd->dbl", g, u)                              # [3, B, L]
    ok = (idx >= 0) & (idx < n_samples)
    flat = idx[ok]
    out = np.empty((3, n_samples))
    for d in range(3):
        out[d] = np.bincount(flat, weights=contrib[d][ok], minlength=n_samples)
    return out
