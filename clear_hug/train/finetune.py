"""Downstream training of HUG or the linear probe on a (frozen by default) CLEAR encoder."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..data.cache import pad_collate
from ..heads import FUSIONS, Classifier, build_head
from ..metrics import macro_auroc
from ..model import CLEAR
from . import common
from .pretrain import batch_inputs

log = logging.getLogger(__name__)


@dataclass
class FinetuneArgs(common.RunSettings):
    # The paper's downstream recipe (AdamW, warm-up then cosine decay, BCE on multi-hot labels). Seed, device, amp,
    # progress and threads: common.RunSettings.
    head: str = "hug"
    fusion: str = field(default="mean", metadata={"choices": FUSIONS})
    epochs: int = 100
    batch_size: int = 256
    lr: float = 5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 10
    min_lr: float = 1e-5
    clip: float = 3.0
    label_fraction: float = 1.0
    encoder_lr: float | None = None  # fine-tuning only; defaults to lr / 10


@dataclass
class FinetuneSweep:
    """What ``clear-hug finetune`` trains besides one run's recipe: a ``FinetuneArgs`` run for every head x label
    fraction x seed, on a pretrained encoder (or a random one of ``config.ModelChoice.preset``)."""

    checkpoint: str | None = None  # pretraining checkpoint (last.pt); None: a random encoder
    head: str = field(default="hug", metadata={"choices": ("hug", "linear", "both")})
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] | None = None  # None: the run's seed (RunSettings.seed)
    finetune_encoder: bool = False  # train the encoder too (end to end) instead of heads on frozen features


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a ``fraction`` of the records (at least one), fixed by ``seed``.

    Stratified-ish: first one random positive of each class that has one (rarest class first), so that tiny
    fractions still see every class where possible, then random records up to the target size.
    """
    n = len(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    target = max(1, int(round(fraction * n)))
    if target >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    positive = np.asarray(labels) > 0.5
    chosen: list[int] = []
    for c in np.argsort(positive.sum(0), kind="stable"):
        if len(chosen) >= target:
            break
        if positive[chosen, c].any() if chosen else False:
            continue
        candidates = np.flatnonzero(positive[:, c])
        if len(candidates):
            chosen.append(int(rng.choice(candidates)))
    rest = np.setdiff1d(np.arange(n), chosen)
    chosen += rng.choice(rest, size=target - len(chosen), replace=False).tolist()
    return np.sort(np.asarray(chosen[:target], dtype=np.int64))


@torch.no_grad()
def extract_features(encoder: CLEAR, dataset: Dataset, batch_size: int = 128,
                     device: str | torch.device | None = None, amp: bool | None = None,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's 12 summary outputs for every record (``[N, 12, E]`` float32) and the labels ``[N, C]``.

    With a frozen encoder this runs once, and heads then train on features in memory in seconds.
    """
    device = torch.device(device or next(encoder.parameters()).device)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    # pad_collate: records of a ragged (long-record) cache have different beat counts.
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size, collate_fn=pad_collate), desc="features",
                      disable=not progress, leave=False):
        tokens, valid, time_ids = batch_inputs(batch, device)
        with common.autocast(device, amp):
            feats.append(encoder.forward_features(tokens, valid, time_ids).float().cpu())
        labels.append(batch["labels"].float())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def extract_features_distributed(encoder: CLEAR, dataset: Dataset, info: common.DistInfo,
                                 **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features`` under torchrun: rank r encodes records r, r + W, r + 2W, ... and every rank receives
    all records' features in dataset order (tensors gathered, so nothing is pickled). One process: the same as
    ``extract_features``."""
    if not info.distributed:
        return extract_features(encoder, dataset, **kwargs)
    import torch.distributed as dist

    n, world = len(dataset), info.world_size
    mine = list(range(info.rank, n, world))
    feats, labels = extract_features(encoder, Subset(dataset, mine), **kwargs)
    rows = -(-n // world)  # ranks hold ceil or floor of n / world records: pad to the larger
    pad = lambda t: torch.cat([t, t.new_zeros((rows - len(t),) + t.shape[1:])])  # noqa: E731
    comm = info.device if info.device.type == "cuda" else torch.device("cpu")  # NCCL gathers on the GPU
    gathered = []
    for t in (feats, labels):
        parts = [torch.empty((rows,) + t.shape[1:], dtype=t.dtype, device=comm) for _ in range(world)]
        dist.all_gather(parts, pad(t).to(comm))
        # Record i sits on rank i % world at row i // world.
        gathered.append(torch.stack(parts, 1).reshape((rows * world,) + t.shape[1:])[:n].cpu())
    return gathered[0], gathered[1]


@torch.no_grad()
def predict(module: torch.nn.Module, batches: Iterable,
            device: str | torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and labels over ``(inputs, labels)`` batches."""
    module.eval()
    scores, labels = [], []
    for inputs, y in batches:
        scores.append(torch.sigmoid(module(*[x.to(device) for x in inputs]).float()).cpu())
        labels.append(y)
    module.train()
    if not scores:
        raise ValueError("no records to score")
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def _feature_batches(feats, labels, batch_size, shuffle=False, generator=None):
    order = torch.randperm(len(feats), generator=generator) if shuffle else torch.arange(len(feats))
    for i in range(0, len(feats), batch_size):
        idx = order[i:i + batch_size]
        yield (feats[idx],), labels[idx]


def _record_batches(dataset, batch_size, shuffle=False, generator=None):
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                            collate_fn=pad_collate):
        yield (batch["tokens"].float(), batch["valid"].bool(), batch["time"].long()), batch["labels"].float()


def fit(module: torch.nn.Module, train: Callable[[torch.Generator], Iterable], val: Callable[[], Iterable],
        args: FinetuneArgs, n_train: int, device: str | torch.device, param_groups: list | None = None,
        logger: common.JsonlLogger | None = None) -> dict:
    """Train ``module`` with BCE; keep the weights with the best validation macro AUROC (checked every epoch).

    ``train(generator)`` and ``val()`` return iterables of ``(inputs, labels)`` batches. When the validation
    split cannot be scored (no class has both a positive and a negative record there), no epoch can be chosen
    on it: the last epoch's weights are kept, ``selection`` says ``"last_epoch"`` (else ``"best_val_auroc"``),
    ``val_auroc`` is NaN and a warning is logged.
    """
    if args.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {args.epochs}")
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(param_groups or module.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, -(-n_train // args.batch_size))
    scheduler = common.warmup_cosine(optimizer, round(args.warmup_epochs * steps_per_epoch),
                                     args.epochs * steps_per_epoch, args.min_lr)
    best = None
    history = []
    module.train()
    for epoch in tqdm(range(args.epochs), desc=f"{args.head} {args.label_fraction:g}", disable=not args.progress,
                      leave=False):
        t0, losses = time.perf_counter(), []
        for inputs, y in train(gen):
            with common.autocast(torch.device(device), args.amp):
                logits = module(*[x.to(device) for x in inputs])
            loss = F.binary_cross_entropy_with_logits(logits.float(), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        scores, y_val = predict(module, val(), device)
        score = macro_auroc(y_val, scores)["auroc"]
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_auroc": score,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if logger is not None:
            logger.log(**record)
        if not math.isnan(score) and (best is None or score > best["val_auroc"]):
            best = {"val_auroc": score, "epoch": epoch, "state": copy.deepcopy(module.state_dict())}
    if best is None:
        log.warning("the validation split has no class with both positive and negative records, so no epoch "
                    "can be selected on it: keeping the last epoch's weights")
        return {"best_epoch": args.epochs - 1, "val_auroc": float("nan"), "selection": "last_epoch",
                "history": history}
    module.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "val_auroc": float(best["val_auroc"]), "selection": "best_val_auroc",
            "history": history}


def _require_records(**sizes: int) -> None:
    for name, n in sizes.items():
        if n == 0:
            raise ValueError(f"{name} holds no records")


def train_head_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                           val_labels: torch.Tensor, args: FinetuneArgs,
                           logger: common.JsonlLogger | None = None) -> tuple[torch.nn.Module, dict]:
    """Frozen-encoder path: a head trained on precomputed summary features of a label subset."""
    _require_records(train=len(train_feats), val=len(val_feats))
    common.seed_everything(args.seed)
    idx = torch.as_tensor(label_subset(train_labels.numpy(), args.label_fraction, args.seed))
    x, y = train_feats[idx], train_labels[idx]
    head = build_head(args.head, train_feats.shape[-1], train_labels.shape[-1], args.fusion)
    result = fit(head, lambda g: _feature_batches(x, y, args.batch_size, True, g),
                 lambda: _feature_batches(val_feats, val_labels, 1024), args, len(idx), "cpu", logger=logger)
    result["n_train"] = int(len(idx))
    return head, result


def finetune_end_to_end(encoder: CLEAR, train_set: Dataset, val_set: Dataset, num_classes: int,
                        args: FinetuneArgs, logger: common.JsonlLogger | None = None,
                        info: common.DistInfo | None = None) -> tuple[Classifier, dict]:
    """Fine-tuning path: encoder and head train together, the encoder at a lower lr.

    Under torchrun (``info.distributed``) the model is wrapped in DistributedDataParallel and each process trains
    on its shard of the label subset (``DistributedSampler``, reshuffled per epoch); every process scores the
    whole validation split with the same weights, so all of them keep the same epoch.
    """
    _require_records(train_set=len(train_set), val_set=len(val_set))
    common.seed_everything(args.seed)
    device = info.device if info is not None else torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labels = np.stack([train_set[i]["labels"] for i in range(len(train_set))])
    idx = label_subset(labels, args.label_fraction, args.seed)
    subset = Subset(train_set, idx.tolist())
    model = Classifier(encoder, build_head(args.head, encoder.cfg.enc_dim, num_classes, args.fusion)).to(device)
    groups = [{"params": model.head.parameters()},
              {"params": model.encoder.parameters(), "lr": args.encoder_lr or args.lr / 10}]
    module, train, n_per_process = model, (lambda g: _record_batches(subset, args.batch_size, True, g)), len(idx)
    if info is not None and info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.utils.data import DistributedSampler

        # The CLEAR module's decoder is unused downstream: DDP must not wait for its gradients.
        module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                     find_unused_parameters=True)
        sampler = DistributedSampler(subset, info.world_size, info.rank, shuffle=True, seed=args.seed)
        epochs = iter(range(args.epochs))

        def train(_generator):
            sampler.set_epoch(next(epochs))
            for batch in DataLoader(subset, batch_size=args.batch_size, sampler=sampler, collate_fn=pad_collate):
                yield (batch["tokens"].float(), batch["valid"].bool(), batch["time"].long()), batch["labels"].float()

        n_per_process = len(sampler)
    result = fit(module, train, lambda: _record_batches(val_set, 256), args, n_per_process, device, groups, logger)
    result["n_train"] = int(len(idx))
    return model, result


def evaluate(module: torch.nn.Module, feats_or_set: torch.Tensor | Dataset,
             labels: torch.Tensor | None = None, device: str | torch.device = "cpu") -> dict:
    """Test macro AUROC of a head on features (``labels`` given) or of a Classifier on a dataset."""
    batches = (_feature_batches(feats_or_set, labels, 1024) if labels is not None
               else _record_batches(feats_or_set, 256))
    scores, y = predict(module.to(device), batches, device)
    return macro_auroc(y, scores)
