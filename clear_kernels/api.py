"""The public functional op: ``segment_attention``, shaped like ``scaled_dot_product_attention``."""

from __future__ import annotations

import math

import torch

from . import dispatch, ops
from .layout import SegmentLayout

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_inputs(q, k, v, layout, is_causal: bool = False, enable_gqa: bool = False) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(layout, SegmentLayout):
        raise TypeError(f"layout must be a SegmentLayout, got {type(layout).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, L, D], got shape {tuple(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    batch, heads, length, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dim() == 4 and t.shape[2] != length and is_causal:
            raise ValueError(f"is_causal=True needs {name} of the length of q (L = {length}, the positions of "
                             f"one layout), got {name} of shape {tuple(t.shape)}")
        if not enable_gqa:
            if t.shape != q.shape:
                hint = (" (fewer key/value heads than query heads need enable_gqa=True)"
                        if t.dim() == 4 and t.shape[1] != heads and t.shape[::2] == q.shape[::2] else "")
                raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}{hint}")
        elif t.dim() != 4 or t.shape[::2] != q.shape[::2]:
            raise ValueError(f"{name} must be [B={batch}, H_kv, L={length}, D={head_dim}] with enable_gqa=True, "
                             f"got {tuple(t.shape)}")
    if enable_gqa:
        if k.shape != v.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if k.shape[1] < 1 or heads % k.shape[1]:
            raise ValueError(f"enable_gqa=True needs the query heads H = {heads} to be a multiple of the key/value "
                             f"heads H_kv = {k.shape[1]} (k of shape {tuple(k.shape)})")
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


def select_backend(q: torch.Tensor, k: torch.Tensor, is_causal: bool, backend: str) -> dispatch.Backend:
    """The backend that runs ``segment_attention(q, k, ..., is_causal=is_causal, backend=backend)``."""
    features = frozenset(({"causal"} if is_causal else set()) | ({"gqa"} if k.shape[1] != q.shape[1] else set()))
    return dispatch.select(backend, q, features)


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SegmentLayout,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``[B, H, L, D]`` queries, keys and values, where each token sees only what ``layout`` allows.

    ``scale`` defaults to ``1 / sqrt(D)``. ``is_causal=True``: inside a segment, a token sees the keys at its own
    position and before (packed causal documents); pairs with a summary token are unchanged. ``enable_gqa=True``:
    ``k`` and ``v`` are ``[B, H_kv, L, D]`` with ``H % H_kv == 0`` and query head ``h`` reads key/value head
    ``h // (H // H_kv)``, as in ``scaled_dot_product_attention``. ``return_lse=True`` returns ``(out, lse)`` with
    the natural-log logsumexp of each row's scaled scores, ``[B, H, L]`` float32 (float64 for float64 inputs; 0 on
    padding rows), differentiable, for merging partial attentions. ``backend`` is ``"auto"`` (the fastest that
    supports the inputs; ``CLEAR_KERNELS_BACKEND`` overrides it) or one of ``"triton"``, ``"cuda"``, ``"cpu"``,
    ``"reference"``. Padding rows of the output are zero. Differentiable in ``q``, ``k`` and ``v``.
    """
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa), ("return_lse", return_lse)):
        _check_flag(name, flag)
    _check_inputs(q, k, v, layout, is_causal, enable_gqa)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    else:
        _check_scale(scale)
    chosen = select_backend(q, k, is_causal, backend)
    fwd = ops.op(chosen.op_prefix, "fwd")
    if not chosen.strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = fwd(q, k, v, *layout.kernel_args(), float(scale), is_causal)
    if not return_lse:
        return out
    return out, _LseGradient.apply(lse, q, k, v, out, chosen.op_prefix, float(scale), is_causal, *layout.kernel_args())


class _LseGradient(torch.autograd.Function):
    """The logsumexp of the forward, with its own gradient (the op's autograd does not differentiate it).

    Its backward runs only when the loss uses the logsumexp. With ``g = dL/dlse``: ``dlse_i/dq_i = scale *
    sum_j P_ij k_j``, the attention output with ``k`` as values, and ``dlse_i/dk_j = scale * P_ij q_i``, which is
    the value gradient of the backward op for ``grad_out = g * q`` (that gradient, ``P^T grad_out``, does not
    depend on ``v`` or ``out``). Both are calls of the same backend, so they hold for every backend and rule.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, out: torch.Tensor, prefix: str, scale: float, is_causal: bool,
                *layout: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lse, q, k, out, *layout)
        ctx.prefix, ctx.scale, ctx.is_causal = prefix, scale, is_causal
        return lse.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad_lse: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        lse, q, k, out, *layout = ctx.saved_tensors
        fwd, bwd = ops.op(ctx.prefix, "fwd"), ops.op(ctx.prefix, "bwd")
        g = grad_lse.contiguous()[..., None]
        attn_k, _ = fwd(q, k, k, *layout, ctx.scale, ctx.is_causal)
        grad_q = (g * attn_k.to(g.dtype) * ctx.scale).to(q.dtype)
        weighted_q = (g * q.to(g.dtype)).to(q.dtype)
        _, _, pt_x = bwd(weighted_q, q, k, k, out, lse, *layout, ctx.scale, ctx.is_causal)
        grad_k = pt_x * ctx.scale
        return (None, grad_q, grad_k, None, None, None, None, None) + (None,) * len(layout)


def segment_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed ``[T, H, D]`` documents, as ``flash_attn_varlen_func`` takes them (self-attention).

    ``cu_seqlens`` is ``[N + 1]``: ``0`` then the running end of each document, ending at ``T``; document ``i`` is
    tokens ``cu_seqlens[i]:cu_seqlens[i + 1]`` and attends only itself (causally with ``is_causal=True``). ``k``
    and ``v`` are ``[T, H_kv, D]``; fewer key/value heads than query heads is grouped-query attention, as in
    flash-attn. ``max_seqlen`` is checked against the documents when given (the kernels do not need it). The
    checks read ``cu_seqlens`` on the host once, and are skipped inside ``torch.compile`` (so the compiled graph
    does not depend on the documents' lengths). Returns ``[T, H, D]``, and with ``return_lse=True`` also the
    logsumexp as ``[H, T]`` (flash-attn's ``softmax_lse`` of varlen calls). Other arguments as
    :func:`segment_attention`.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed [T, H, D], got shape {tuple(t.shape)}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must hold the T = {q.shape[0]} tokens of q (self-attention over one packing), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    layout = SegmentLayout.from_cu_seqlens(cu_seqlens, total_len=q.shape[0], max_seqlen=max_seqlen, _exact_end=True)
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [T, H, D] -> [1, H, T, D] views
    result = segment_attention(q, k, v, layout, scale=scale, is_causal=is_causal,
                               enable_gqa=k.shape[1] != q.shape[1], return_lse=return_lse, backend=backend)
    out, lse = result if return_lse else (result, None)
    out = out[0].transpose(0, 1).contiguous()
    return (out, lse[0]) if return_lse else out
