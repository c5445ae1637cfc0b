"""``clear-hug ablate``: the paper's ablations in one command, on the built-in synthetic data, over several seeds.

Three questions, asked together: does the conduction-sparse mask help pretraining (CLEAR pretrained with
``attn_impl="sparse"`` against the same model pretrained with full attention, ``"full"``)? Does HUG beat the linear
probe? Does pretraining beat a random encoder of the same architecture? For every seed, each encoder (sparse-
pretrained, full-pretrained, random, all initialised from that seed) is frozen and both heads are trained on its
features; the test macro AUROC and AUPRC are reported as mean ± std over the seeds, as a table, a plot and
``results.json``. ``--readme-from`` rewrites the README's ablation block from a committed results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cli_args import dataclass_flags
from .demo import LOCAL_RUN_FLAGS, LocalRun
from .report import add_readme_arguments, rewrite_from_results

ENCODERS = ("sparse", "full", "random")  # pretrained with the conduction mask, pretrained without it, untrained
ENCODER_NAMES = {"sparse": "CLEAR, sparse attention", "full": "CLEAR, full attention", "random": "no pretraining"}
HEADS = ("hug", "linear")
README_BLOCK = "ablation_table"


@dataclass
class AblateArgs(LocalRun):
    """``clear-hug ablate``'s settings (its flags are generated from these fields)."""

    out: str = "out/ablate"
    n_records: int = 800
    preset: str = "small"
    epochs: int = 4  # pretraining
    batch_size: int = 32
    lr: float = 1.5e-3  # pretraining peak lr
    head_epochs: int = 40
    head_lr: float = 5e-3
    fraction: float = 0.1  # of the training labels, for the heads
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "cpu"


