"""Shared training plumbing: distributed setup, schedules, precision, seeding, JSONL logs.

Checkpoints have their own module, ``clear_hug.checkpoint``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


# ------------------------------------------------------------------ run settings
@dataclass
class RunSettings:
    """How a run executes, apart from its recipe: the fields the run dataclasses (``PretrainArgs``,
    ``FinetuneArgs``) share, and the commands' ``--seed``, ``--device``, ``--amp``, ``--no-progress``, ``--threads``
    (generated from these fields, so each default lives here)."""

    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    amp: bool | None = None  # None: bf16 autocast on CUDA, off on CPU
    progress: bool = True  # progress bars (on the main process)
    threads: int | None = None  # torch CPU threads, set by the commands before a run (None: torch's default)


# ------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


# ------------------------------------------------------------------ schedules and precision
def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's lr, then cosine decay to ``min_lr`` at ``total_steps`` (per step)."""
    base = [g["lr"] for g in optimizer.param_groups]
    total_steps = max(total_steps, 1)

    def factor(step: int, base_lr: float) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        floor = min_lr / base_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s, b=b: factor(s, b) for b in base])


def autocast(device: torch.device, enabled: bool | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; off on CPU unless asked (CPU bf16 is slow on most machines)."""
    if enabled is None:
        enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and embeddings-as-vectors (anything 1-D).

    The fused implementation (one kernel per parameter instead of about ten) where every parameter is on the CPU
    or a GPU: on CPU the default per-parameter loop took 5% of a ``base`` training step, the fused step under a
    third of that; the updates agree to float rounding. Resuming from a checkpoint keeps the choice it was saved
    with (Optimizer.load_state_dict restores the groups' flags), so a resumed run repeats its losses.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def idle_threads(max_threads: int = 2) -> int:
    """CPU threads worth using now: the cores not already kept busy by other processes (1-minute load).

    PyTorch's OpenMP threads spin-wait for each other; on an oversubscribed machine two threads run several
    times slower than one, so a busy machine gets one thread.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(max_threads, cores, int(round(cores - busy))))


KEEP_FREED_MEMORY_ENV = "CLEAR_HUG_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Keep the memory of freed tensors in the process for the next step (glibc only); returns whether it did.

    glibc serves each allocation above its mmap threshold (32 MB at most) with fresh pages from the OS and returns
    them when the block is freed, so every training step faults in and zeroes its large activations again. At 1800
    beats of ``base`` (44 MB per decoder activation) that was a quarter of the step, and the step's cost per beat
    grew 38% from 600 to 1800 beats. ``mallopt(M_MMAP_MAX, 0)`` serves every allocation from the heap and a 2 GiB
    trim threshold keeps freed blocks there for reuse. The process then holds on to its peak memory
    until it exits, as a training run does anyway. ``CLEAR_HUG_KEEP_FREED_MEMORY=0`` leaves the allocator alone.
    """
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def setup_cpu_process(threads: int | None) -> None:
    """What a training or evaluation process sets first: its torch CPU threads (when given) and the allocator
    (``keep_freed_memory``)."""
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()


# ------------------------------------------------------------------ reproducibility
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities (undefined metrics) as None and numpy scalars as Python numbers."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """``record`` as one line of standard JSON. An undefined metric (NaN, an infinity) is written as ``null``:
    ``json.dumps`` would write ``NaN`` or ``-Infinity``, which JSON parsers other than Python's reject."""
    return json.dumps(json_safe(record), default=float, allow_nan=False)


class JsonlLogger:
    """Appends one JSON object per line; a no-op on non-main ranks or without a path."""

    def __init__(self, path: os.PathLike | None, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json_line(record) + "\n")
