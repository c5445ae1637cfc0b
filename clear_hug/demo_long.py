"""``clear-hug demo --long``: per-beat AF detection on long records, in a few minutes on 2 CPU cores.

long synthetic records (minutes, paroxysmal AF, runs of ectopic beats, labelled per beat) -> ragged token cache
with every beat -> CLEAR pretraining on variable-length batches under a token budget -> per-beat head (and HUG on
the lead summaries, beside it) on the frozen encoder, against the same heads on a random encoder -> per-beat
AUROC, AF episode sensitivity and precision, plots of a record's beat-level predictions over its annotations ->
the trained model on the real CPSC 2021 Holter excerpts against their ``(AFIB`` annotations (a sanity check:
18 excerpts are too few to train on; skipped with a message when the folder is absent).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cli_args import dataclass_flags
from .data.synthetic.long import BEAT_CLASSES
from .demo import LOCAL_RUN_FLAGS, LocalRun
from .report import add_readme_arguments, rewrite_from_results

if TYPE_CHECKING:  # for annotations only: these modules are imported inside the functions that use them
    from .heads import BeatHead
    from .model import CLEAR
    from .train.beats import BeatRecords

ENCODERS = {"clear": "CLEAR (pretrained)", "random": "no pretraining"}
AF = BEAT_CLASSES.index("AFIB")


@dataclass
class DemoLongArgs(LocalRun):
    """``clear-hug demo --long``'s settings (its flags are generated from these fields)."""

    out: str = "out/demo_long"
    n_records: int = 120
    min_minutes: float = 1.0
    max_minutes: float = 10.0
    preset: str = "small"
    epochs: int = 4  # pretraining
    max_tokens: int = 12 * 800  # padded tokens per pretraining batch
    lr: float = 1.5e-3
    head_epochs: int = 40
    seed: int = 0
    min_episode_beats: int = 5
    ecg_dir: str | None = None  # folder holding cpsc2021/; None: the shared ECG folder


