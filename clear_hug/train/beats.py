"""Per-beat labels on a frozen CLEAR encoder: features of every beat of records of any length, a ``BeatHead``
trained on them with BCE over the valid beats, and per-beat scores.

Features are the encoder's token outputs averaged over leads (``BeatHead.pool_leads``), ``[n_beats, E]`` per
record, so a 10-minute record costs 800 x E floats rather than 12 x 800 x E. Records are batched by length under
a beat budget (``LengthBucketSampler``), so nothing is L x L and memory is linear in beats.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data.cache import pad_collate
from ..data.sampler import LengthBucketSampler
from ..heads import BeatHead
from ..metrics import macro_auroc
from ..model import CLEAR
from . import common
from .pretrain import batch_inputs


@dataclass
class BeatRecords:
    """Per-record features and labels (lists, one entry per record, records of any length)."""

    feats: list[torch.Tensor]  # [n_i, E] float32
    beat_valid: list[torch.Tensor]  # [n_i] bool: the beat has a valid token in some lead
    beat_labels: list[torch.Tensor]  # [n_i, K] float32
    summary: torch.Tensor  # [N, leads, E]: the lead summaries, for HUG beside the per-beat head
    labels: torch.Tensor  # [N, C]


@dataclass
class BeatHeadArgs:
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 0.05
    max_beats_per_batch: int = 4000
    context: int = 25  # beats each beat sees in the head: AF is irregularity over many beats
    seed: int = 0
    progress: bool = False


def _lengths(dataset: Dataset) -> np.ndarray:
    lengths = getattr(dataset, "lengths", None)
    if lengths is None:
        lengths = np.array([int(dataset[i]["tokens"].shape[1]) for i in range(len(dataset))])
    return np.asarray(lengths, dtype=np.int64)


@torch.no_grad()
def extract_beat_features(encoder: CLEAR, dataset: Dataset, max_tokens: int = 24_000,
                          device: str | torch.device | None = None,
                          progress: bool = False) -> BeatRecords:
    """Run the frozen encoder on every record (batched by length under ``max_tokens``) in dataset order."""
    if len(dataset) == 0:
        raise ValueError("extract_beat_features: the dataset is empty")
    device = torch.device(device or next(encoder.parameters()).device)
    was_training = encoder.training
    encoder.eval()
    sampler = LengthBucketSampler(_lengths(dataset), max_tokens, shuffle=False)
    n = len(dataset)
    feats: list = [None] * n
    valid_l: list = [None] * n
    beat_l: list = [None] * n
    summary: list = [None] * n
    labels: list = [None] * n
    for idx in tqdm(list(sampler), desc="beat features", disable=not progress, leave=False):
        items = [dataset[i] for i in idx]
        batch = pad_collate(items)
        tokens, valid, time_ids = batch_inputs(batch, device)
        grid, summ = encoder.forward_tokens(tokens, valid, time_ids)
        pooled = BeatHead.pool_leads(grid.float(), valid).cpu()
        beat_valid = valid.any(1).cpu()
        for row, i in enumerate(idx):
            n_i = int(items[row]["tokens"].shape[1])
            feats[i], valid_l[i] = pooled[row, :n_i].clone(), beat_valid[row, :n_i].clone()
            beat_l[i] = batch["beat_labels"][row, :n_i].float().clone()
            summary[i], labels[i] = summ[row].float().cpu(), batch["labels"][row].float()
    encoder.train(was_training)
    return BeatRecords(feats, valid_l, beat_l, torch.stack(summary), torch.stack(labels))


def _pad(rows: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def _batches(data: BeatRecords, budget: int, shuffle: bool, seed: int,
             epoch: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    lengths = np.array([len(f) for f in data.feats])
    sampler = LengthBucketSampler(lengths, budget, tokens_per_beat=1, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    for idx in sampler:
        yield (idx, _pad([data.feats[i] for i in idx]), _pad([data.beat_valid[i] for i in idx], False),
               _pad([data.beat_labels[i] for i in idx]))


@torch.no_grad()
def predict_beats(head: BeatHead, data: BeatRecords, budget: int = 20_000) -> list[np.ndarray]:
    """Per-beat probabilities ``[n_i, K]`` for every record, in order."""
    head.eval()
    out: list = [None] * len(data.feats)
    for idx, x, v, _ in _batches(data, budget, False, 0, 0):
        p = torch.sigmoid(head(x, v)).numpy()
        for row, i in enumerate(idx):
            out[i] = p[row, : len(data.feats[i])]
    head.train()
    return out


def beat_auroc(data: BeatRecords, scores: list[np.ndarray]) -> dict:
    """Macro AUROC over all valid beats of all records (each class scored where it has both label values)."""
    y = np.concatenate([lab[v].numpy() for lab, v in zip(data.beat_labels, data.beat_valid)])
    s = np.concatenate([sc[v.numpy()] for sc, v in zip(scores, data.beat_valid)])
    return macro_auroc(y, s)


def train_beat_head(train: BeatRecords, val: BeatRecords, args: BeatHeadArgs,
                    logger: common.JsonlLogger | None = None) -> tuple[BeatHead, dict]:
    """Train a ``BeatHead`` with BCE over the valid beats; keep the epoch with the best validation AUROC."""
    if not train.feats or not val.feats:
        raise ValueError("train_beat_head needs records in both the training and the validation set")
    common.seed_everything(args.seed)
    k = train.beat_labels[0].shape[-1]
    if k == 0:
        raise ValueError("the records carry no per-beat labels (build the cache with beat_class_names)")
    head = BeatHead(train.feats[0].shape[-1], k, context=args.context)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best = {"val_auroc": -np.inf, "epoch": -1, "state": copy.deepcopy(head.state_dict())}
    history = []
    for epoch in tqdm(range(args.epochs), desc="beat head", disable=not args.progress, leave=False):
        losses = []
        for _, x, v, y in _batches(train, args.max_beats_per_batch, True, args.seed, epoch):
            logits = head(x, v)
            loss = F.binary_cross_entropy_with_logits(logits[v], y[v])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        score = beat_auroc(val, predict_beats(head, val))["auroc"]
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_beat_auroc": score}
        history.append(record)
        if logger is not None:
            logger.log(**record)
        if score > best["val_auroc"]:
            best = {"val_auroc": score, "epoch": epoch, "state": copy.deepcopy(head.state_dict())}
    head.load_state_dict(best["state"])
    return head, {"best_epoch": best["epoch"], "val_auroc": float(best["val_auroc"]), "history": history}
