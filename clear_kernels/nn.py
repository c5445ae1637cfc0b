"""``SegmentAttention``: multi-head self-attention over a :class:`SegmentLayout`, shaped like
``nn.MultiheadAttention`` (``batch_first=True``) with a layout where that module takes ``attn_mask``."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .api import segment_attention, select_backend
from .layout import PADDING, SegmentLayout


class SegmentAttention(nn.Module):
    """Self-attention with fused q/k/v projection, ``num_heads`` heads and an output projection.

    ``forward(x, layout=None, *, key_padding_mask=None, need_weights=False)`` takes ``x`` of shape
    ``[B, L, embed_dim]`` and returns the same shape. ``layout`` says which tokens see which (``None``: every token
    of a row sees every other, as ``nn.MultiheadAttention`` without ``attn_mask``). ``is_causal`` makes attention
    causal inside each segment. ``num_kv_heads`` (dividing ``num_heads``) gives grouped-query attention: the
    projection then makes ``num_kv_heads`` key and value heads. ``backend`` and ``scale`` are passed to
    :func:`clear_kernels.segment_attention`; ``dropout`` is applied to the output projection.

    Moving from ``nn.MultiheadAttention`` (:meth:`from_multihead` copies its weights); what differs:

    * self-attention only (``query``, ``key`` and ``value`` are one ``x``); inputs are batch-first; ``kdim`` and
      ``vdim`` equal ``embed_dim``; no ``add_bias_kv`` or ``add_zero_attn``;
    * which pairs attend is a ``layout`` (segments, summary tokens), not a dense ``attn_mask``;
    * ``forward`` returns the output tensor, not a ``(output, weights)`` tuple; ``need_weights=True`` is an error
      (the kernels never form the attention weights);
    * ``dropout`` drops the output projection's result, not attention weights;
    * ``key_padding_mask`` (``[B, L]``, True = padding, as in ``nn.MultiheadAttention``) also makes the padding
      tokens' own output rows zero (``nn.MultiheadAttention`` still computes them); padding must not split a
      segment, and folding it into the layout costs one host synchronisation (build the layout with the padding
      instead, for ``torch.compile``);
    * ``is_causal`` is set on the module and means causal inside each segment (``nn.MultiheadAttention``'s
      ``is_causal`` is only a hint about ``attn_mask``).
    """

    def __init__(
        self, embed_dim: int, num_heads: int, *, bias: bool = True, dropout: float = 0.0,
        backend: str = "auto", scale: float | None = None, is_causal: bool = False,
        num_kv_heads: int | None = None,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be a positive int dividing num_heads={num_heads}, "
                             f"got {num_kv_heads!r}")
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.num_kv_heads, self.is_causal = num_kv_heads, is_causal
        self.backend, self.scale = backend, scale
        kv_dim = num_kv_heads * self.head_dim
        self.in_proj = nn.Linear(embed_dim, embed_dim + 2 * kv_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention, *, dropout: float | None = None,
                       **kwargs) -> SegmentAttention:
        """A module with the weights of ``mha`` (copied); ``kwargs`` go to the constructor (``backend``,
        ``is_causal``, ...). ``mha``'s attention dropout has no equivalent here: with ``mha.dropout > 0`` pass
        ``dropout`` (applied to the output, see the class docstring) to say what you want instead."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError("mha has kdim/vdim different from embed_dim; SegmentAttention is self-attention only")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("mha uses add_bias_kv or add_zero_attn, which SegmentAttention does not have")
        if dropout is None:
            if mha.dropout:
                raise ValueError(f"mha drops attention weights (dropout={mha.dropout}), which the kernels cannot; "
                                 "pass dropout= (applied to the output projection) to convert it anyway")
            dropout = 0.0
        if "num_kv_heads" in kwargs and kwargs["num_kv_heads"] not in (None, mha.num_heads):
            raise ValueError("from_multihead copies all heads of mha: num_kv_heads must be its num_heads")
        weight = mha.in_proj_weight
        module = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, dropout=dropout,
                     device=weight.device, dtype=weight.dtype, **kwargs)
        with torch.no_grad():
            module.in_proj.weight.copy_(weight)
            module.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                module.in_proj.bias.copy_(mha.in_proj_bias)
                module.out_proj.bias.copy_(mha.out_proj.bias)
        return module

    def forward(self, x: torch.Tensor, layout: SegmentLayout | None = None, *,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False) -> torch.Tensor:
        if need_weights is not False:
            raise ValueError("need_weights=True is not supported: the kernels never form the attention weights "
                             "(pass need_weights=False)")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, L, {self.embed_dim}], got shape {tuple(x.shape)}")
        if layout is None:
            layout = SegmentLayout.block_diagonal([[x.shape[1]]] * x.shape[0], device=x.device)
        if key_padding_mask is not None:
            layout = _with_padding(layout, key_padding_mask)
        kv = self.num_kv_heads * self.head_dim
        proj = self.in_proj(x)
        q, k, v = proj.split([self.embed_dim, kv, kv], dim=-1)
        q = rearrange(q, "b l (h d) -> b h l d", h=self.num_heads)
        k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.num_kv_heads) for t in (k, v))
        if not select_backend(q, k, self.is_causal, self.backend).strided:
            # The backend copies q, k and v to contiguous tensors anyway: make those copies here, with a backward
            # that saves a copy (see _HeadsFromProjection). Strided backends keep the views.
            q, k, v = _HeadsFromProjection.apply(proj, (self.num_heads, self.num_kv_heads, self.num_kv_heads),
                                                 self.head_dim)
        out = segment_attention(q, k, v, layout, scale=self.scale, is_causal=self.is_causal,
                                enable_gqa=self.num_kv_heads != self.num_heads, backend=self.backend)
        return self.dropout(self.out_proj(rearrange(out, "b h l d -> b l (h d)")))

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        causal = ", is_causal=True" if self.is_causal else ""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}{causal}, backend={self.backend!r}"


