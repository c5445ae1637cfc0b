"""Beat morphology: from a record's clinical state and a random patient to the wave templates of its beats.

Each abnormality acts on the physics, not on the drawing of a lead:
  RBBB  the right ventricle is activated late from the left: a terminal wave pointing right and anterior
        (rSR' in V1, broad S in I and V6) that widens the QRS; secondary T opposite to it.
  LBBB  the septum is activated right-to-left (no septal q) and the left ventricle slowly: a broad, notched
        leftward-posterior QRS (QS in V1, notched R in V6) with discordant ST-T.
  1AVB  PR interval past 200 ms.
  LVH   larger, more leftward-posterior QRS forces; at higher severity a "strain" ST-T opposite to the QRS.
  IMI   the dead inferior wall removes early inferior forces: an early vector pointing superior (Q in II, III,
        aVF) and T turned superior (inverted T in II, III, aVF).
  AMI   the same for the anterior wall: an early posterior vector (QS in V1-V3, lost septal r), poor R
        progression and T turned posterior (inverted T in V1-V4), sometimes with acute ST elevation.
  STTC  ST depression along a vector pointing away from the lateral/inferior leads and/or a flattened or
        inverted T.
Present classes scale with their severity s in [0, 1]; absent classes use their subclinical tendency in [0, 1),
which moves the same parameter towards the border from the normal side.
"""
from __future__ import annotations

import numpy as np

from .physics import WAVES, Template, W, frontal_dir, rotation, unit


