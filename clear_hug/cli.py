"""The ``clear-hug`` command: prepare, pretrain, finetune, evaluate, predict, plot, ablate, demo."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .cli_args import dataclass_flags, dataclass_values

COMMANDS = ("prepare", "pretrain", "finetune", "evaluate", "predict", "plot", "ablate", "demo")


# Which fields of the dataclasses are flags, with their help; types, defaults and choices come from the fields.
RUN_FLAGS = {  # train.common.RunSettings
    "device": "cpu or cuda (default: cuda when available)", "threads": "torch CPU threads (default: torch's)",
    "amp": "bf16 autocast (default: on for CUDA, off on CPU)", "progress": "progress bars", "seed": "random seed",
}
MODEL_FLAGS = {  # config.ModelChoice
    "preset": "model size", "attn_impl": "attention (default: the preset's)",
    "dropout": "dropout (default: the preset's)", "mask_ratio": "fraction of heartbeats masked (default: the preset's)",
}
PRETRAIN_FLAGS = {
    "epochs": "epochs of the schedule", "batch_size": "records per batch, per process", "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay", "warmup_epochs": "linear warm-up epochs", "min_lr": "lr at the end of "
    "the cosine decay", "clip": "gradient-norm clipping",
    "max_tokens": "variable-length batches: records of similar length, at most this many padded tokens per batch "
                  "(instead of --batch-size records); for ragged long-record caches",
    "stop_after_epochs": "end this invocation after N epochs (the schedule still spans --epochs); resume later",
    "extend_schedule": "resume with another --epochs than OUT/last.pt was started with: the cosine decay is "
                       "stretched to the new end from the current step on (refused without this flag)",
    "resume": "continue from OUT/last.pt when it exists (--no-resume: start over)",
}
SWEEP_FLAGS = {  # train.finetune.FinetuneSweep
    "checkpoint": "pretraining checkpoint (last.pt); omit for a random encoder of --preset",
    "head": "the head to train (both: one of each)", "fractions": "fractions of the training labels",
    "seeds": "one run per seed (default: --seed)", "finetune_encoder": "train the encoder too (default: frozen)",
}
FINETUNE_FLAGS = {
    "fusion": "HUG's fusion of its 7 expert outputs", "epochs": "head epochs", "batch_size": "records per batch",
    "lr": "peak learning rate", "weight_decay": "AdamW weight decay", "warmup_epochs": "linear warm-up epochs",
    "min_lr": "lr at the end of the cosine decay", "clip": "gradient-norm clipping",
    "encoder_lr": "with --finetune-encoder: the encoder's lr (default: lr / 10)",
}
EVALUATE_FLAGS = {  # evaluation.EvaluateArgs
    "split": "the split to evaluate on", "n_boot": "bootstrap resamples for the 95%% intervals (0: none)",
}


def _common(p: argparse.ArgumentParser) -> None:
    from .train.common import RunSettings

    p.add_argument("--cache", required=True, help="token cache folder written by `clear-hug prepare`")
    dataclass_flags(p, RunSettings, RUN_FLAGS)


def pretrain_parser() -> argparse.ArgumentParser:
    from .config import ModelChoice
    from .train.pretrain import PretrainArgs

    p = argparse.ArgumentParser(prog="clear-hug pretrain", description="Masked-reconstruction pretraining of "
                                "CLEAR; run under `torchrun --nproc-per-node N` for several processes.")
    _common(p)
    # PretrainArgs.out_dir, required here: no default to keep in step.
    p.add_argument("--out", required=True, help="run folder: last.pt, metrics.jsonl (resumed when present), and "
                   "at the end pretrained/ (model.safetensors + config.json)")
    dataclass_flags(p, ModelChoice, MODEL_FLAGS)
    dataclass_flags(p, PretrainArgs, PRETRAIN_FLAGS)
    return p


def finetune_parser() -> argparse.ArgumentParser:
    from .config import ModelChoice
    from .train.finetune import FinetuneArgs, FinetuneSweep

    p = argparse.ArgumentParser(prog="clear-hug finetune", description="Train HUG or the linear probe on the "
                                "summary outputs of a pretrained (or, without --checkpoint, random) encoder.")
    _common(p)
    p.add_argument("--out", required=True, help="folder for head checkpoints and results.jsonl, and pretrained/ "
                   "(model.safetensors + config.json): the classifier with the best validation AUROC")
    dataclass_flags(p, ModelChoice, {"preset": "random encoder's preset"})
    dataclass_flags(p, FinetuneSweep, SWEEP_FLAGS)
    dataclass_flags(p, FinetuneArgs, FINETUNE_FLAGS)
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    from .evaluation import EvaluateArgs

    p = argparse.ArgumentParser(prog="clear-hug evaluate", description="Classifiers on a split: macro and per-class "
                                "AUROC and AUPRC, F1, F-beta and G-beta (beta 2) with per-class thresholds tuned on "
                                "the validation split, the CinC 2021 score for its classes, bootstrap intervals; a "
                                "Markdown report with ROC and precision-recall curves and the predictions.")
    _common(p)
    p.add_argument("heads", nargs="+", help="head checkpoints written by `clear-hug finetune`, or folders written by "
                   "save_pretrained (finetune's OUT/pretrained)")
    dataclass_flags(p, EvaluateArgs, EVALUATE_FLAGS)
    p.add_argument("--out", default=None, help="append results to this JSONL file")
    p.add_argument("--report", default=None, help="folder for the reports (one subfolder per model; default: beside "
                   "each model, MODEL_SPLIT_report/)")
    return p


def predict_parser() -> argparse.ArgumentParser:
    from .train.common import RunSettings

    p = argparse.ArgumentParser(prog="clear-hug predict", description="Class probabilities for records read "
                                "straight from disk (no token cache), by a classifier saved with save_pretrained "
                                "(finetune's OUT/pretrained).")
    p.add_argument("--model", required=True, help="folder with model.safetensors + config.json")
    p.add_argument("inputs", nargs="+", help="WFDB records (.hea/.dat/.mat or the name without extension), folders "
                   "of records (searched recursively), or a PTB-XL root (ptbxl_database.csv)")
    p.add_argument("--out", default="predictions.csv", help="CSV, one row per record and a column per class; the "
                   "same as JSON (with the skipped records) beside it")
    p.add_argument("--plot", default=None, help="folder for one PNG per record: leads, beats, token windows, top "
                   "classes and what each lead group / HUG level contributed")
    dataclass_flags(p, RunSettings, {"device": "cpu or cuda (default: the model's, cpu)",
                                     "progress": RUN_FLAGS["progress"]})
    return p


def plot_parser() -> argparse.ArgumentParser:
    from .data.prepare import max_beats_arg

    p = argparse.ArgumentParser(prog="clear-hug plot", description="Draw a record's 12 leads with the detected beats "
                                "and their token windows.")
    p.add_argument("record", help="a WFDB record (.hea/.dat/.mat or the name without extension)")
    p.add_argument("--out", default=None, help="PNG to write (default: RECORD.png here)")
    p.add_argument("--start", type=float, default=None, help="seconds: first time shown (long records)")
    p.add_argument("--end", type=float, default=None, help="seconds: last time shown")
    p.add_argument("--max-beats", type=max_beats_arg, default=15, help="beats tokenised ('all' for every beat)")
    p.add_argument("--no-bandpass", action="store_true")
    return p


def _setup_threads(args) -> None:
    from .train.common import setup_cpu_process

    setup_cpu_process(args.threads)


def _preprocessing(meta: dict) -> dict:
    """How the cache turned records into tokens: what a model saved with ``save_pretrained`` expects."""
    keys = ("fs", "bandpass", "token_len", "max_beats", "window_s", "source")
    return {"detector": "clear_hug.data.rpeaks.detect_rpeaks", **{k: meta[k] for k in keys if k in meta}}


def _val_split(cache: str):
    """The cache's validation split, or None (said on stderr) when it holds no records."""
    from .data.cache import TokenDataset

    val = TokenDataset(cache, "val")
    if len(val) == 0:
        print(f"note: {cache} has no validation records; no validation loss is computed", file=sys.stderr)
        return None
    return val


