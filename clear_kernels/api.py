"""The public functional op: ``segment_attention``, shaped like ``scaled_dot_product_attention``."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import dispatch, ops
from .layout import SegmentLayout

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_inputs(q, k, v, layout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(layout, SegmentLayout):
        raise TypeError(f"layout must be a SegmentLayout, got {type(layout).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, L, D], got shape {tuple(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    batch, _, length, head_dim = q.shape
    if head_dim < 1 or length < 1:
        raise ValueError(f"q must have L >= 1 and D >= 1, got shape {tuple(q.shape)}")
    if layout.batch_size != batch or layout.seq_len != length:
        raise ValueError(
            f"layout was built for batch {layout.batch_size} and length {layout.seq_len}, "
            f"but q has batch {batch} and length {length}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}; use layout.to(q.device)")


# The kernels compute in float32 below float64, and the GPU ones multiply the scores by scale * log2(e) in float32
# (softmax in the log2 domain): a larger |scale| is inf there and makes every row NaN. One bound for every backend
# and dtype. (Scores that overflow for a smaller scale, |scale * q.k| > 3.4e38, are the input's doing and give NaN
# rows in every backend, as in scaled_dot_product_attention.)
MAX_ABS_SCALE = torch.finfo(torch.float32).max / math.log2(math.e)


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    try:
        value = float(scale)
    except OverflowError:  # an int beyond float64
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if abs(value) > MAX_ABS_SCALE:
        raise ValueError(f"scale must be at most {MAX_ABS_SCALE:.4e} in magnitude (float32 max / log2(e): the "
                         f"kernels compute scale * log2(e) in float32), got {scale!r}")


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SegmentLayout,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``[B, H, L, D]`` queries, keys and values, where each token sees only what ``layout`` allows.

    ``scale`` defaults to ``1 / sqrt(D)``. ``backend`` is ``"auto"`` (the fastest that supports the inputs;
    ``CLEAR_KERNELS_BACKEND`` overrides it) or one of ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``.
    Padding rows of the output are zero. Differentiable in ``q``, ``k`` and ``v``.
    """
    _check_inputs(q, k, v, layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    else:
        _check_scale(scale)
    chosen = dispatch.select(backend, q)
    fwd = ops.op(chosen.op_prefix, "fwd")
    if not chosen.strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, _ = fwd(q, k, v, *layout.kernel_args(), float(scale))
    return out