ABLATE_FLAGS = {
    "out": "output folder (cache, runs, results.json, ablation.png)",
    "n_records": "synthetic records (about 80%% train)", "preset": "model size", "epochs": "pretraining epochs",
    "batch_size": "pretraining records per batch", "lr": "pretraining peak lr", "head_epochs": "head epochs",
    "head_lr": "head peak lr", "fraction": "fraction of the training labels the heads see",
    "seeds": "one run of every encoder and head per seed", "device": "cpu or cuda", **LOCAL_RUN_FLAGS,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clear-hug ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    dataclass_flags(p, AblateArgs, ABLATE_FLAGS)
    add_readme_arguments(p, "ablation")
    return p


def summarise(runs: Sequence[dict]) -> dict:
    """``{"encoder/head": {metric: {"mean", "std", "values"}}}`` over the seeds of ``runs``."""
    summary = {}
    for enc in ENCODERS:
        for head in HEADS:
            rows = [r for r in runs if (r["encoder"], r["head"]) == (enc, head)]
            if rows:
                summary[f"{enc}/{head}"] = {m: {"mean": float(np.mean([r[m] for r in rows])),
                                                "std": float(np.std([r[m] for r in rows])),
                                                "values": [r[m] for r in rows]} for m in ("auroc", "auprc")}
    return summary


def format_table(summary: dict) -> str:
    lines = ["| encoder | head | test macro AUROC | test macro AUPRC |", "|---|---|---|---|"]
    for key, m in summary.items():
        enc, head = key.split("/")
        lines.append(f"| {ENCODER_NAMES[enc]} | {'HUG' if head == 'hug' else 'linear probe'} | "
                     f"{m['auroc']['mean']:.3f} ± {m['auroc']['std']:.3f} | "
                     f"{m['auprc']['mean']:.3f} ± {m['auprc']['std']:.3f} |")
    return "\n".join(lines)


def readme_text(result: dict) -> str:
    a = result["args"]
    return (f"{result['split_sizes']['train']} / {result['split_sizes']['val']} / {result['split_sizes']['test']} "
            f"synthetic records (train / val / test), `{a['preset']}` preset pretrained {a['epochs']} epochs, heads on "
            f"{a['fraction']:g} of the training labels, seeds {a['seeds']} (mean ± std); "
            f"{result['timings']['total_s'] / 60:.1f} minutes on {a['threads']} thread(s):\n\n"
            + format_table(result["summary"]))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(ENCODERS))
    for ax, metric in zip(axes, ("auroc", "auprc")):
        for k, head in enumerate(HEADS):
            keys = [f"{e}/{head}" for e in ENCODERS]
            ax.bar(x + (k - 0.5) * 0.38, [summary[q][metric]["mean"] for q in keys], 0.38,
                   yerr=[summary[q][metric]["std"] for q in keys], capsize=3,
                   label="HUG" if head == "hug" else "linear probe")
            for j, q in enumerate(keys):  # every seed, so the spread is visible, not only its summary
                vals = summary[q][metric]["values"]
                ax.scatter(np.full(len(vals), j + (k - 0.5) * 0.38), vals, color="k", s=8, zorder=3)
        ax.set_xticks(x, [ENCODER_NAMES[e] for e in ENCODERS], fontsize=8)
        ax.set_ylabel(f"test macro {metric.upper()}")
        lo = min(min(summary[q][metric]["values"]) for q in summary)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.legend(fontsize=8)
    fig.suptitle("Ablations: conduction-sparse vs full attention in pretraining, HUG vs linear probe, "
                 "pretrained vs random encoder", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.readme_from:
        rewrite_from_results(args, README_BLOCK, readme_text, "clear-hug ablate")
        return 0
    if len(args.seeds) < 1:
        raise ValueError("--seeds needs at least one seed")

    from .checkpoint import load_encoder
    from .config import get_config
    from .data.cache import TokenDataset
    from .data.prepare import main as prepare_main
    from .metrics import _nanmean, per_class_auprc, per_class_auroc
    from .model import CLEAR
    from .train import common
    from .train.finetune import FinetuneArgs, _feature_batches, extract_features, predict, train_head_on_features
    from .train.pretrain import PretrainArgs, pretrain

    args.threads = args.threads or common.idle_threads(2)
    common.setup_cpu_process(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = args.progress
    t_all = time.perf_counter()
    timings = {"pretrain_s": 0.0, "features_s": 0.0, "heads_s": 0.0}
    cache = out / "cache"
    if prepare_main(["--source", "synthetic", "--out", str(cache), "--n-records", str(args.n_records),
                     "--workers", str(args.threads), "--seed", "0"] + ([] if progress else ["--no-progress"])) != 0:
        return 2
    splits = {s: TokenDataset(cache, s) for s in ("train", "val", "test")}
    runs = []
    for seed in args.seeds:
        encoders = {}
        for attn in ("sparse", "full"):
            t0 = time.perf_counter()
            run = PretrainArgs(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=1, seed=seed,
                               out_dir=str(out / f"pretrain_{attn}_s{seed}"), resume=True, progress=progress,
                               device=args.device)
            pretrain(get_config(args.preset, attn_impl=attn), splits["train"], run, splits["val"])
            # Each encoder is used as it was pretrained (the full-attention one without the conduction mask).
            encoders[attn] = load_encoder(out / f"pretrain_{attn}_s{seed}" / "last.pt")
            timings["pretrain_s"] += time.perf_counter() - t0
            print(f"seed {seed}: pretrained {attn} in {time.perf_counter() - t0:.0f}s")
        common.seed_everything(seed)
        encoders["random"] = CLEAR(get_config(args.preset))
        for enc in ENCODERS:
            t0 = time.perf_counter()
            feats = {s: extract_features(encoders[enc], ds, device=args.device) for s, ds in splits.items()}
            timings["features_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for head in HEADS:
                # Dozens of heads of a few seconds each: no progress bar per head.
                hargs = FinetuneArgs(head=head, epochs=args.head_epochs, lr=args.head_lr, seed=seed,
                                     label_fraction=args.fraction, warmup_epochs=max(1, args.head_epochs // 10),
                                     progress=False)
                module, result = train_head_on_features(*feats["train"], *feats["val"], hargs)
                scores, labels = predict(module, _feature_batches(*feats["test"], 1024), "cpu")
                runs.append({"encoder": enc, "head": head, "seed": seed, "n_train": result["n_train"],
                             "val_auroc": result["val_auroc"], "auroc": _nanmean(per_class_auroc(labels, scores)),
                             "auprc": _nanmean(per_class_auprc(labels, scores))})
            timings["heads_s"] += time.perf_counter() - t0
    summary = summarise(runs)
    table = format_table(summary)
    print(table)
    plot(summary, out / "ablation.png")
    timings["total_s"] = time.perf_counter() - t_all
    result = {"args": vars(args), "class_names": splits["train"].class_names,
              "split_sizes": {s: len(d) for s, d in splits.items()}, "summary": summary, "runs": runs,
              "timings": timings, "table": table}
    (out / "results.json").write_text(json.dumps(common.json_safe(result), indent=1, allow_nan=False))
    print(f"wrote {out}/results.json and ablation.png in {timings['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