def cmd_pretrain(argv: Sequence[str]) -> int:
    args = pretrain_parser().parse_args(argv)
    _setup_threads(args)
    from .checkpoint import load_encoder
    from .config import ModelChoice
    from .data.cache import TokenDataset
    from .train.common import json_line, setup_distributed
    from .train.pretrain import PretrainArgs, pretrain

    cfg = ModelChoice(**dataclass_values(args, MODEL_FLAGS)).config()
    info = setup_distributed(args.device)
    run = PretrainArgs(**dataclass_values(args, RUN_FLAGS), **dataclass_values(args, PRETRAIN_FLAGS), out_dir=args.out)
    train_set = TokenDataset(args.cache, "train")
    history = pretrain(cfg, train_set, run, _val_split(args.cache), info)
    if info.is_main and history["epochs"] and history["epochs"][-1]["epoch"] == args.epochs - 1:
        # The finished run's encoder as a portable folder (safetensors + config.json).
        load_encoder(Path(args.out) / "last.pt").save_pretrained(Path(args.out) / "pretrained",
                                                                 _preprocessing(train_set.meta))
    if info.is_main and history["epochs"]:
        last = history["epochs"][-1]
        print(json_line({"epoch": last["epoch"], "train_loss": last["train_loss"],
                         "val_loss": last.get("val_loss"), "checkpoint": str(Path(args.out) / "last.pt")}))
    if info.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _encoder(path: str | None, preset: str, seed: int):
    from .checkpoint import load_encoder
    from .config import get_config
    from .model import CLEAR
    from .train import common

    if path:
        return load_encoder(path)
    common.seed_everything(seed)
    return CLEAR(get_config(preset))


