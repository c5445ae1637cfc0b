"""``clear-hug prepare``: tokenise a source (synthetic, PTB-XL folder, CinC folder) into a token cache."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .cache import PathSource, Source, build_cache, synthetic_source
from .readers import PTBXL_TASKS, CinCFolderDataset, PTBXLDataset
from .snomed import LABEL_SETS


def make_source(args: argparse.Namespace) -> Source:
    if args.source == "synthetic" and args.split_file:
        raise ValueError("--split-file is for real sources (ptbxl, cinc); the synthetic records carry their splits")
    if args.source == "synthetic":
        return synthetic_source(args.n_records or 1000, seed=args.seed, use_true_rpeaks=args.true_rpeaks)
    if not args.root:
        raise SystemExit(f"--root is required for --source {args.source}")
    if args.source == "ptbxl":
        index = PTBXLDataset(args.root, sampling_rate=args.sampling_rate, task=args.task)
        info = {"root": os.path.abspath(args.root), "task": args.task, "sampling_rate": args.sampling_rate}
    else:
        index = CinCFolderDataset(args.root, label_set=args.labels)
        info = {"root": os.path.abspath(args.root), "labels": args.labels}
    if args.split_file:
        index.use_split_file(args.split_file)
        info["split_file"] = os.path.abspath(args.split_file)
    if args.source == "ptbxl":
        return PathSource(index, "ptbxl", info, limit=args.n_records)
    return PathSource(index, "cinc", info, limit=args.n_records, annotations=args.annotations,
                      beat_class_names=args.beat_classes or ())


def max_beats_arg(text: str) -> int | None:
    """``--max-beats``: a positive int, or ``all`` for every beat of the record."""
    if text.lower() in ("all", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-beats must be a positive int or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-beats must be a positive int or 'all', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clear-hug prepare", description=__doc__)
    p.add_argument("--source", choices=("synthetic", "ptbxl", "cinc"), default="synthetic")
    p.add_argument("--root", help="dataset folder (ptbxl: holds ptbxl_database.csv; cinc: .hea/.mat records)")
    p.add_argument("--out", required=True, help="cache folder to create or resume")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--max-beats", type=max_beats_arg, default=15,
                   help="beats kept per record or window (15 for 10 s strips; 'all' keeps every beat); beats "
                        "beyond it are counted and reported")
    p.add_argument("--window", type=float, default=None, help="cut records into windows of this many seconds")
    p.add_argument("--stride", type=float, default=None, help="seconds between window starts (default: --window)")
    p.add_argument("--annotations", default=None,
                   help="cinc: WFDB annotation extension (e.g. atr) whose rhythm episodes label the beats")
    p.add_argument("--beat-classes", nargs="+", default=None,
                   help="with --annotations: rhythm names that become per-beat labels (e.g. AFIB N)")
    p.add_argument("--n-records", type=int, default=None,
                   help="synthetic: how many to generate (default 1000); real sources: use only the first N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=PTBXL_TASKS, default="superdiagnostic")
    p.add_argument("--labels", choices=LABEL_SETS, default="all",
                   help="cinc: a class per SNOMED code ('all'), or the CinC 2021 scored classes with equivalent "
                        "codes merged ('cinc2021'; evaluate then reports the challenge score)")
    p.add_argument("--split-file", default=None,
                   help="real sources: a CSV with columns record,split (train/val/test), e.g. a published split")
    p.add_argument("--sampling-rate", type=int, choices=(100, 500), default=100, help="PTB-XL records100 or 500")
    p.add_argument("--bandpass", action="store_true", help="0.67-40 Hz zero-phase band-pass before tokenising")
    p.add_argument("--true-rpeaks", action="store_true", help="synthetic: use the generator's R-peaks")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="rebuild even if the folder holds another cache")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        source = make_source(args)
        meta = build_cache(source, args.out, max_beats=args.max_beats, bandpass=args.bandpass,
                           workers=args.workers, shard_size=args.shard_size, overwrite=args.overwrite,
                           progress=not args.no_progress, window_s=args.window, stride_s=args.stride)
    except (FileNotFoundError, ValueError) as exc:  # no records, none readable, a folder of another format
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    print(f"prepared {meta['n_records']} of {meta['n_total']} records from {meta['source']} into {args.out}; "
          f"skipped {meta['n_skipped']} {meta['skipped_by_kind'] or ''}; splits {meta['split_counts']}; "
          f"{len(meta['class_names'])} classes")
    print(f"{meta['beats_total']} beats tokenised (per item: {meta['beats_per_item']}); "
          f"{meta['beats_dropped']} beats dropped by --max-beats {meta['max_beats']} in {meta['items_capped']} items"
          + (f"; {meta['windows_without_beats']} windows without beats left out" if meta['window_s'] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
