"""R-peak detection accuracy on real records, and tokenisation speed.

    python bench/bench_rpeaks.py [--ecg-dir ../shared/ecg] [--repeat 5]

Prints sensitivity (Se) and positive predictivity (+P) with a 150 ms tolerance against the reference beat
annotations (beat symbols only) of MIT-BIH record 100 (both leads) and of each CPSC 2021 Holter excerpt, then the
tokenisation speed (read excluded, resampling + detection + windows included) on the cinc2021 records.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clear_hug.data.readers import read_record, shared_ecg_dir  # noqa: E402
from clear_hug.data.rpeaks import BEAT_SYMBOLS, detect_rpeaks, match_beats  # noqa: E402
from clear_hug.data.tokenize import tokenize_beats  # noqa: E402


def score(base: str) -> tuple[int, int, int, float, float]:
    import wfdb

    rec = wfdb.rdrecord(base)
    ann = wfdb.rdann(base, "atr")
    ref = np.array([s for s, sym in zip(ann.sample, ann.symbol) if sym in BEAT_SYMBOLS])
    t0 = time.perf_counter()
    det = detect_rpeaks(rec.p_signal.T, rec.fs)
    dt = time.perf_counter() - t0
    tp, fn, fp = match_beats(ref, det, int(round(0.15 * rec.fs)))
    return tp, fn, fp, rec.p_signal.shape[0] / rec.fs, dt


def line(name: str, tp: int, fn: int, fp: int, extra: str = "") -> tuple[float, float]:
    se = tp / (tp + fn) if tp + fn else 1.0
    ppv = tp / (tp + fp) if tp + fp else 1.0
    print(f"{name:14s} beats {tp + fn:6d}  TP {tp:6d}  FN {fn:4d}  FP {fp:4d}  Se {se:.4f}  +P {ppv:.4f}  {extra}")
    return se, ppv


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ecg-dir", type=Path, default=shared_ecg_dir())
    ap.add_argument("--repeat", type=int, default=5, help="passes over the cinc2021 records for the speed figure")
    ap.add_argument("--synthetic", type=int, default=1000, metavar="N",
                    help="also score the detector on N synthetic records per class and rhythm (0: skip)")
    args = ap.parse_args(argv)
    if args.synthetic:
        from clear_hug.data.detector_eval import synthetic_detection_counts

        print(f"== R-peak detection on {args.synthetic} synthetic records (seed 0, 100 Hz), per label ==")
        for name, (tp, fn, fp) in sorted(synthetic_detection_counts(args.synthetic).items()):
            line(name, tp, fn, fp)
    d = args.ecg_dir
    if not d.exists():
        print(f"real ECG records not found at {d}; set --ecg-dir or CLEAR_HUG_ECG_DIR", file=sys.stderr)
        return 2

    print("== R-peak detection, 150 ms tolerance, all leads together ==")
    if (d / "mitdb" / "100.hea").exists():
        tp, fn, fp, dur, dt = score(str(d / "mitdb" / "100"))
        line("mitdb/100", tp, fn, fp, f"({dur / 60:.0f} min, 2 leads, 360 Hz, detect {dt * 1e3:.0f} ms)")
    tot = np.zeros(3, dtype=np.int64)
    for hea in sorted(glob.glob(str(d / "cpsc2021" / "*.hea"))):
        tp, fn, fp, dur, dt = score(hea[:-4])
        tot += (tp, fn, fp)
        line("cpsc/" + Path(hea).stem[5:], tp, fn, fp, f"({dur / 60:.1f} min)")
    if tot.sum():
        line("cpsc2021 all", *tot)

    heas = sorted(glob.glob(str(d / "cinc2021" / "*.hea")))
    if heas:
        recs = [read_record(h)[:2] for h in heas]
        for sig, fs in recs[:3]:  # warm-up (filter design caches, page faults)
            tokenize_beats(sig, fs)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            for sig, fs in recs:
                tokenize_beats(sig, fs)
        dt = time.perf_counter() - t0
        n = args.repeat * len(recs)
        t1 = time.perf_counter()
        for _ in range(args.repeat):
            for sig, fs in recs:
                tokenize_beats(sig, fs, bandpass=True)
        dtb = time.perf_counter() - t1
        t2 = time.perf_counter()
        for _ in range(args.repeat):
            for h in heas:
                tokenize_beats(*read_record(h)[:2])
        dtr = time.perf_counter() - t2
        from clear_hug.data.preprocess import resample

        at100 = [resample(sig, fs) for sig, fs in recs]
        t3 = time.perf_counter()
        for _ in range(args.repeat):
            for y in at100:
                detect_rpeaks(y, 100)
        dtd = time.perf_counter() - t3
        print("== tokenisation speed, cinc2021 (12 leads, 10 s, 500 Hz -> 100 Hz), one process ==")
        print(f"detect only (100 Hz) {dtd / n * 1e3:6.2f} ms/record")
        print(f"tokenise            {n / dt:7.1f} records/s  ({dt / n * 1e3:.2f} ms/record)")
        print(f"tokenise + bandpass {n / dtb:7.1f} records/s  ({dtb / n * 1e3:.2f} ms/record)")
        print(f"read + tokenise     {n / dtr:7.1f} records/s  ({dtr / n * 1e3:.2f} ms/record)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
