"""Batches of records of similar length under a token budget, for training on records of any length.

A batch of ragged records is padded to its longest member, so mixing a 10 s strip with a 30-minute Holter record
wastes almost all of the strip's row; and a fixed batch size either overflows memory on long records or starves
the machine on short ones. ``LengthBucketSampler`` sorts records by length within random pools, cuts the sorted
runs into batches whose padded size ``batch_size x longest x leads`` stays under ``max_tokens``, and shuffles the
batches. A record longer than the budget on its own forms a batch by itself (it is never dropped or cut).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler[list[int]]):
    """A batch sampler (pass as ``DataLoader(batch_sampler=...)``) over items of ``lengths`` beats.

    ``tokens_per_beat`` is the number of tokens a beat costs (12 leads). ``pool`` records are drawn at random,
    sorted by length and cut into batches, so batches are similar in length but still random across epochs.
    The order is a pure function of ``(seed, epoch)``; ``set_epoch`` like ``DistributedSampler``. With
    ``num_replicas > 1`` each rank takes every ``num_replicas``-th batch (the batch list is padded by repeating
    its first batches so that every rank gets the same number of steps).
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, tokens_per_beat: int = 12, shuffle: bool = True,
                 seed: int = 0, pool: int = 1024, num_replicas: int = 1, rank: int = 0,
                 max_batch_size: int | None = None) -> None:
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) == 0:
            raise ValueError(f"lengths must be a non-empty 1-D sequence of beat counts, got shape {lengths.shape}")
        if not np.issubdtype(lengths.dtype, np.integer) or (lengths < 0).any():
            raise ValueError("lengths must be non-negative integers (beats per item)")
        for name, v in (("max_tokens", max_tokens), ("tokens_per_beat", tokens_per_beat), ("pool", pool),
                        ("num_replicas", num_replicas)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
        self.lengths = lengths.astype(np.int64)
        self.max_tokens, self.tokens_per_beat, self.shuffle = int(max_tokens), int(tokens_per_beat), shuffle
        self.seed, self.pool, self.num_replicas, self.rank = seed, int(pool), int(num_replicas), int(rank)
        self.max_batch_size = max_batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        batches: list[list[int]] = []
        for p in range(0, len(order), self.pool):
            chunk = order[p:p + self.pool]
            # Stable sort: equal lengths keep the (random) pool order.
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            current: list[int] = []
            longest = 0
            for i in chunk.tolist():
                width = max(longest, int(self.lengths[i]), 1)
                full = self.max_batch_size is not None and len(current) >= self.max_batch_size
                if current and (full or (len(current) + 1) * width * self.tokens_per_beat > self.max_tokens):
                    batches.append(current)
                    current, width = [], max(int(self.lengths[i]), 1)
                current.append(i)
                longest = width
            if current:
                batches.append(current)
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        if self.num_replicas > 1:
            extra = (-len(batches)) % self.num_replicas
            batches = batches + batches[:extra]
            batches = batches[self.rank::self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())

    def padded_tokens(self) -> tuple[int, int]:
        """``(real, padded)`` token counts of this epoch's batches: how much of the work is padding."""
        real = padded = 0
        for b in self._batches():
            lens = self.lengths[b]
            real += int(lens.sum()) * self.tokens_per_beat
            padded += int(lens.max()) * len(b) * self.tokens_per_beat
        return real, padded