DEMO_LONG_FLAGS = {
    "out": "output folder (cache, runs, PNGs, results.json)",
    "n_records": "long synthetic records (about 80%% train)", "min_minutes": "shortest record",
    "max_minutes": "longest record", "preset": "model size", "epochs": "pretraining epochs",
    "max_tokens": "padded tokens per pretraining batch", "lr": "pretraining peak lr", "head_epochs": "head epochs",
    "seed": "random seed (data, model, heads)",
    "min_episode_beats": "predicted AF runs shorter than this many beats are not counted as episodes",
    "ecg_dir": "folder holding cpsc2021/ (default: the shared ECG folder)", **LOCAL_RUN_FLAGS,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clear-hug demo --long", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    dataclass_flags(p, DemoLongArgs, DEMO_LONG_FLAGS)
    add_readme_arguments(p, "long-demo")
    return p


README_BLOCK = "demo_long_table"


def readme_text(result: dict) -> str:
    """The README block: the run's conditions, its table and the CPSC 2021 line, from results.json."""
    a, c, t = result["args"], result["cache"], result["timings"]
    lines = [f"{c['n_records']} records of {a['min_minutes']:g}-{a['max_minutes']:g} minutes "
             f"({c['beats_total']} beats, {c['beats_dropped']} dropped), `{a['preset']}` preset, {a['epochs']} "
             f"pretraining epochs under {a['max_tokens']} tokens per batch, {result['threads']} thread(s); "
             f"{t['total_s'] / 60:.1f} minutes in all (pretraining {t['pretrain_s'] / 60:.1f}):",
             "", "```", result["table"], "```"]
    cpsc = result["cpsc2021"]
    if "records" in cpsc:
        lines.append(f"CPSC 2021 ({len(cpsc['records'])} real two-lead excerpts, {cpsc['beats']} beats, "
                     f"{cpsc['af_beats']} in annotated AF): per-beat AF AUROC {cpsc['beat_auroc']:.3f}, record-level "
                     f"agreement (AF burden over 50%) {cpsc['record_agreement']:.2f}.")
    else:
        lines.append(f"CPSC 2021 check skipped: {cpsc['skipped']}")
    return "\n".join(lines)


def _tune_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold with the best F1 on validation beats (what a user would tune, never the test set)."""
    best, best_f1 = 0.5, -1.0
    for t in np.linspace(0.05, 0.95, 19):
        pred = scores >= t
        tp = float((pred & labels).sum())
        f1 = 2 * tp / max(float(pred.sum() + labels.sum()), 1.0)
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best


def _episodes(data: BeatRecords, scores: Sequence[np.ndarray], threshold: float, min_beats: int) -> dict:
    from .metrics import episode_scores

    total = {"true_episodes": 0, "detected": 0, "pred_episodes": 0, "correct": 0}
    for lab, sc, v in zip(data.beat_labels, scores, data.beat_valid):
        v = v.numpy()
        s = episode_scores(lab[:, AF].numpy()[v] > 0.5, sc[v, AF] >= threshold, min_beats)
        total = {k: total[k] + s[k] for k in total}
    total["sensitivity"] = total["detected"] / total["true_episodes"] if total["true_episodes"] else float("nan")
    total["precision"] = total["correct"] / total["pred_episodes"] if total["pred_episodes"] else float("nan")
    return total


def plot_record(data: BeatRecords, scores: dict[str, Sequence[np.ndarray]], index: int, record_id: str,
                path: Path) -> None:
    """Beat-level AF probability of one test record over time, for each encoder, over the annotated episodes."""
    import matplotlib.pyplot as plt

    lab = data.beat_labels[index].numpy()
    beats = np.arange(len(lab))
    fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
    for ax, k, name in ((axes[0], AF, "AF"), (axes[1], BEAT_CLASSES.index("ECTOPIC"), "ectopic run")):
        ax.fill_between(beats, 0, lab[:, k], step="mid", color="0.85", label=f"annotated {name}")
        for enc, label in ENCODERS.items():
            ax.plot(beats, scores[enc][index][:, k], lw=1, label=label)
        ax.set_ylabel(f"P({name})")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="upper right")
    axes[1].set_xlabel("beat")
    axes[0].set_title(f"per-beat predictions on test record {record_id} ({len(lab)} beats)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def cpsc_check(encoder: CLEAR, head: BeatHead, threshold: float, ecg_dir: str | None) -> dict:
    """The trained encoder and per-beat head on the CPSC 2021 excerpts (leads I and II; the other ten flagged
    missing), against the per-beat labels of their ``(AFIB`` episodes."""
    from .data.annotations import episode_labels, read_annotations
    from .data.readers import read_record, shared_ecg_dir
    from .data.tokenize import TARGET_FS, tokenize_beats
    from .heads import BeatHead
    from .metrics import macro_auroc

    folder = Path(ecg_dir) / "cpsc2021" if ecg_dir else shared_ecg_dir() / "cpsc2021"
    records = sorted(p.with_suffix("") for p in folder.glob("*.hea")) if folder.is_dir() else []
    if not records:
        return {"skipped": f"no CPSC 2021 records at {folder}"}
    rows, all_y, all_s, skipped = [], [], [], []
    for rec in records:
        signal, fs, meta = read_record(rec)
        try:
            bt = tokenize_beats(signal, fs, max_beats=None, missing_leads=meta["missing_leads"])
        except ValueError as exc:  # NoBeatsError: counted, named
            skipped.append({"record": rec.name, "reason": str(exc)})
            continue
        y = episode_labels(bt.rpeaks / TARGET_FS, read_annotations(rec).episodes, ["AFIB"])[:, 0]
        tokens, valid, time_ids = (torch.from_numpy(a)[None] for a in (bt.tokens, bt.valid, bt.time))
        grid, _ = encoder.forward_tokens(tokens, valid, time_ids)
        beat_valid = valid.any(1)
        s = torch.sigmoid(head(BeatHead.pool_leads(grid, valid), beat_valid))[0, :, AF].numpy()
        v = beat_valid[0].numpy()
        rows.append({"record": rec.name, "beats": int(v.sum()), "af_burden_annotated": float(y[v].mean()),
                     "af_burden_predicted": float((s[v] >= threshold).mean()), "mean_p_af": float(s[v].mean())})
        all_y.append(y[v])
        all_s.append(s[v])
    y, s = np.concatenate(all_y), np.concatenate(all_s)
    has_af = np.array([r["af_burden_annotated"] > 0.5 for r in rows])
    pred_af = np.array([r["af_burden_predicted"] > 0.5 for r in rows])
    return {"records": rows, "skipped": skipped, "beats": int(len(y)), "af_beats": int(y.sum()),
            "beat_auroc": macro_auroc(y[:, None], s[:, None])["auroc"],
            "record_agreement": float((has_af == pred_af).mean()), "threshold": threshold}


def format_table(results: dict, n_test: int, test_beats: int) -> str:
    lines = [f"test split: {n_test} records, {test_beats} beats",
             f"{'':28} | {'beat AUROC AF':>13} | {'beat AUROC ectopic':>18} | {'AF episode sens':>15} | "
             f"{'AF episode prec':>15} | {'HUG record AUROC':>16}"]
    lines.append("-" * len(lines[1]))
    for enc, name in ENCODERS.items():
        r = results[enc]
        ep = r["episodes"]
        lines.append(f"{name:28} | {r['beat_auroc_per_class'][0]:13.3f} | {r['beat_auroc_per_class'][1]:18.3f} | "
                     f"{ep['sensitivity']:8.3f} ({ep['detected']}/{ep['true_episodes']}) | "
                     f"{ep['precision']:8.3f} ({ep['correct']}/{ep['pred_episodes']}) | {r['hug_test_auroc']:16.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.readme_from:
        rewrite_from_results(args, README_BLOCK, readme_text, "clear-hug demo --long")
        return 0
    from .checkpoint import load_encoder
    from .config import get_config
    from .data.cache import TokenDataset, build_cache, long_synthetic_source
    from .metrics import macro_auroc
    from .model import CLEAR
    from .train import common
    from .train.beats import BeatHeadArgs, extract_beat_features, predict_beats, train_beat_head
    from .train.finetune import FinetuneArgs, train_head_on_features
    from .train.pretrain import PretrainArgs, pretrain

    args.threads = args.threads or common.idle_threads(2)
    common.setup_cpu_process(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, t_all = {}, time.perf_counter()
    progress = args.progress

    # 1. data: every beat of every record (no cap), labelled per beat by the generator's episodes
    t0 = time.perf_counter()
    source = long_synthetic_source(args.n_records, seed=args.seed, min_minutes=args.min_minutes,
                                   max_minutes=args.max_minutes)
    meta = build_cache(source, out / "cache", max_beats=None, workers=args.threads, shard_size=16,
                       progress=progress)
    splits = {s: TokenDataset(out / "cache", s) for s in ("train", "val", "test")}
    if any(len(d) == 0 for d in splits.values()):
        raise SystemExit(f"--n-records {args.n_records} leaves a split empty; use more records")
    timings["prepare_s"] = time.perf_counter() - t0
    print(f"{meta['n_records']} records, {meta['beats_total']} beats ({meta['beats_per_item']} per record), "
          f"{meta['beats_dropped']} dropped; splits {meta['split_counts']}")

    # 2. pretraining on variable-length batches
    t0 = time.perf_counter()
    cfg = get_config(args.preset)
    run = PretrainArgs(epochs=args.epochs, max_tokens=args.max_tokens, lr=args.lr, warmup_epochs=0.5,
                       out_dir=str(out / "pretrain"), resume=False, progress=progress, device="cpu", seed=args.seed)
    history = pretrain(cfg, splits["train"], run, splits["val"])
    clear = load_encoder(out / "pretrain" / "last.pt")
    timings["pretrain_s"] = time.perf_counter() - t0
    print(f"pretrained {args.preset} CLEAR for {args.epochs} epochs in {timings['pretrain_s']:.0f}s: val loss "
          f"{history['epochs'][0].get('val_loss', float('nan')):.3f} -> "
          f"{history['epochs'][-1].get('val_loss', float('nan')):.3f}")

    # 3. per-beat heads (and HUG on the summaries) on the frozen encoders
    t0 = time.perf_counter()
    common.seed_everything(12345)
    encoders = {"clear": clear, "random": CLEAR(cfg)}
    results, heads, test_scores, feats = {}, {}, {}, {}
    for enc, model in encoders.items():
        f = {s: extract_beat_features(model, d, max_tokens=args.max_tokens, progress=progress)
             for s, d in splits.items()}
        feats[enc] = f
        head, fit = train_beat_head(f["train"], f["val"], BeatHeadArgs(epochs=args.head_epochs, seed=args.seed))
        val_scores = predict_beats(head, f["val"])
        val_y = np.concatenate([lab[v, AF].numpy() > 0.5 for lab, v in zip(f["val"].beat_labels, f["val"].beat_valid)])
        val_s = np.concatenate([s[v.numpy(), AF] for s, v in zip(val_scores, f["val"].beat_valid)])
        threshold = _tune_threshold(val_y, val_s)
        scores = predict_beats(head, f["test"])
        y = np.concatenate([lab[v].numpy() for lab, v in zip(f["test"].beat_labels, f["test"].beat_valid)])
        s = np.concatenate([sc[v.numpy()] for sc, v in zip(scores, f["test"].beat_valid)])
        per_class = [macro_auroc(y[:, [k]], s[:, [k]])["auroc"] for k in range(len(BEAT_CLASSES))]
        hug, _ = train_head_on_features(f["train"].summary, f["train"].labels, f["val"].summary, f["val"].labels,
                                        FinetuneArgs(head="hug", epochs=args.head_epochs, lr=5e-3, seed=args.seed,
                                                     warmup_epochs=2, progress=False))
        with torch.no_grad():
            hug.eval()
            rec_scores = torch.sigmoid(hug(f["test"].summary)).numpy()
        results[enc] = {"beat_auroc_per_class": per_class, "threshold_af": threshold,
                        "episodes": _episodes(f["test"], scores, threshold, args.min_episode_beats),
                        "head_best_epoch": fit["best_epoch"], "head_val_auroc": fit["val_auroc"],
                        "hug_test_auroc": macro_auroc(f["test"].labels.numpy(), rec_scores)["auroc"]}
        heads[enc], test_scores[enc] = head, scores
    timings["heads_s"] = time.perf_counter() - t0
    table = format_table(results, len(splits["test"]), int(splits["test"].lengths.sum()))
    print(table)

    # 4. plots: the test record with the most annotated AF beats (an episode boundary is most telling)
    from .demo import plot_losses

    test_f = feats["clear"]["test"]
    pick = int(np.argmax([float(lab[:, AF].sum()) + 0.01 * len(lab) for lab in test_f.beat_labels]))
    plot_record(test_f, test_scores, pick, splits["test"].record_id(pick), out / "beat_predictions.png")
    plot_losses(history, out / "pretrain_loss.png")

    # 5. the real CPSC 2021 excerpts
    t0 = time.perf_counter()
    cpsc = cpsc_check(clear, heads["clear"], results["clear"]["threshold_af"], args.ecg_dir)
    timings["cpsc_s"] = time.perf_counter() - t0
    if "records" in cpsc:
        print(f"CPSC 2021 (real, {len(cpsc['records'])} excerpts, {cpsc['beats']} beats, {cpsc['af_beats']} in "
              f"annotated AF): per-beat AF AUROC {cpsc['beat_auroc']:.3f}, record-level agreement (AF burden > 50%) "
              f"{cpsc['record_agreement']:.2f}; {len(cpsc['skipped'])} records skipped")
    else:
        print(f"CPSC 2021 check skipped: {cpsc['skipped']}")
    timings["total_s"] = time.perf_counter() - t_all
    result = {"args": vars(args), "config": cfg.to_dict(), "cache": {k: meta[k] for k in (
        "n_records", "beats_total", "beats_per_item", "beats_dropped", "split_counts", "class_counts")},
        "results": results, "pretrain_epochs": history["epochs"], "cpsc2021": cpsc, "timings": timings,
        "threads": args.threads, "table": table}
    (out / "results.json").write_text(json.dumps(common.json_safe(result), indent=1, allow_nan=False))
    print(f"wrote {out}/results.json, beat_predictions.png and pretrain_loss.png in {timings['total_s']:.0f}s "
          f"(prepare {timings['prepare_s']:.0f}s, pretrain {timings['pretrain_s']:.0f}s, heads "
          f"{timings['heads_s']:.0f}s, CPSC {timings['cpsc_s']:.0f}s)")
    return 0
