"""``clear-hug demo``: the main job, end to end on synthetic ECGs in minutes on a laptop CPU.

synthetic records -> token cache -> CLEAR pretraining (sparse attention) -> HUG and linear probe at 1%, 10% and
100% of the training labels on the frozen encoder, against the same heads on a randomly initialised encoder
(no pretraining), over several seeds -> a table of test macro AUROC, PNGs and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cli_args import dataclass_flags
from .config import ATTN_IMPLS
from .report import add_readme_arguments, rewrite_from_results

if TYPE_CHECKING:  # for annotations only: these modules are imported inside the functions that use them
    from .data.cache import TokenDataset
    from .model import CLEAR

ENCODERS = ("clear", "random")
HEADS = ("hug", "linear")
COLUMNS = {("clear", "hug"): "CLEAR + HUG", ("clear", "linear"): "CLEAR + linear",
           ("random", "hug"): "no pretrain + HUG", ("random", "linear"): "no pretrain + linear"}


@dataclass
class LocalRun:
    """The run settings of the jobs sized for a laptop CPU (demo, demo --long, ablate)."""

    threads: int = 0  # torch CPU threads; 0: up to 2, fewer when other processes keep cores busy (idle_threads)
    progress: bool = True


LOCAL_RUN_FLAGS = {"threads": "torch CPU threads; 0: up to 2, fewer when other processes keep cores busy",
                   "progress": "progress bars"}


@dataclass
class DemoArgs(LocalRun):
    """``clear-hug demo``'s settings: a small model, a short schedule (its flags are generated from these fields)."""

    out: str = "out/demo"
    n_records: int = 3000
    preset: str = "small"
    attn_impl: str = field(default="sparse", metadata={"choices": ATTN_IMPLS})
    epochs: int = 10  # pretraining
    batch_size: int = 32
    lr: float = 1.5e-3  # pretraining
    warmup_epochs: float = 1
    head_epochs: int = 60
    head_lr: float = 5e-3
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "cpu"


