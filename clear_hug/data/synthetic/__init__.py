"""Labelled synthetic 12-lead ECGs from a cardiac dipole model: the project's default data, generated offline.

Physics.  The heart is a 3-D dipole (x left, y inferior, z anterior).  Each beat is a sum of waves (P, septal q, R,
S, terminal R' of RBBB, infarct Q vectors, ST, T), each a fixed direction times an asymmetric Gaussian in time,
anti-aliased analytically for the sampling rate.  I, II and V1-V6 are projections of the dipole on per-patient
perturbed lead vectors; noise is added to these 8 independent leads; III, aVR, aVL, aVF are then derived in
float32, so Einthoven's and Goldberger's relations hold exactly in the stored data.

Randomness.  Record i of dataset `seed` uses its own numpy Generator seeded with (seed, i): records are
bitwise reproducible, independent of how many are generated, and can be made in parallel shards
(`generate_dataset(n, seed, start=k)`).  Splits are an 80/10/10 hash of the index.

Labels (PTB-XL-like).  Superclass -> subclasses: NORM -> NORM; CD -> RBBB, LBBB, 1AVB; HYP -> LVH; MI -> IMI,
AMI; STTC -> STTC.  Rhythm axis: exactly one of SR, SBRAD, STACH, AFIB, plus the PVC flag.  Tasks:
"superdiagnostic" (5), "subdiagnostic" (8), "rhythm" (5), "all" (8 + 5 = 13 columns).

Share of records carrying each label (20 000 records of seed 0; a record may carry several labels):

    label   share   physical signature (severity 0 = at the border, 1 = marked)
    NORM    37.6%   no morphology label (any rhythm)
    RBBB    12.6%   terminal right-anterior R' (rSR' V1, broad S in I/V6), QRS +14..64 ms, secondary T
    LBBB     9.4%   QRS 118-168 ms, no septal q, notched leftward-posterior QRS, discordant ST-T
    1AVB    11.5%   PR 194-300 ms (normal PR 115-210 ms: the ranges overlap slightly at the border)
    LVH     15.6%   QRS voltage x1.3-1.9 (normal x0.78-1.35), leftward-posterior shift, strain ST-T if marked
    IMI     13.3%   early superior vector (Q in II/III/aVF), T turned superior (inverted in III, aVF)
    AMI     13.0%   early posterior vector (QS V1-V3), poor R progression, T inverted V1-V4, 35% ST elevation
    STTC    16.3%   ST depression (0.05-0.2 mV) and/or T flattened to inverted (x0.55 .. x-0.45)
    CD      31.0%   HYP 15.6%   MI 24.6%   (superclasses)
    SR      61.4%   60-100 bpm, respiratory sinus arrhythmia 1-5% + jitter
    SBRAD   12.8%   40-60 bpm
    STACH   12.8%   100-150 bpm
    AFIB    13.1%   irregular RR (CV 0.15-0.35), 60-150 bpm, no P, 4.5-8.5 Hz f-waves; never with 1AVB or PVC
    PVC     11.5%   1-3 premature wide beats (coupling 45-70% of RR), no P, full compensatory pause

23% of records carry two or more morphology labels.  Absent abnormalities still move their parameter towards the
border ("subclinical" tendency), so borderline cases exist on both sides.  Patient variability: heart-axis
rotation (frontal SD 20 deg, horizontal 14, sagittal 8), electrode placement and gains (lead vectors perturbed),
body gain (log-normal SD 0.18), QTc, P, R, S and T amplitudes.  Noise: baseline wander, EMG (with bursts),
powerline 50/60 Hz behind the anti-alias filter, motion artefacts, and one lead flat or disconnected in ~4%.

    >>> ds = generate_dataset(1000, seed=0, task="superdiagnostic")
    >>> sig, rpeaks, info = generate_record(seed=0, index=5)
    >>> python -m clear_hug.data.synthetic --plot out/synthetic.png --seed 0
"""
from .generator import LEADS, SyntheticSet, derive_limb_leads, generate_dataset, generate_record, split_of
from .labels import CLASS_NAMES, RHYTHMS, SUBCLASSES, SUBDIAGNOSTIC, SUPERCLASSES, TASKS

__all__ = ["SyntheticSet", "generate_dataset", "generate_record", "derive_limb_leads", "split_of", "LEADS",
           "CLASS_NAMES", "SUPERCLASSES", "SUBCLASSES", "SUBDIAGNOSTIC", "RHYTHMS", "TASKS"]