class _HeadsFromProjection(torch.autograd.Function):
    """``[B, L, sum(heads) * D]`` projection to one contiguous ``[B, h, L, D]`` tensor per entry of ``heads``.

    What ``split`` + ``rearrange`` + ``contiguous`` compute, with a backward that writes each head gradient straight
    into the projection's gradient: theirs permutes every gradient back into its own tensor and then concatenates
    them, a second full copy per layer. (The kernels read contiguous ``[B, H, L, D]`` tensors, so the forward's one
    copy stays.)
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, proj: torch.Tensor, heads: tuple[int, ...],
                head_dim: int) -> tuple[torch.Tensor, ...]:
        batch, length = proj.shape[:2]
        per_head = proj.view(batch, length, sum(heads), head_dim)
        ctx.heads = heads
        starts = [sum(heads[:i]) for i in range(len(heads))]
        return tuple(per_head[:, :, s:s + h].transpose(1, 2).contiguous() for s, h in zip(starts, heads))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Gradients are materialised (zeros for an output the loss does not use), so none is None.
        batch, _, length, head_dim = grads[0].shape
        grad = grads[0].new_empty(batch, length, sum(ctx.heads), head_dim)
        start = 0
        for g, h in zip(grads, ctx.heads):
            grad[:, :, start:start + h].copy_(g.transpose(1, 2))
            start += h
        return grad.view(batch, length, -1), None, None


def _with_padding(layout: SegmentLayout, key_padding_mask: torch.Tensor) -> SegmentLayout:
    """``layout`` with the tokens where ``key_padding_mask`` is True turned into padding (validated again)."""
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
    if key_padding_mask.shape != layout.segment.shape:
        raise ValueError(f"key_padding_mask must be [B, L] = {tuple(layout.segment.shape)}, got "
                         f"{tuple(key_padding_mask.shape)}")
    segment = torch.where(key_padding_mask.to(layout.device), PADDING, layout.segment)
    try:
        return SegmentLayout.from_ids(segment, layout.group, num_groups=layout.num_groups)
    except ValueError as exc:
        raise ValueError(f"key_padding_mask: padding must not split a segment of the layout ({exc})") from None
