"""``clear-hug evaluate``'s report: every metric of ``metrics.classification_report`` for a classifier on a split
of a token cache, the predictions, a Markdown report with per-class tables, and ROC and precision-recall curves."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data.snomed import cinc2021_weights
from .metrics import classification_report

if TYPE_CHECKING:
    import torch

    from .data.cache import TokenDataset

METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "f1": "F1", "fbeta": "F-beta (2)", "gbeta": "G-beta (2)",
                "challenge": "CinC 2021 score"}


@dataclass
class EvaluateArgs:
    """``clear-hug evaluate``'s settings besides the run settings (seed, device: ``common.RunSettings``)."""

    split: str = field(default="test", metadata={"choices": ("train", "val", "test")})
    n_boot: int = 200  # bootstrap resamples for the 95% intervals (0: none)


def dataset_scores(model: torch.nn.Module, dataset: TokenDataset,
                   device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sigmoid scores ``[N, C]``, labels and record ids of every record of a ``TokenDataset`` split."""
    from .train.finetune import _record_batches, predict

    scores, labels = predict(model.to(device), _record_batches(dataset, 256), device)
    return scores, labels, [dataset.record_id(i) for i in range(len(dataset))]


def evaluate_split(model: torch.nn.Module, val_set: TokenDataset, test_set: TokenDataset, class_names: Sequence[str],
                   device: str | torch.device = "cpu", n_boot: int = EvaluateArgs.n_boot,
                   seed: int = 0) -> tuple[dict, dict]:
    """The report of ``model`` on ``test_set`` with thresholds tuned on ``val_set``, and the test predictions
    ``{"record_ids", "scores", "labels"}``."""
    if len(val_set) == 0:
        raise ValueError("the validation split has no records: thresholds are tuned there")
    sv, yv, _ = dataset_scores(model, val_set, device)
    st, yt, ids = dataset_scores(model, test_set, device)
    cinc = cinc2021_weights(class_names)
    result = classification_report(yv, sv, yt, st, class_names, n_boot=n_boot, seed=seed,
                                   weights=None if cinc is None else cinc[0], normal=None if cinc is None else cinc[1])
    return result, {"record_ids": ids, "scores": st, "labels": yt}


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(result: dict, title: str, images: Sequence[str] = ()) -> str:
    """The report as Markdown: macro metrics with 95% bootstrap intervals, then one row per class."""
    lines = [f"# {title}", "",
             f"{result['n_records']} test records; thresholds per class tuned on {result['n_val_records']} validation "
             f"records (F1, F-beta and G-beta each on its own metric; the challenge score on the F-beta ones); "
             f"95% intervals from {result['n_boot']} bootstrap resamples of the test records.", "",
             "| metric | value | 95% interval |", "|---|---|---|"]
    for key, value in result["macro"].items():
        ci = result["ci95"].get(key)
        interval = f"{_fmt(ci['low'])} - {_fmt(ci['high'])}" if ci else "n/a"
        if ci and ci["n_undefined"]:
            interval += f" ({ci['n_undefined']} resamples undefined)"
        lines.append(f"| macro {METRIC_NAMES[key]} | {_fmt(value)} | {interval} |")
    lines += ["", "| class | positives (test / val) | AUROC | AUPRC | F1 | F-beta | G-beta | threshold (F-beta) | "
              "TP / FP / FN |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["per_class"]:
        name = r["class"].replace("|", "\\|")  # merged CinC classes ("CRBBB|RBBB") inside a Markdown table
        threshold = "never" if r["threshold_fbeta"] is None else f"{r['threshold_fbeta']:.3g}"
        lines.append(f"| {name} | {r['positives']} / {r['val_positives']} | {_fmt(r['auroc'])} | "
                     f"{_fmt(r['auprc'])} | {_fmt(r['f1'])} | {_fmt(r['fbeta'])} | {_fmt(r['gbeta'])} | "
                     f"{threshold} | "
                     f"{r['tp']} / {r['fp']} / {r['fn']} |")
    lines += ["", "AUROC and AUPRC are n/a for a class without both a positive and a negative test record "
              "(left out of the macro averages)."]
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    return "\n".join(lines) + "\n"


def plot_curves(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], out_dir: Path) -> list[Path]:
    """ROC and precision-recall curves of every class that has both a positive and a negative record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(labels) > 0.5
    paths = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(7, 6))
        drawn = 0
        for c, name in enumerate(class_names):
            if 0 < y[:, c].sum() < len(y):
                drawn += 1
                if kind == "roc":
                    fpr, tpr, _ = roc_curve(y[:, c], scores[:, c])
                    ax.plot(fpr, tpr, lw=1, label=name)
                else:
                    precision, recall, _ = precision_recall_curve(y[:, c], scores[:, c])
                    ax.plot(recall, precision, lw=1, label=name)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=0.8)
        ax.set_xlabel("false positive rate" if kind == "roc" else "recall")
        ax.set_ylabel("true positive rate" if kind == "roc" else "precision")
        ax.set_title("ROC curves per class" if kind == "roc" else "Precision-recall curves per class")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if drawn:
            ax.legend(fontsize=7, ncol=2, loc="lower right" if kind == "roc" else "lower left")
        else:
            ax.text(0.5, 0.5, "no class has both a positive and a negative record", ha="center", va="center")
        fig.tight_layout()
        path = out_dir / f"{kind}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _strict(obj):
    """``obj`` with NaN floats as None, so the JSON is strict (readable by any parser)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_report(result: dict, predictions: dict, class_names: Sequence[str], out_dir: os.PathLike, title: str,
                 extra: dict | None = None) -> Path:
    """``out_dir``: ``metrics.json``, ``predictions.csv``/``.json`` (with the labels), ``roc.png``, ``pr.png`` and
    ``report.md``. Returns the report's path."""
    from .predict import write_predictions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_strict({**(extra or {}), **result}), indent=1, allow_nan=False))
    rows = [{"record": r, "probabilities": {c: float(p) for c, p in zip(class_names, s)},
             "labels": [c for c, v in zip(class_names, y) if v > 0.5]}
            for r, s, y in zip(predictions["record_ids"], predictions["scores"], predictions["labels"])]
    write_predictions(rows, class_names, out / "predictions.csv")
    images = plot_curves(predictions["labels"], predictions["scores"], class_names, out)
    report = out / "report.md"
    report.write_text(markdown(result, title, images))
    return report
