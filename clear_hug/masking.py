"""Random masking of heartbeat tokens for masked-autoencoder pretraining (docs/clear_hug.md, Model)."""

from __future__ import annotations

import torch


def num_masked(valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[B]`` how many tokens to mask per sample: ``ratio`` of its valid tokens, rounded to nearest, always
    leaving at least one token visible when the sample has two or more (so the encoder sees some signal)."""
    n_valid = valid.flatten(1).sum(1)
    n_mask = torch.floor(n_valid.to(torch.float64) * ratio + 0.5).to(torch.int64)
    return torch.minimum(n_mask, (n_valid - 1).clamp(min=0)) if ratio < 1 else n_mask


def random_mask(valid: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool mask of the same shape as ``valid`` (``[B, leads, beats]``): True where a token is masked.

    Each sample draws its own mask (the released code shares one mask across the batch); padding is never
    masked. Drawn on the CPU generator so that the draw is the same on every device and can be checkpointed.
    """
    batch = valid.shape[0]
    flat_valid = valid.reshape(batch, -1)
    noise = torch.rand(flat_valid.shape, generator=generator, dtype=torch.float64)
    # Padding sorts after every valid token, so the lowest-noise n_mask valid tokens are the masked ones.
    noise = torch.where(flat_valid.cpu(), noise, torch.full_like(noise, 2.0))
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    masked = rank < num_masked(flat_valid.cpu(), ratio)[:, None]
    return masked.reshape(valid.shape).to(valid.device)