def build_templates(rng: np.random.Generator, state: dict) -> tuple[Template, Template, dict]:
    """Return the conducted-beat template, the ectopic (PVC) template and the latent parameters."""
    sev, sub, present = state["severity"], state["subclinical"], set(state["present"])
    gain = float(np.exp(rng.normal(0.0, 0.18)))            # body habitus / chest size
    rot = rotation(np.deg2rad(rng.normal(0, 8)), np.deg2rad(rng.normal(0, 14)), np.deg2rad(rng.normal(0, 20)))

    # --- intervals (seconds) ---
    qrs_base = rng.uniform(0.080, 0.100) + 0.008 * sub.get("RBBB", 0.0)
    if "1AVB" in present:
        pr = 0.194 + 0.106 * sev["1AVB"] ** 1.3
    else:   # overlaps the 1AVB range a little: readers disagree at the border, and so do the labels
        pr = 0.115 + 0.095 * rng.random() ** 0.7 * (0.75 + 0.25 * sub["1AVB"])
    qtc = rng.uniform(0.38, 0.44)
    p_dur = rng.uniform(0.08, 0.11)

    # --- main vectors before pathology (patient frame, rotated at the end) ---
    r_axis = float(np.clip(rng.normal(48, 16), -15, 95))
    r_vec = rng.uniform(0.9, 1.5) * frontal_dir(r_axis, rng.uniform(-0.8, -0.3))
    t_vec = rng.uniform(0.25, 0.42) * frontal_dir(r_axis + rng.normal(0, 12), rng.uniform(0.15, 0.5))
    q_amp = rng.uniform(0.08, 0.22)                        # septal depolarisation
    s_amp = rng.uniform(0.3, 0.65)
    st_vec = rng.normal(0.0, 0.012, size=3)
    t_scale = rng.uniform(0.75, 1.3) - 0.25 * sub.get("STTC", 0.0)

    # LVH: amplitude factor continuous across the border (normal up to ~1.35, LVH from 1.3).
    if "LVH" in present:
        s_l = sev["LVH"]
        lvh = 1.3 + 0.6 * s_l
        r_vec = lvh * unit(r_vec + np.array([0.15 * s_l, -0.1 * s_l, -0.25 * s_l])) * np.linalg.norm(r_vec)
        s_amp *= 1.0 + 0.8 * s_l
        qrs_base += 0.012 * s_l
        strain = float(np.clip((s_l - 0.3) / 0.7, 0.0, 1.0))
        t_vec = (1 - strain) * t_vec - strain * 0.35 * unit(r_vec)
        st_vec = st_vec - 0.12 * strain * unit(r_vec)
    else:
        lvh = rng.uniform(0.78, 1.2) + 0.15 * sub["LVH"]
        r_vec = lvh * r_vec

    qrs = qrs_base
    rp_amp, rp_c, rp_s = 0.25 * sub.get("RBBB", 0.0), 0.45 * qrs_base + 0.01 * sub.get("RBBB", 0.0), 0.012
    if "RBBB" in present:
        s_r = sev["RBBB"]
        extra = 0.014 + 0.05 * s_r
        rp_amp = 0.2 + 0.55 * s_r
        rp_s = 0.013 + 0.22 * extra
        rp_c = 0.42 * qrs_base + 0.55 * extra
        qrs = qrs_base + extra
        t_vec = t_vec - 0.2 * (0.5 + s_r) * np.array([-0.6, 0.1, 0.8])   # secondary T, away from R'
    lbbb = "LBBB" in present
    if lbbb:
        s_b = sev["LBBB"]
        qrs = 0.118 + 0.05 * s_b
        q_amp = 0.0
        r_vec = np.linalg.norm(r_vec) * 0.85 * unit([0.8, 0.15 + 0.2 * rng.standard_normal(), -0.65])
        s_amp *= 0.3
        t_vec = (0.25 + 0.3 * s_b) * unit(-unit(r_vec) + np.array([0.0, 0.3, 0.3]))
        st_vec = st_vec + (0.06 + 0.1 * s_b) * unit(t_vec)

    qmi = 0.15 * sub["IMI"] if "IMI" not in present else 0.08 + 0.6 * sev["IMI"]
    if "IMI" in present:
        s_i = sev["IMI"]
        r_vec = np.linalg.norm(r_vec) * unit(r_vec - np.array([0.0, 0.35 * s_i, 0.0]))
        t_vec = t_vec - np.array([0.0, (0.25 + 1.0 * s_i) * np.linalg.norm(t_vec), 0.0])
    else:
        t_vec = t_vec - np.array([0.0, 0.25 * sub["IMI"] * np.linalg.norm(t_vec), 0.0])
    qami = 0.12 * sub["AMI"] if "AMI" not in present else 0.12 + 0.7 * sev["AMI"]
    if "AMI" in present:
        s_a = sev["AMI"]
        q_amp *= max(0.0, 0.5 - s_a)
        r_vec = np.linalg.norm(r_vec) * unit(r_vec - np.array([0.0, 0.0, 0.25 * s_a]))
        t_vec = t_vec - np.array([0.0, 0.0, (0.35 + 1.0 * s_a) * np.linalg.norm(t_vec)])
        if rng.random() < 0.35:                            # acute: ST elevation facing the anterior leads
            st_vec = st_vec + (0.08 + 0.2 * s_a) * unit([0.1, -0.1, 1.0])
    else:
        t_vec = t_vec - np.array([0.0, 0.0, 0.3 * sub["AMI"] * np.linalg.norm(t_vec)])
    if "STTC" in present:
        s_t = sev["STTC"]
        mode = rng.random()
        if mode < 0.65:
            st_vec = st_vec + (0.05 + 0.15 * s_t) * unit([-0.55, -0.6, 0.3])
        if mode > 0.35:
            t_scale = 1.0 - (0.45 + 1.0 * s_t)
    t_vec = t_vec * t_scale

    # --- assemble the conducted-beat template (times relative to the R time) ---
    tpl = Template()
    p_amp = rng.uniform(0.08, 0.2) * (0.0 if state["rhythm"] == "AFIB" else 1.0)
    p1c = -(0.45 * qrs + pr) + 0.45 * p_dur
    tpl.set("P1", p1c, p_dur / 5.5, p_dur / 5.5, p_amp, [0.45, 0.8, 0.35])
    tpl.set("P2", p1c + 0.25 * p_dur, p_dur / 6, p_dur / 6, 0.5 * p_amp, [0.7, 0.3, -0.65])
    tpl.set("Q", -0.30 * qrs_base, 0.07 * qrs_base, 0.07 * qrs_base, q_amp, [-0.6, 0.25, 0.75])
    if lbbb:
        r_n = np.linalg.norm(r_vec)
        tpl.set("R", -0.16 * qrs, 0.13 * qrs, 0.13 * qrs, r_n, r_vec)
        tpl.set("R2", 0.16 * qrs, 0.13 * qrs, 0.13 * qrs, r_n * rng.uniform(0.8, 1.05),
                unit(r_vec) + np.array([0.05, 0.15, 0.1]))
    else:
        tpl.set("R", 0.0, 0.11 * qrs_base, 0.10 * qrs_base, np.linalg.norm(r_vec), r_vec)
    tpl.set("S", 0.27 * qrs, 0.08 * qrs_base, 0.08 * qrs_base, s_amp, [-0.25, -0.4, -0.9])
    tpl.set("RP", rp_c, rp_s, rp_s, rp_amp, [-0.6, 0.1, 0.8])
    tpl.set("QMI", -0.25 * qrs_base, 0.1 * qrs_base + 0.006, 0.1 * qrs_base + 0.006, qmi, [0.15, -1.0, -0.1])
    tpl.set("QAMI", -0.22 * qrs_base, 0.1 * qrs_base + 0.006, 0.1 * qrs_base + 0.006, qami, [0.1, 0.0, -1.0])
    tpl.set("ST", 0.5 * qrs + 0.08, 0.05, 0.06, np.linalg.norm(st_vec), st_vec + 1e-12)
    tpl.set("T", 0.0, 0.07, 0.045, np.linalg.norm(t_vec), t_vec + 1e-12)  # centre set per beat from its RR
    tpl.a *= gain
    tpl.u = tpl.u @ rot.T

    # --- ectopic ventricular beat: wide, large, bizarre axis, discordant T, no P ---
    pvc = Template()
    qv = rng.uniform(0.13, 0.18)
    if rng.random() < 0.5:   # right-ventricular focus: LBBB-like
        uv = unit([0.7, rng.uniform(-0.8, 0.9), -0.45])
    else:                    # left-ventricular focus: RBBB-like
        uv = unit([-0.6, rng.uniform(-0.8, 0.9), 0.55])
    # Two overlapping activation fronts make the complex wide yet steep-sided (a single broad Gaussian would be
    # a smooth hump with little slope, unlike real ectopic beats).
    av = rng.uniform(1.4, 2.2)
    pvc.set("R", -0.17 * qv, 0.11 * qv, 0.12 * qv, av, uv)
    pvc.set("R2", 0.17 * qv, 0.12 * qv, 0.11 * qv, 0.75 * av, uv + rng.normal(0, 0.35, 3))
    pvc.set("T", 0.30 + 0.3 * qv, 0.08, 0.06, rng.uniform(0.35, 0.6), -uv + rng.normal(0, 0.2, 3))
    pvc.a *= gain
    pvc.u = pvc.u @ rot.T

    latent = {"pr_ms": 1000 * pr, "qrs_ms": 1000 * qrs, "qtc_ms": 1000 * qtc, "lvh_factor": float(lvh),
              "gain": gain, "r_axis_deg": r_axis, "rp_amp": float(rp_amp), "q_inferior": float(qmi),
              "q_anterior": float(qami), "t_amp": float(np.linalg.norm(t_vec)), "pvc_qrs_ms": 1000 * qv,
              "st_amp": float(np.linalg.norm(st_vec))}
    return tpl, pvc, latent


