"""Small stand-in token batches for the model tests (the data pipeline has its own tests)."""

from __future__ import annotations

import torch

from clear_hug.config import get_config


def tiny_config(**overrides):
    # Two heads of 16 dims: the smallest head dim the kernels accept.
    return get_config("tiny", **overrides)


def token_batch(batch=3, beats=15, seed=0, dtype=torch.float32, min_beats=6):
    """Records with different beat counts (same beats in all leads, like the tokenizer), padding zeroed."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(min_beats, beats + 1, (batch,), generator=g)
    counts[0] = beats  # one full record, so compacted layouts keep their full length somewhere
    valid = (torch.arange(beats)[None, :] < counts[:, None])[:, None, :].expand(batch, 12, beats).clone()
    tokens = torch.randn(batch, 12, beats, 96, generator=g, dtype=torch.float64).to(dtype)
    tokens = tokens * valid[..., None]
    time = (torch.arange(beats) * 2 // 3).expand(batch, 12, beats).clone()
    return tokens, valid, time


class ListDataset(torch.utils.data.Dataset):
    """Items shaped like TokenDataset's: tokens [12, beats, 96], valid, time, labels."""

    def __init__(self, n=24, beats=15, num_classes=4, seed=0):
        tokens, valid, time = token_batch(n, beats, seed)
        g = torch.Generator().manual_seed(seed + 1)
        labels = (torch.rand(n, num_classes, generator=g) < 0.4).float()
        self.items = [{"tokens": tokens[i], "valid": valid[i], "time": time[i], "labels": labels[i]} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