def cmd_finetune(argv: Sequence[str]) -> int:
    args = finetune_parser().parse_args(argv)
    _setup_threads(args)

    from .checkpoint import load_classifier, save_head
    from .data.cache import TokenDataset
    from .train import common
    from .train.common import json_line, setup_distributed
    from .train.finetune import FinetuneArgs, extract_features_distributed, finetune_end_to_end, train_head_on_features

    info = setup_distributed(args.device)
    device = info.device
    train_set, val_set = TokenDataset(args.cache, "train"), TokenDataset(args.cache, "val")
    for name, split in (("train", train_set), ("val", val_set)):
        if len(split) == 0:
            raise ValueError(f"the {name!r} split of {args.cache} has no records; heads need both train and val")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heads = ("hug", "linear") if args.head == "both" else (args.head,)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    encoder = _encoder(args.checkpoint, args.preset, args.seed).to(device)
    if not args.finetune_encoder:
        feats = [extract_features_distributed(encoder, s, info, device=device, amp=args.amp,
                                              progress=args.progress and info.is_main)
                 for s in (train_set, val_set)]
        if info.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()  # the heads train in seconds on the gathered features: rank 0 alone
            if not info.is_main:
                return 0
    best: tuple | None = None  # (val_auroc, head checkpoint)
    for head in heads:
        for fraction in args.fractions:
            for seed in seeds:
                run = FinetuneArgs(**{**dataclass_values(args, RUN_FLAGS), **dataclass_values(args, FINETUNE_FLAGS),
                                      "head": head, "seed": seed, "label_fraction": fraction, "device": str(device)})
                name = f"{head}_f{fraction:g}_s{seed}"
                logger = common.JsonlLogger(out / f"{name}.jsonl") if info.is_main else None
                if args.finetune_encoder:
                    # Under torchrun every process trains (DDP) and rank 0 alone writes.
                    enc = _encoder(args.checkpoint, args.preset, args.seed).to(device)
                    model, result = finetune_end_to_end(enc, train_set, val_set, len(train_set.class_names), run,
                                                        logger, info)
                    if not info.is_main:
                        continue
                    head_module, enc_module, enc_file = model.head, model.encoder, None
                else:
                    head_module, result = train_head_on_features(*feats[0], *feats[1], run, logger)
                    # A frozen pretrained encoder stays in its own file; the head names it (relative path, digest).
                    enc_module, enc_file = encoder, args.checkpoint
                save_head(out / f"{name}.pt", head=head, fusion=args.fusion, head_state=head_module.state_dict(),
                          class_names=train_set.class_names, encoder_config=enc_module.cfg.to_dict(),
                          encoder_state=enc_module.state_dict(), encoder_file=enc_file, args=asdict(run),
                          result={k: v for k, v in result.items() if k != "history"})
                summary = {"head": head, "fraction": fraction, "seed": seed, "n_train": result["n_train"],
                           "best_epoch": result["best_epoch"], "val_auroc": result["val_auroc"],
                           "selection": result["selection"], "checkpoint": str(out / f"{name}.pt")}
                common.JsonlLogger(out / "results.jsonl").log(**summary)
                print(json_line(summary))
                score = result["val_auroc"]
                if best is None or (not math.isnan(score) and (math.isnan(best[0]) or score > best[0])):
                    best = (score, out / f"{name}.pt")
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():  # --finetune-encoder: every process trained; rank 0 wrote
            dist.destroy_process_group()
        if not info.is_main:
            return 0
    load_classifier(best[1]).save_pretrained(out / "pretrained", train_set.class_names,
                                             _preprocessing(train_set.meta))
    return 0


