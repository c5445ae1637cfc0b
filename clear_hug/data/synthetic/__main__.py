"""`python -m clear_hug.data.synthetic --plot out/synthetic.png --seed 0`: draw a few records, one panel each,
12 leads stacked, ground-truth R-peaks marked, labels and latent parameters in the title."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from .generator import LEADS, generate_record


def pick_indices(seed: int, n: int, fs: int, duration: float) -> list[int]:
    """The first record of each kind in a fixed order of interest, so one figure shows the variety."""
    wanted = ["NORM", "RBBB", "LBBB", "LVH", "AFIB", "PVC", "IMI", "AMI", "STTC", "1AVB", "STACH", "SBRAD"]
    chosen: list[int] = []
    for name in wanted:
        for i in range(400):
            if i in chosen:
                continue
            info = generate_record(seed, i, fs, duration)[2]
            lab = info["labels"]
            only = name in ("NORM", "AFIB", "PVC", "STACH", "SBRAD") or len(info["present"]) == 1
            if lab[name] and only and (name != "NORM" or lab["SR"]) and (name in ("AFIB", "PVC") or not
                                                                       (lab["AFIB"] or lab["PVC"])):
                chosen.append(i)
                break
        if len(chosen) == n:
            break
    return chosen


def plot(path: str, seed: int = 0, n: int = 8, fs: int = 100, duration: float = 10.0,
         indices: list[int] | None = None, noise: float = 1.0) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = indices if indices is not None else pick_indices(seed, n, fs, duration)
    cols = 2 if len(idx) > 1 else 1
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(11 * cols, 9 * rows), squeeze=False)
    for ax, i in zip(axes.ravel(), idx):
        sig, rp, info = generate_record(seed, i, fs, duration, noise=noise)
        t = np.arange(sig.shape[1]) / fs
        step = 3.0
        for k in range(12):
            off = -k * step
            ax.plot(t, sig[k] + off, lw=0.7, color="k")
            ax.plot(rp / fs, sig[k, rp] + off, "r.", ms=3)
            ax.text(-0.05, off, LEADS[k], ha="right", va="center", fontsize=8)
        lat = info["latent"]
        names = [k for k, v in info["labels"].items() if v]
        ax.set_title(f"#{i}  {' '.join(names)}  HR {info['mean_hr_bpm']:.0f}  PR {lat['pr_ms']:.0f} ms  "
                     f"QRS {lat['qrs_ms']:.0f} ms", fontsize=9)
        ax.set_yticks(np.arange(0, -12 * step, -step / 3), minor=True)
        ax.grid(True, which="both", alpha=0.25)
        ax.set_xticks(np.arange(0, duration + 0.01, 0.2), minor=True)
        ax.set_xlim(-0.4, duration)
        ax.set_ylim(-12 * step + 1, step - 0.5)
        ax.set_xlabel("s (grid 0.2 s x 1 mV)")
    for ax in axes.ravel()[len(idx):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m clear_hug.data.synthetic", description=__doc__)
    p.add_argument("--plot", default="out/synthetic.png", help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=8, help="number of records")
    p.add_argument("--indices", type=int, nargs="*", help="record indices to draw instead of a chosen variety")
    p.add_argument("--fs", type=int, default=100)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--noise", type=float, default=1.0)
    a = p.parse_args(argv)
    print(plot(a.plot, a.seed, a.n, a.fs, a.duration, a.indices, a.noise))


if __name__ == "__main__":
    main()
