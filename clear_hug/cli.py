"""The ``clear-hug`` command: prepare, pretrain, finetune, evaluate, demo."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from .config import ATTN_IMPLS, PRESETS

COMMANDS = ("prepare", "pretrain", "finetune", "evaluate", "demo")


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None,
                   help=help)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, help="token cache folder written by `clear-hug prepare`")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _bool_flag(p, "amp", "bf16 autocast (default: on for CUDA, off on CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clear-hug pretrain", description="Masked-reconstruction pretraining of "
                                "CLEAR; run under `torchrun --nproc-per-node N` for several processes.")
    _common(p)
    p.add_argument("--out", required=True, help="run folder: last.pt, metrics.jsonl (resumed when present)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="base")
    p.add_argument("--attn-impl", choices=ATTN_IMPLS, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--mask-ratio", type=float, default=None)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="variable-length batches: records of similar length, at most this many padded tokens per "
                        "batch (instead of --batch-size records); for ragged long-record caches")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=3.0)
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="end this invocation after N epochs (the schedule still spans --epochs); resume later")
    return p


def finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clear-hug finetune", description="Train HUG or the linear probe on the "
                                "summary outputs of a pretrained (or, without --checkpoint, random) encoder.")
    _common(p)
    p.add_argument("--checkpoint", default=None, help="pretraining checkpoint (last.pt); omit for a random encoder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="base", help="random encoder's preset")
    p.add_argument("--out", required=True, help="folder for head checkpoints and results.jsonl")
    p.add_argument("--head", choices=("hug", "linear", "both"), default="hug")
    p.add_argument("--fusion", choices=("mean", "concat"), default="mean")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: --seed")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--finetune-encoder", action="store_true", help="train the encoder too (default: frozen)")
    p.add_argument("--encoder-lr", type=float, default=None)
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clear-hug evaluate", description="Macro AUROC of trained heads on a split.")
    _common(p)
    p.add_argument("heads", nargs="+", help="head checkpoints written by `clear-hug finetune`")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--out", default=None, help="append results to this JSONL file")
    return p


def _setup_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_pretrain(argv) -> int:
    args = pretrain_parser().parse_args(argv)
    _setup_threads(args)
    from .config import get_config
    from .data.cache import TokenDataset
    from .train.common import setup_distributed
    from .train.pretrain import PretrainArgs, pretrain

    cfg = get_config(args.preset, attn_impl=args.attn_impl, dropout=args.dropout, mask_ratio=args.mask_ratio)
    info = setup_distributed(args.device)
    run = PretrainArgs(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, clip=args.clip, seed=args.seed,
                       amp=args.amp, out_dir=args.out, resume=not args.no_resume,
                       stop_after_epochs=args.stop_after_epochs, progress=not args.no_progress, device=args.device,
                       max_tokens=args.max_tokens)
    history = pretrain(cfg, TokenDataset(args.cache, "train"), run, TokenDataset(args.cache, "val"), info)
    if info.is_main and history["epochs"]:
        last = history["epochs"][-1]
        print(json.dumps({"epoch": last["epoch"], "train_loss": last["train_loss"],
                          "val_loss": last.get("val_loss"), "checkpoint": str(Path(args.out) / "last.pt")}))
    if info.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _encoder(checkpoint: Optional[str], preset: str, seed: int):
    from .config import get_config
    from .model import CLEAR
    from .train import common
    from .train.pretrain import load_encoder

    if checkpoint:
        return load_encoder(checkpoint)
    common.seed_everything(seed)
    return CLEAR(get_config(preset))


def cmd_finetune(argv) -> int:
    args = finetune_parser().parse_args(argv)
    _setup_threads(args)
    import torch

    from .data.cache import TokenDataset
    from .train import common
    from .train.finetune import (FinetuneArgs, evaluate, extract_features, finetune_end_to_end,
                                 train_head_on_features)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_set, val_set = TokenDataset(args.cache, "train"), TokenDataset(args.cache, "val")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heads = ("hug", "linear") if args.head == "both" else (args.head,)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    encoder = _encoder(args.checkpoint, args.preset, args.seed).to(device)
    if not args.finetune_encoder:
        feats = [extract_features(encoder, s, device=device, amp=args.amp, progress=not args.no_progress)
                 for s in (train_set, val_set)]
    for head in heads:
        for fraction in args.fractions:
            for seed in seeds:
                run = FinetuneArgs(head=head, fusion=args.fusion, epochs=args.epochs, batch_size=args.batch_size,
                                   lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                                   min_lr=args.min_lr, seed=seed, label_fraction=fraction,
                                   freeze=not args.finetune_encoder, encoder_lr=args.encoder_lr, amp=args.amp,
                                   progress=not args.no_progress, device=str(device))
                name = f"{head}_f{fraction:g}_s{seed}"
                logger = common.JsonlLogger(out / f"{name}.jsonl")
                if args.finetune_encoder:
                    enc = _encoder(args.checkpoint, args.preset, args.seed).to(device)
                    model, result = finetune_end_to_end(enc, train_set, val_set, len(train_set.class_names), run,
                                                        logger)
                    head_module, enc_state = model.head, model.encoder.state_dict()
                else:
                    head_module, result = train_head_on_features(*feats[0], *feats[1], run, logger)
                    enc_state = None if args.checkpoint else encoder.state_dict()
                common.atomic_save({
                    "head": head, "fusion": args.fusion, "head_state": head_module.state_dict(),
                    "num_classes": len(train_set.class_names), "class_names": train_set.class_names,
                    "encoder_checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                    "encoder_config": encoder.cfg.to_dict(), "encoder_state": enc_state,
                    "args": asdict(run), "result": {k: v for k, v in result.items() if k != "history"},
                }, out / f"{name}.pt")
                summary = {"head": head, "fraction": fraction, "seed": seed, "n_train": result["n_train"],
                           "best_epoch": result["best_epoch"], "val_auroc": result["val_auroc"],
                           "checkpoint": str(out / f"{name}.pt")}
                common.JsonlLogger(out / "results.jsonl").log(**summary)
                print(json.dumps(summary))
    return 0


def load_classifier(path):
    """A head checkpoint (from `finetune`) as an encoder + head ``Classifier``."""
    from .config import CLEARConfig
    from .heads import Classifier, build_head
    from .model import CLEAR
    from .train import common

    state = common.load_checkpoint(path)
    if state["encoder_state"] is not None:
        encoder = CLEAR(CLEARConfig.from_dict(state["encoder_config"]))
        encoder.load_state_dict(state["encoder_state"])
    else:
        from .train.pretrain import load_encoder

        encoder = load_encoder(state["encoder_checkpoint"])
    head = build_head(state["head"], encoder.cfg.enc_dim, state["num_classes"], state["fusion"])
    head.load_state_dict(state["head_state"])
    return Classifier(encoder, head)


def cmd_evaluate(argv) -> int:
    args = evaluate_parser().parse_args(argv)
    _setup_threads(args)
    import torch

    from .data.cache import TokenDataset
    from .train import common
    from .train.finetune import evaluate

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = TokenDataset(args.cache, args.split)
    for path in args.heads:
        result = {"checkpoint": path, "split": args.split, **evaluate(load_classifier(path), dataset, device=device)}
        common.JsonlLogger(args.out).log(**result) if args.out else None
        print(json.dumps(result))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: clear-hug {{{','.join(COMMANDS)}}} [options]   (clear-hug COMMAND --help for details)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "prepare":
        from .data.prepare import main as prepare_main

        return prepare_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    return {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "evaluate": cmd_evaluate}[command](rest)


if __name__ == "__main__":
    sys.exit(main())
