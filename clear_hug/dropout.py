"""Dropout with a cheap mask on CPU: the model's one dropout (docs/clear_hug.md, Model).

``F.dropout`` on a CPU tensor draws its mask with ``bernoulli_``, one call of the generator per element: at the
paper's size that was 16% of a whole training step on 2 cores (about 7 ns per element, every residual branch of every
block). Here 64 random bits decide four elements: each element keeps when its 16 bits are at or above ``p`` of
their range. So the drop probability is ``p`` rounded to a multiple of 2^-16 (0.1 becomes 0.100006; flash-attention
rounds it to 1/256) and kept values are scaled by ``1 / (1 - that rounded p)``: the expectation of the output is the
input exactly. The bits come from the native extension's counter-based ``dropout_mask`` (one pass, seeded by one
draw of torch's generator, so ``torch.manual_seed`` still decides everything), or, without the extension, from one
64-bit draw of torch's generator per four elements. The rest is what ``F.dropout`` does: ``x * mask`` in ``x``'s
dtype, with the mask saved for the backward. On other devices ``F.dropout`` is already a fused counter-based kernel
and is used as is.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # each element's share of a draw: 16 bits


def quantized_p(p: float) -> float:
    """The drop probability the CPU mask realises for ``p``: ``p`` rounded to a multiple of 2^-16."""
    return round(p * _LEVELS) / _LEVELS


@functools.cache
def _native_mask_available() -> bool:
    from clear_kernels import native

    return native.has_kernel("CPU")


def keep_scale_mask(like: torch.Tensor, p: float, generator: torch.Generator | None = None,
                    native: bool | None = None) -> torch.Tensor:
    """A tensor like ``like`` (CPU, floating point) holding ``1 / (1 - q)`` where an element is kept and 0 where it
    is dropped, each element dropped independently with probability ``q = quantized_p(p)`` (``p < 1``).
    ``native``: use the extension's ``dropout_mask`` (default: when it is built) or torch's generator alone."""
    if native is None:
        native = _native_mask_available()
    if native:
        from clear_kernels.native import dropout_mask

        seed = torch.empty((), dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1, generator=generator)
        return dropout_mask(like.detach(), p, int(seed))
    n = like.numel()
    # The full signed range: all 64 bits random, so each int16 lane is uniform over [-2^15, 2^15). (random_()
    # without a range gives [0, 2^63): the top lane would have only 15 random bits and never be negative.)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=generator)
    lanes = words.view(torch.int16)[:n].view(like.shape)
    dropped = round(p * _LEVELS)
    keep = lanes >= dropped - (_LEVELS >> 1)
    scale = torch.tensor(_LEVELS / (_LEVELS - dropped), dtype=like.dtype, device=like.device)
    return torch.where(keep, scale, torch.zeros((), dtype=like.dtype, device=like.device))


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be a number in [0, 1], got {p!r}")
    return float(p)


def dropout(x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None,
            ) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the CPU mask described in the module docstring."""
    p = _check_p(p)
    if not training or p == 0.0:
        return x
    # Under torch.compile too: the seed draw is a host read, which a full graph cannot hold, and the compiler
    # generates its own masks.
    if x.device.type != "cpu" or not x.is_floating_point() or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    if round(p * _LEVELS) == _LEVELS:  # everything dropped (the scale would be 1 / 0)
        return x * 0.0
    return x * keep_scale_mask(x, p, generator)


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout`'s CPU mask (no parameters, so checkpoints are unchanged)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