def beat_tables(tpl: Template, pvc: Template, beat_types: np.ndarray, rr_prev: np.ndarray, qtc: float,
                qrs: float, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-beat wave tables [B, K] (+ directions [B, K, 3]) from the two templates, with the T wave placed by the
    preceding RR interval (QT = QTc * sqrt(RR), Bazett) and a small beat-to-beat amplitude jitter."""
    is_v = beat_types == 2

    def pick(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.where(is_v[:, None], y[None, :], x[None, :])

    c, sl, sr, a = pick(tpl.c, pvc.c), pick(tpl.sl, pvc.sl), pick(tpl.sr, pvc.sr), pick(tpl.a, pvc.a)
    u = np.where(is_v[:, None, None], pvc.u[None], tpl.u[None])
    k = np.sqrt(np.clip(rr_prev, 0.3, 2.0))
    t_peak = -0.45 * qrs + qtc * k - 2.2 * 0.045 * k
    t_peak = np.maximum(t_peak, 0.5 * qrs + 0.12)
    it = W["T"]
    c[:, it] = np.where(is_v, c[:, it], t_peak)
    sl[:, it] = np.where(is_v, sl[:, it], 0.07 * k)
    sr[:, it] = np.where(is_v, sr[:, it], 0.045 * k)
    a = a * (1.0 + rng.normal(0.0, 0.025, size=(len(beat_types), 1)))
    return c, sl, sr, a, u


__all__ = ["build_templates", "beat_tables", "WAVES"]