DEMO_FLAGS = {
    "out": "output folder (cache, runs, PNGs, results.json)", "n_records": "synthetic records (about 80%% train)",
    "preset": "model size", "attn_impl": "attention in pretraining", "epochs": "pretraining epochs",
    "batch_size": "pretraining records per batch", "lr": "pretraining peak lr (small model, short schedule)",
    "warmup_epochs": "pretraining warm-up epochs", "head_epochs": "head epochs", "head_lr": "head peak lr",
    "fractions": "fractions of the training labels the heads see", "seeds": "one head per seed",
    "device": "cpu or cuda", **LOCAL_RUN_FLAGS,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clear-hug demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    dataclass_flags(p, DemoArgs, DEMO_FLAGS)
    add_readme_arguments(p, "demo")
    p.add_argument("--long", action="store_true",
                   help="the long-record demo instead: per-beat AF detection on minutes-long records "
                        "(clear-hug demo --long --help for its options)")
    return p


def format_table(summary: dict, fractions: Sequence[float]) -> str:
    cols = list(COLUMNS.values())
    lines = ["test macro AUROC (mean ± std over seeds)",
             f"{'labels':>7} | " + " | ".join(f"{c:>20}" for c in cols)]
    lines.append("-" * len(lines[-1]))
    for f in fractions:
        cells = []
        for key in COLUMNS:
            r = summary[f"{key[0]}/{key[1]}"][f"{f:g}"]
            cells.append(f"{r['mean']:.3f} ± {r['std']:.3f}".rjust(20))
        lines.append(f"{f * 100:>6g}% | " + " | ".join(cells))
    return "\n".join(lines)


README_BLOCK = "demo_table"


def readme_text(result: dict) -> str:
    """The README's demo table (test macro AUROC, mean ± std over seeds) and its conditions, from results.json."""
    args, sizes = result["args"], result["split_sizes"]
    head = "| labels | " + " | ".join(COLUMNS.values()) + " |"
    lines = [f"{args['n_records']} synthetic records (train/val/test {sizes['train']}/{sizes['val']}/{sizes['test']}), "
             f"`{args['preset']}` preset, {args['epochs']} pretraining epochs, seeds {args['seeds']}; "
             f"{result['timings']['total_s'] / 60:.1f} min in all.", "", head,
             "|" + "|".join("---" for _ in range(len(COLUMNS) + 1)) + "|"]
    for f in args["fractions"]:
        cells = [f"{result['summary'][f'{e}/{h}'][f'{f:g}']['mean']:.3f} ± "
                 f"{result['summary'][f'{e}/{h}'][f'{f:g}']['std']:.3f}" for e, h in COLUMNS]
        lines.append(f"| {f * 100:g}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    steps = np.asarray(history["steps"])
    per_epoch = len(steps) // max(len(history["epochs"]), 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(steps) + 1), steps, lw=0.6, alpha=0.5, label="train (per step)")
    ax.plot([(e["epoch"] + 1) * per_epoch for e in history["epochs"]], [e["train_loss"] for e in history["epochs"]],
            "o-", label="train (epoch mean)")
    if "val_loss" in history["epochs"][0]:
        ax.plot([(e["epoch"] + 1) * per_epoch for e in history["epochs"]],
                [e["val_loss"] for e in history["epochs"]], "s-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-token MSE (z-normalised)")
    ax.set_title("CLEAR pretraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_auroc(summary: dict, fractions: Sequence[float], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (enc, head), name in COLUMNS.items():
        rows = [summary[f"{enc}/{head}"][f"{f:g}"] for f in fractions]
        ax.errorbar([f * 100 for f in fractions], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                    marker="o", capsize=3, ls="-" if enc == "clear" else "--", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training labels (%)")
    ax.set_ylabel("test macro AUROC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def plot_reconstructions(model: CLEAR, dataset: TokenDataset, path: Path, n: int = 6, seed: int = 0) -> None:
    """A few masked heartbeats of one test record: the (z-normalised) truth and the decoder's reconstruction."""
    import matplotlib.pyplot as plt

    from .masking import random_mask

    model.eval()
    item = dataset[0]
    tokens, valid, time_ids = item["tokens"][None], item["valid"][None], item["time"][None]
    mask = random_mask(valid, model.cfg.mask_ratio, torch.Generator().manual_seed(seed))
    out = model(tokens, valid, time_ids, mask)
    leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    where = torch.nonzero(out.mask[0])
    pick = where[torch.linspace(0, len(where) - 1, n).long()]
    fig, axes = plt.subplots(2, n // 2, figsize=(3 * (n // 2), 4.5), sharex=True)
    for ax, (lead, beat) in zip(axes.flat, pick.tolist()):
        ax.plot(out.target[0, lead, beat].numpy(), color="k", lw=1.2, label="masked heartbeat")
        ax.plot(out.pred[0, lead, beat].numpy(), color="tab:red", lw=1.2, label="reconstruction")
        ax.set_title(f"lead {leads[lead]}, beat {beat + 1}", fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"masked heartbeats and reconstructions ({model.cfg.mask_ratio:.0%} of tokens masked)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--long" in argv:
        from .demo_long import main as long_main

        return long_main([a for a in argv if a != "--long"])
    args = build_parser().parse_args(argv)
    if args.readme_from:
        rewrite_from_results(args, README_BLOCK, readme_text, "clear-hug demo")
        return 0
    from .checkpoint import load_encoder
    from .config import get_config
    from .data.cache import TokenDataset
    from .data.prepare import main as prepare_main
    from .model import CLEAR
    from .train import common
    from .train.finetune import FinetuneArgs, evaluate, extract_features, train_head_on_features
    from .train.pretrain import PretrainArgs, pretrain

    args.threads = args.threads or common.idle_threads(2)
    common.setup_cpu_process(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, t_all = {}, time.perf_counter()
    progress = args.progress

    # 1. data
    t0 = time.perf_counter()
    cache = out / "cache"
    prep = ["--source", "synthetic", "--out", str(cache), "--n-records", str(args.n_records),
            "--workers", str(args.threads), "--seed", "0"] + ([] if progress else ["--no-progress"])
    if prepare_main(prep) != 0:
        return 2
    splits = {s: TokenDataset(cache, s) for s in ("train", "val", "test")}
    timings["prepare_s"] = time.perf_counter() - t0

    # 2. pretraining
    t0 = time.perf_counter()
    cfg = get_config(args.preset, attn_impl=args.attn_impl)
    run = PretrainArgs(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs,
                       out_dir=str(out / "pretrain"), resume=False, progress=progress, device=args.device)
    history = pretrain(cfg, splits["train"], run, splits["val"])
    clear = load_encoder(out / "pretrain" / "last.pt")
    timings["pretrain_s"] = time.perf_counter() - t0
    print(f"pretrained {args.preset} CLEAR for {args.epochs} epochs in {timings['pretrain_s']:.0f}s: "
          f"val loss {history['epochs'][0].get('val_loss', float('nan')):.3f} -> "
          f"{history['epochs'][-1].get('val_loss', float('nan')):.3f}")

    # 3. frozen features of the pretrained and of a random encoder (same architecture, no training)
    t0 = time.perf_counter()
    common.seed_everything(12345)
    encoders = {"clear": clear, "random": CLEAR(cfg)}
    feats = {name: {s: extract_features(enc, ds, device=args.device) for s, ds in splits.items()}
             for name, enc in encoders.items()}
    timings["features_s"] = time.perf_counter() - t0

    # 4. heads
    t0 = time.perf_counter()
    runs = []
    for enc in ENCODERS:
        f = feats[enc]
        for head in HEADS:
            for fraction in args.fractions:
                for seed in args.seeds:
                    # Dozens of heads of a few seconds each: no progress bar per head.
                    hargs = FinetuneArgs(head=head, epochs=args.head_epochs, lr=args.head_lr, seed=seed,
                                         label_fraction=fraction, warmup_epochs=max(1, args.head_epochs // 10),
                                         progress=False)
                    module, result = train_head_on_features(*f["train"], *f["val"], hargs)
                    test = evaluate(module, *f["test"])
                    runs.append({"encoder": enc, "head": head, "fraction": fraction, "seed": seed,
                                 "n_train": result["n_train"], "best_epoch": result["best_epoch"],
                                 "val_auroc": result["val_auroc"], "test_auroc": test["auroc"],
                                 "test_classes_excluded": test["classes_excluded"]})
    timings["heads_s"] = time.perf_counter() - t0

    summary = {}
    for enc in ENCODERS:
        for head in HEADS:
            summary[f"{enc}/{head}"] = {}
            for fraction in args.fractions:
                vals = np.array([r["test_auroc"] for r in runs
                                 if (r["encoder"], r["head"], r["fraction"]) == (enc, head, fraction)])
                summary[f"{enc}/{head}"][f"{fraction:g}"] = {"mean": float(vals.mean()), "std": float(vals.std()),
                                                            "values": vals.tolist()}
    table = format_table(summary, args.fractions)
    print(table)

    # 5. figures and JSON
    plot_losses(history, out / "pretrain_loss.png")
    plot_auroc(summary, args.fractions, out / "auroc_vs_labels.png")
    plot_reconstructions(clear, splits["test"], out / "reconstructions.png")
    timings["total_s"] = time.perf_counter() - t_all
    result = {"args": vars(args), "config": cfg.to_dict(), "class_names": splits["train"].class_names,
              "split_sizes": {s: len(d) for s, d in splits.items()}, "summary": summary, "runs": runs,
              "pretrain_epochs": history["epochs"], "timings": timings, "table": table}
    (out / "results.json").write_text(json.dumps(common.json_safe(result), indent=1, allow_nan=False))
    print(f"wrote {out}/results.json and 3 PNGs in {timings['total_s']:.0f}s "
          f"(prepare {timings['prepare_s']:.0f}s, pretrain {timings['pretrain_s']:.0f}s, "
          f"features {timings['features_s']:.0f}s, heads {timings['heads_s']:.0f}s)")
    return 0
