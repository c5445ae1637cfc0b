"""Pictures of one record: its 12 leads with the detected beats and token windows (``clear-hug plot``), and with
a classifier's prediction beside them (``clear-hug predict --plot``).

Each lead is drawn at 100 Hz as tokenised; a red line marks each detected R peak (the same for all leads), a shaded
band the samples its token takes (the RR-midpoint window, at most R +- 48), in alternating colours so neighbouring
windows can be told apart; beats past ``max_beats`` are dotted grey (detected, not tokenised); flat or missing
leads are grey. ``start``/``end`` (seconds) zoom into a long record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .heads import Classifier


def _axes_leads(fig, gs_leads, y, valid, rpeaks, max_beats, t0: float, t1: float):
    from .data.leads import LEADS
    from .data.tokenize import beat_windows

    fs = 100.0
    lo, hi = int(t0 * fs), min(int(np.ceil(t1 * fs)), y.shape[1])
    start, end = beat_windows(rpeaks, y.shape[1])
    t = np.arange(lo, hi) / fs
    cap = len(rpeaks) if max_beats is None else max_beats
    shown = np.flatnonzero((rpeaks >= lo) & (rpeaks < hi))
    axes = []
    for lead in range(12):
        ax = fig.add_subplot(gs_leads[lead], sharex=axes[0] if axes else None)
        for j in shown:
            if j < cap:
                ax.axvspan(start[j] / fs, end[j] / fs, color="tab:blue" if j % 2 == 0 else "tab:orange", alpha=0.12,
                           lw=0)
                ax.axvline(rpeaks[j] / fs, color="tab:red", lw=0.8, alpha=0.8)
            else:
                ax.axvline(rpeaks[j] / fs, color="0.5", lw=0.8, ls=":")
        ax.plot(t, y[lead, lo:hi], color="k" if valid[lead] else "0.6", lw=0.7)
        ax.set_ylabel(LEADS[lead], rotation=0, ha="right", va="center", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlim(lo / fs, hi / fs)
        if lead < 11:
            ax.tick_params(labelbottom=False)
        axes.append(ax)
    return axes


def plot_record(path: str | os.PathLike, out: os.PathLike, *, bandpass: bool = True,
                max_beats: int | None = 15, start: float | None = None, end: float | None = None,
                prediction: dict | None = None, contributions: dict | None = None, top: int = 5) -> Path:
    """Draw record ``path`` (see the module docstring) into ``out`` (PNG). ``prediction``: a row of
    ``predict_records`` (its top classes are drawn beside the leads); ``contributions``: ``{"class": name,
    "parts": [(label, logit share)]}`` for that class (how much each lead group / HUG level added)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.preprocess import preprocess
    from .data.readers import read_record
    from .data.snomed import snomed_name
    from .data.tokenize import tokenize_beats

    signal, fs, meta = read_record(path)
    duration = signal.shape[1] / fs
    t0 = 0.0 if start is None else float(start)
    t1 = duration if end is None else min(float(end), duration)
    if not 0 <= t0 < t1:
        raise ValueError(f"start/end must satisfy 0 <= start < end <= the record's {duration:.1f} s, got "
                         f"start={start}, end={end}")
    bt = tokenize_beats(signal, fs, max_beats=max_beats, bandpass=bandpass, missing_leads=meta["missing_leads"])
    y, _ = preprocess(signal, fs, bandpass_filter=bandpass)
    side = prediction is not None
    width = min(30.0, 6 + 1.2 * (t1 - t0)) + (5 if side else 0)
    fig = plt.figure(figsize=(width, 15))
    gs = fig.add_gridspec(12, 2 if side else 1, width_ratios=[4, 1.2] if side else None, hspace=0.08, wspace=0.25)
    axes = _axes_leads(fig, [gs[i, 0] for i in range(12)], y, ~bt.flat, np.asarray(bt.rpeaks), max_beats, t0, t1)
    dx = ", ".join(f"{snomed_name(c)} ({c})" for c in meta["dx"])
    span = f", {t0:g}-{t1:g} s of {duration:.0f} s shown" if start is not None or end is not None else ""
    axes[0].set_title(f"{meta['record']}: {len(bt.rpeaks)} beats detected on all leads together (R peaks red, "
                      f"token windows shaded){span}{'; Dx ' + dx if dx else ''}", fontsize=10)
    axes[-1].set_xlabel("time (s), 100 Hz" + (", band-pass 0.67-40 Hz" if bandpass else ""))
    if side:
        probs = prediction["probabilities"]
        names = sorted(probs, key=probs.get, reverse=True)[:top]
        ax = fig.add_subplot(gs[0:5, 1])
        ax.barh(names[::-1], [probs[n] for n in names[::-1]], color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_title("top classes (probability)", fontsize=10)
        ax.tick_params(labelsize=8)
        if contributions:
            ax = fig.add_subplot(gs[6:12, 1])
            labels, values = zip(*contributions["parts"])
            ax.barh(list(labels)[::-1], list(values)[::-1],
                    color=["tab:red" if v < 0 else "tab:green" for v in values[::-1]])
            ax.axvline(0, color="k", lw=0.6)
            ax.set_title(f"share of the {contributions['class']} logit", fontsize=10)
            ax.tick_params(labelsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out


def head_contributions(model: Classifier, path: str | os.PathLike) -> dict:
    """How much each part of the head added to the logit of the record's most probable class: per HUG expert
    (level 1 lead groups, level 2 pairs, level 3 all), or per lead group for the linear probe. Exact: the
    shares plus the classifier's bias are the logit."""
    import torch

    from .heads import EXPERTS, HUG, LEAD_GROUPS, LinearProbe
    from .predict import record_inputs

    item, _ = record_inputs(path, model.preprocessing)
    device = next(model.parameters()).device
    with torch.no_grad():
        feats = model.encoder.forward_features(*(item[k][None].to(device) for k in ("tokens", "valid", "time")))
        logits = model.head(feats)[0]
        c = int(logits.argmax())
        if isinstance(model.head, HUG):
            shares = model.head.expert_contributions(feats)[0, :, c].tolist()
            parts = [(f"L{level} {name}", v) for (name, level), v in zip(EXPERTS, shares)]
        elif isinstance(model.head, LinearProbe):
            per_lead = model.head.lead_contributions(feats)[0, :, c]
            parts = [(group, float(per_lead[list(idx)].sum())) for group, idx in LEAD_GROUPS.items()]
        else:
            raise TypeError(f"no contributions for a head of type {type(model.head).__name__}")
    return {"class": model.class_names[c], "parts": parts}


def plot_prediction(model: Classifier, row: dict, out: os.PathLike) -> Path:
    """``plot_record`` of a predicted record with its top classes and the head's contributions."""
    prep = model.preprocessing
    return plot_record(row["path"], out, bandpass=bool(prep["bandpass"]), max_beats=prep["max_beats"],
                       prediction=row, contributions=head_contributions(model, row["path"]))


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import plot_parser
    from .data.readers import _record_base

    args = plot_parser().parse_args(argv)
    base = _record_base(args.record)
    out = args.out or f"{Path(base).name}.png"
    print(plot_record(base, out, bandpass=not args.no_bandpass, max_beats=args.max_beats, start=args.start,
                      end=args.end))
    return 0
