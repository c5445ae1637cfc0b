"""Does pretraining help when the encoder is fine-tuned end to end? Pretrained vs random init, frozen vs fine-tuned.

On the built-in synthetic data, per seed: one CLEAR pretraining (sparse attention, as ``clear-hug ablate``) and one
random encoder of the same architecture initialised from that seed; then HUG on each encoder's frozen features
(``train_head_on_features``) and HUG with the encoder fine-tuned end to end (``finetune_end_to_end``, encoder at
``--encoder-lr``, default head lr / 10), at every label fraction. Every fine-tuning starts from a fresh copy of the
same encoder. Test macro AUROC and AUPRC, mean ± std over the seeds, printed as a table and written to JSON.

    PYTHONPATH=. python scripts/finetune_vs_frozen.py --out out/ftenc --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clear_hug.checkpoint import load_encoder
from clear_hug.config import get_config
from clear_hug.data.cache import TokenDataset
from clear_hug.data.prepare import main as prepare_main
from clear_hug.metrics import _nanmean, per_class_auprc, per_class_auroc
from clear_hug.model import CLEAR
from clear_hug.train import common
from clear_hug.train.finetune import (
    FinetuneArgs,
    _feature_batches,
    _record_batches,
    extract_features,
    finetune_end_to_end,
    predict,
    train_head_on_features,
)
from clear_hug.train.pretrain import PretrainArgs, pretrain

ARMS = (("clear", "frozen"), ("random", "frozen"), ("clear", "finetuned"), ("random", "finetuned"))
NAMES = {"clear": "pretrained", "random": "random init"}


def scores(module, batches) -> dict:
    s, y = predict(module, batches, "cpu")
    return {"auroc": _nanmean(per_class_auroc(y, s)), "auprc": _nanmean(per_class_auprc(y, s))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/ftenc")
    p.add_argument("--n-records", type=int, default=800)
    p.add_argument("--preset", default="small")
    p.add_argument("--epochs", type=int, default=4, help="pretraining epochs")
    p.add_argument("--lr", type=float, default=1.5e-3, help="pretraining peak lr")
    p.add_argument("--head-epochs", type=int, default=40, help="epochs of every head (frozen and fine-tuned)")
    p.add_argument("--head-lr", type=float, default=5e-3)
    p.add_argument("--encoder-lr", type=float, default=None, help="fine-tuning: encoder lr (default head lr / 10)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    cache = out / "cache"
    if prepare_main(["--source", "synthetic", "--out", str(cache), "--n-records", str(args.n_records),
                     "--workers", str(args.threads), "--seed", "0", "--no-progress"]) != 0:
        return 2
    splits = {s: TokenDataset(cache, s) for s in ("train", "val", "test")}
    n_classes = len(splits["train"].class_names)
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        run = PretrainArgs(epochs=args.epochs, batch_size=32, lr=args.lr, warmup_epochs=1, seed=seed,
                           out_dir=str(out / f"pretrain_s{seed}"), resume=True, progress=False)
        pretrain(get_config(args.preset, attn_impl="sparse"), splits["train"], run, splits["val"])
        common.seed_everything(seed)
        encoders = {"clear": load_encoder(out / f"pretrain_s{seed}" / "last.pt"),
                    "random": CLEAR(get_config(args.preset))}
        print(f"seed {seed}: pretrained in {time.perf_counter() - t0:.0f}s", flush=True)
        for enc, mode in ARMS:
            for fraction in args.fractions:
                t0 = time.perf_counter()
                hargs = FinetuneArgs(head="hug", epochs=args.head_epochs, lr=args.head_lr, seed=seed,
                                     label_fraction=fraction, warmup_epochs=max(1, args.head_epochs // 10),
                                     encoder_lr=args.encoder_lr, device="cpu", progress=False)
                if mode == "frozen":
                    feats = {s: extract_features(encoders[enc], ds, device="cpu") for s, ds in splits.items()}
                    module, result = train_head_on_features(*feats["train"], *feats["val"], hargs)
                    test = scores(module, _feature_batches(*feats["test"], 1024))
                else:
                    module, result = finetune_end_to_end(copy.deepcopy(encoders[enc]), splits["train"],
                                                         splits["val"], n_classes, hargs)
                    test = scores(module, _record_batches(splits["test"], 256))
                runs.append({"encoder": enc, "mode": mode, "fraction": fraction, "seed": seed,
                             "n_train": result["n_train"], "best_epoch": result["best_epoch"],
                             "val_auroc": result["val_auroc"], **test, "seconds": time.perf_counter() - t0})
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for enc, mode in ARMS:
        for fraction in args.fractions:
            rows = [r for r in runs if (r["encoder"], r["mode"], r["fraction"]) == (enc, mode, fraction)]
            summary[f"{enc}/{mode}/{fraction:g}"] = {m: {"mean": float(np.mean([r[m] for r in rows])),
                                                         "std": float(np.std([r[m] for r in rows])),
                                                         "values": [r[m] for r in rows]} for m in ("auroc", "auprc")}
    lines = ["| encoder | labels | test macro AUROC | test macro AUPRC |", "|---|---|---|---|"]
    for enc, mode in ARMS:
        for fraction in args.fractions:
            m = summary[f"{enc}/{mode}/{fraction:g}"]
            lines.append(f"| {mode} {NAMES[enc]} + HUG | {fraction * 100:g}% | "
                         f"{m['auroc']['mean']:.3f} ± {m['auroc']['std']:.3f} | "
                         f"{m['auprc']['mean']:.3f} ± {m['auprc']['std']:.3f} |")
    table = "\n".join(lines)
    print(table)
    total = time.perf_counter() - t_all
    result = {"args": vars(args), "split_sizes": {s: len(d) for s, d in splits.items()}, "summary": summary,
              "runs": runs, "total_s": total, "table": table, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps(common.json_safe(result), indent=1, allow_nan=False))
    print(f"wrote {out}/results.json in {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
