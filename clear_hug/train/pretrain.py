"""Masked-reconstruction pretraining of CLEAR, single process or under torchrun."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from .. import checkpoint
from ..config import CLEARConfig
from ..data.cache import pad_collate
from ..data.sampler import LengthBucketSampler
from ..masking import random_mask
from ..model import CLEAR
from . import common

log = logging.getLogger(__name__)


@dataclass
class PretrainArgs(common.RunSettings):
    # The paper's pretraining recipe (AdamW, warm-up then cosine decay); batch size per process. Seed, device, amp,
    # progress and threads: common.RunSettings.
    epochs: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.05
    warmup_epochs: float = 5
    min_lr: float = 1e-5
    clip: float = 3.0
    out_dir: str | None = None
    resume: bool = True  # continue from out_dir/last.pt when it exists
    stop_after_epochs: int | None = None  # end this run early (tests, preemptible jobs); schedule unchanged
    # Resuming with another ``epochs`` changes the learning-rate schedule of the steps still to come, so it is
    # refused unless asked for: then the cosine decay is stretched to the new end from the current step on.
    extend_schedule: bool = False
    # Variable-length batches: records of similar length grouped under this many (padded) tokens per batch,
    # instead of batch_size records (needs a dataset with ``lengths``, like TokenDataset).
    max_tokens: int | None = None


def batch_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dataset items hold the lead-major grid: tokens [12, beats, 96], valid [12, beats], time [12, beats]."""
    return (batch["tokens"].to(device, torch.float32, non_blocking=True),
            batch["valid"].to(device, torch.bool, non_blocking=True),
            batch["time"].to(device, torch.int64, non_blocking=True))


def loader(dataset: Dataset, batch_size: int, info: common.DistInfo, shuffle: bool, seed: int,
           max_tokens: int | None = None) -> tuple[DataLoader, DistributedSampler | LengthBucketSampler]:
    # One DistributedSampler (or length-bucketing sampler) for every world size (1 included): the data order is a
    # pure function of (seed, epoch, rank), which makes resuming exact and multi-process sharding free.
    if max_tokens is not None:
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise ValueError("max_tokens needs a dataset with per-item beat counts (lengths), like TokenDataset")
        sampler = LengthBucketSampler(lengths, max_tokens, shuffle=shuffle, seed=seed,
                                      num_replicas=info.world_size, rank=info.rank)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate, num_workers=0), sampler
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle,
                                 seed=seed, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=pad_collate,
                      num_workers=0), sampler


@torch.no_grad()
def validation_loss(model: CLEAR, dataset: Dataset, batch_size: int, info: common.DistInfo, seed: int,
                    amp: bool | None, max_tokens: int | None = None) -> float:
    """Masked-reconstruction loss on a fixed set of masks (the same every epoch, so epochs compare)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 7919 + info.rank)
    dl, _ = loader(dataset, batch_size, info, shuffle=False, seed=seed, max_tokens=max_tokens)
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    for batch in dl:
        tokens, valid, time_ids = batch_inputs(batch, info.device)
        mask = random_mask(valid, model.cfg.mask_ratio, gen)
        with common.autocast(info.device, amp):
            out = model(tokens, valid, time_ids, mask)
        n = out.mask.sum()
        total += torch.stack([out.loss.double() * n, n.double()])
    if info.distributed:
        torch.distributed.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def _check_schedule(saved: dict, now: dict, extend: bool, path: Path) -> None:
    """Refuse to resume on a schedule other than the checkpoint's (only ``epochs`` may change, with ``extend``)."""
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if not changed or (extend and changed == ["epochs"]):
        return
    what = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in changed)
    hint = (" (only epochs can change on resume)" if extend else
            "; to continue with another number of epochs pass extend_schedule=True (--extend-schedule), "
            "to start over pass resume=False (--no-resume) or another out_dir")
    raise ValueError(f"{path} was trained on another learning-rate schedule ({what}){hint}")


