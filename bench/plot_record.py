"""Plot a real cinc2021 record's 12 leads with the detected beats and their token windows.

    python bench/plot_record.py [--record HR06000] [--ecg-dir ../shared/ecg] [--out out/record_HR06000.png]

Each lead is drawn at 100 Hz (as tokenised); a red line marks each detected R peak (the same for all leads), a
shaded band the span of samples its token takes (the RR-midpoint window, at most R +- 48 samples), alternating
colours so neighbouring windows can be told apart. Invalid (flat/missing) leads are drawn grey.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clear_hug.data.leads import LEADS  # noqa: E402
from clear_hug.data.preprocess import preprocess  # noqa: E402
from clear_hug.data.readers import read_record, shared_ecg_dir  # noqa: E402
from clear_hug.data.tokenize import beat_windows, tokenize_beats  # noqa: E402


def plot(record_path: str, out: Path, max_beats: int = 15, bandpass: bool = True) -> Path:
    sig, fs, meta = read_record(record_path)
    bt = tokenize_beats(sig, fs, max_beats=max_beats, bandpass=bandpass, missing_leads=meta["missing_leads"])
    y, _ = preprocess(sig, fs, bandpass_filter=bandpass)
    r = bt.rpeaks
    start, end = beat_windows(r, y.shape[1])
    t = np.arange(y.shape[1]) / 100.0
    fig, axes = plt.subplots(12, 1, figsize=(14, 15), sharex=True)
    for lead, ax in enumerate(axes):
        ok = bt.valid[lead].any()
        for j in range(min(len(r), max_beats)):
            ax.axvspan(start[j] / 100.0, end[j] / 100.0, color=("tab:blue" if j % 2 == 0 else "tab:orange"),
                       alpha=0.12, lw=0)
            ax.axvline(r[j] / 100.0, color="tab:red", lw=0.8, alpha=0.8)
        for j in range(max_beats, len(r)):  # beats beyond max_beats: detected, not tokenised
            ax.axvline(r[j] / 100.0, color="0.5", lw=0.8, ls=":")
        ax.plot(t, y[lead], color="k" if ok else "0.6", lw=0.7)
        ax.set_ylabel(LEADS[lead], rotation=0, ha="right", va="center", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.margins(x=0)
    dx = ",".join(str(c) for c in meta["dx"])
    axes[0].set_title(f"{meta['record']}: {len(r)} beats detected on all leads together, {int(bt.valid[0].sum())} "
                      f"tokenised (windows shaded, R peaks red); Dx {dx}", fontsize=11)
    axes[-1].set_xlabel("time (s), 100 Hz" + (", band-pass 0.67-40 Hz" if bandpass else ""))
    fig.tight_layout(h_pad=0.1)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", default="HR06000", help="a record name in <ecg-dir>/cinc2021 (or a path)")
    ap.add_argument("--ecg-dir", type=Path, default=shared_ecg_dir())
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-bandpass", action="store_true")
    args = ap.parse_args(argv)
    path = args.record if os.path.exists(args.record + ".hea") else str(args.ecg_dir / "cinc2021" / args.record)
    if not os.path.exists(path + ".hea"):
        print(f"record not found: {path} (set --ecg-dir or CLEAR_HUG_ECG_DIR)", file=sys.stderr)
        return 2
    out = args.out or Path(__file__).resolve().parents[1] / "out" / f"record_{Path(path).name}.png"
    print(plot(path, out, bandpass=not args.no_bandpass))
    return 0


if __name__ == "__main__":
    sys.exit(main())