def cmd_evaluate(argv: Sequence[str]) -> int:
    args = evaluate_parser().parse_args(argv)
    _setup_threads(args)
    import torch

    from .data.cache import TokenDataset
    from .evaluation import evaluate_split, write_report
    from .train import common
    from .train.common import json_line

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = TokenDataset(args.cache, args.split)
    if len(dataset) == 0:
        raise ValueError(f"the {args.split!r} split of {args.cache} has no records")
    val_set = TokenDataset(args.cache, "val")
    for path in args.heads:
        model = _load_for_evaluation(path, dataset.class_names)
        report, predictions = evaluate_split(model, val_set, dataset, dataset.class_names, device, args.n_boot,
                                             args.seed)
        folder = (Path(args.report) / Path(path).stem if args.report else
                  Path(path) / f"report_{args.split}" if Path(path).is_dir() else
                  Path(path).with_name(f"{Path(path).stem}_{args.split}_report"))
        md = write_report(report, predictions, dataset.class_names, folder,
                          f"{Path(path).name} on the {args.split} split of {args.cache}",
                          {"checkpoint": path, "split": args.split})
        macro = report["macro"]
        result = {"checkpoint": path, "split": args.split, "auroc": macro["auroc"],
                  "classes_scored": int(sum(not math.isnan(r["auroc"]) for r in report["per_class"])),
                  "classes_excluded": int(sum(math.isnan(r["auroc"]) for r in report["per_class"])),
                  **{k: v for k, v in macro.items() if k != "auroc"}, "report": str(md)}
        if args.out:
            common.JsonlLogger(args.out).log(**result)
        print(json_line(result))
    return 0


def _load_for_evaluation(path: str, class_names):
    """A head checkpoint or a save_pretrained folder as a Classifier, refused when it predicts other classes."""
    from .checkpoint import CheckpointError, from_pretrained, load_classifier

    if not Path(path).is_dir():
        return load_classifier(path, class_names=class_names)
    model = from_pretrained(path, kind="classifier")
    if list(model.class_names) != list(class_names):
        raise CheckpointError(f"{path}: the classifier predicts classes {model.class_names}, but the data has "
                              f"classes {list(class_names)}")
    return model


def main(argv: Sequence[str] | None = None) -> int:
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
    from .ablate import main as cmd_ablate
    from .plot import main as cmd_plot
    from .predict import main as cmd_predict

    try:
        return {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "predict": cmd_predict,
                "plot": cmd_plot, "ablate": cmd_ablate}[command](rest)
    except (ValueError, FileNotFoundError) as exc:  # bad input or files (CheckpointError is a ValueError)
        print(f"clear-hug {command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