def pretrain(cfg: CLEARConfig, train_set: Dataset, args: PretrainArgs, val_set: Dataset | None = None,
             info: common.DistInfo | None = None) -> dict:
    """Train CLEAR; returns the history ``{"epochs": [...], "steps": [...]}`` and leaves ``last.pt`` in out_dir.

    The checkpoint holds model, optimizer, scheduler, the RNG states and the masking generator, and the data
    order is a function of the epoch, so a resumed run on the CPU repeats the uninterrupted run's losses exactly.
    """
    if len(train_set) == 0:
        raise ValueError("train_set is empty")
    if val_set is not None and len(val_set) == 0:
        raise ValueError("val_set is empty; pass val_set=None to train without a validation loss")
    info = info or common.setup_distributed(args.device)
    common.seed_everything(args.seed)  # same initial weights on every rank
    model = CLEAR(cfg).to(info.device)
    optimizer = common.make_optimizer(model.parameters(), args.lr, args.weight_decay, tuple(args.betas))
    dl, sampler = loader(train_set, args.batch_size, info, shuffle=True, seed=args.seed, max_tokens=args.max_tokens)
    steps_per_epoch = len(dl)
    schedule = {"epochs": args.epochs, "steps_per_epoch": steps_per_epoch,
                "warmup_steps": round(args.warmup_epochs * steps_per_epoch), "lr": args.lr, "min_lr": args.min_lr}
    scheduler = common.warmup_cosine(optimizer, schedule["warmup_steps"], args.epochs * steps_per_epoch,
                                     args.min_lr)
    # Masks are drawn per rank from their own generator, so ranks mask different tokens of different records.
    mask_gen = torch.Generator().manual_seed(args.seed * 1000 + info.rank)
    history = {"epochs": [], "steps": []}
    start_epoch = 0
    out_dir = Path(args.out_dir) if args.out_dir else None
    ckpt_path = out_dir / "last.pt" if out_dir else None
    if args.resume and ckpt_path is not None and ckpt_path.exists():
        state = checkpoint.load_checkpoint(ckpt_path, "pretrain")
        _check_schedule(state["schedule"], schedule, args.extend_schedule, ckpt_path)
        if state["schedule"]["epochs"] != args.epochs and info.is_main:
            log.warning("%s: schedule extended from %d to %d epochs at epoch %d", ckpt_path,
                        state["schedule"]["epochs"], args.epochs, state["epoch"] + 1)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        mask_gen.set_state(state["mask_generator"][info.rank] if info.rank < len(state["mask_generator"])
                           else mask_gen.get_state())
        checkpoint.set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"] + 1
    ddp = DDP(model) if info.distributed else model
    logger = common.JsonlLogger(out_dir / "metrics.jsonl" if out_dir else None, info.is_main)
    if info.is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    last_epoch = (args.epochs if args.stop_after_epochs is None
                  else min(args.epochs, start_epoch + args.stop_after_epochs))
    model.train()
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        bar = tqdm(dl, desc=f"pretrain {epoch + 1}/{args.epochs}", disable=not (args.progress and info.is_main),
                   leave=False, dynamic_ncols=True)
        epoch_loss, epoch_tokens, t0 = 0.0, 0, time.perf_counter()
        for batch in bar:
            tokens, valid, time_ids = batch_inputs(batch, info.device)
            mask = random_mask(valid, cfg.mask_ratio, mask_gen)
            with common.autocast(info.device, args.amp):
                loss = ddp(tokens, valid, time_ids, mask).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            step_loss = float(common.all_reduce_mean(loss.detach(), info))
            n_tokens = int(valid.sum()) * info.world_size
            epoch_loss += step_loss
            epoch_tokens += n_tokens
            history["steps"].append(step_loss)
            rate = epoch_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:,.0f}")
        record = {"epoch": epoch, "train_loss": epoch_loss / max(steps_per_epoch, 1),
                  "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "tokens_per_s": epoch_tokens / max(time.perf_counter() - t0, 1e-9),
                  "seconds": time.perf_counter() - t0}
        if val_set is not None:
            record["val_loss"] = validation_loss(model, val_set, args.batch_size, info, args.seed, args.amp,
                                                 args.max_tokens)
        history["epochs"].append(record)
        logger.log(**record)
        if ckpt_path is not None:
            save_pretrain_checkpoint(ckpt_path, model, optimizer, scheduler, mask_gen, epoch, history, cfg, args,
                                     info, schedule)
    return history


def save_pretrain_checkpoint(path: Path, model: CLEAR, optimizer: torch.optim.Optimizer,
                             scheduler: torch.optim.lr_scheduler.LRScheduler, mask_gen: torch.Generator, epoch: int,
                             history: dict, cfg: CLEARConfig, args: PretrainArgs, info: common.DistInfo,
                             schedule: dict) -> None:
    # Every rank's masking generator goes into the checkpoint (gathered to rank 0), so that a resumed
    # multi-process run continues each rank's mask stream.
    gens = [mask_gen.get_state()]
    if info.distributed:
        gens = [None] * info.world_size
        torch.distributed.all_gather_object(gens, mask_gen.get_state())
    if not info.is_main:
        return
    checkpoint.save_checkpoint(path, "pretrain", {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "mask_generator": gens, "rng": checkpoint.rng_state(), "epoch": epoch, "history": history,
        "config": cfg.to_dict(), "args": asdict(args), "schedule": schedule,
    })
