"""``SegmentAttention``: multi-head self-attention over a :class:`SegmentLayout`, shaped like
``nn.MultiheadAttention`` (``batch_first=True``) with a layout where that module takes ``attn_mask``."""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import nn

from .api import segment_attention
from .layout import SegmentLayout


class SegmentAttention(nn.Module):
    """Self-attention with fused q/k/v projection, ``num_heads`` heads and an output projection.

    ``forward(x, layout)`` takes ``x`` of shape ``[B, L, embed_dim]`` and returns the same shape. ``backend``
    and ``scale`` are passed to :func:`clear_kernels.segment_attention`; ``dropout`` is applied to the output
    projection (the kernels do not drop attention weights).
    """

    def __init__(
        self, embed_dim: int, num_heads: int, *, bias: bool = True, dropout: float = 0.0,
        backend: str = "auto", scale: Optional[float] = None,
        device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.backend, self.scale = backend, scale
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, L, {self.embed_dim}], got shape {tuple(x.shape)}")
        q, k, v = rearrange(self.in_proj(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        out = segment_attention(q, k, v, layout, scale=self.scale, backend=self.backend)
        return self.dropout(self.out_proj(rearrange(out, "b h l d -> b l (h d)")))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, backend={self.backend!r}"
