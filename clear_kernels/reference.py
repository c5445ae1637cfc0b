"""The dense reference: materialise the mask, run plain attention. It defines the semantics of every kernel.

It computes in float32 for low-precision inputs (float64 for float64), so it is also the accuracy yardstick.
It is registered as the ``clear_kernels::reference_{fwd,bwd}`` op pair so that it exercises the same dispatch,
autograd and fake-tensor paths as the kernels, and it is exposed as a plain differentiable function for tests.
"""

from __future__ import annotations

import torch

from . import dispatch, ops
from .layout import SegmentLayout, mask_from_ids


def allowed_matmul(weights: torch.Tensor, allowed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weights @ x`` summed over the allowed pairs only: ``out[i] = sum over allowed j of weights[i, j] * x[j]``.

    A dense matmul also multiplies the pairs the mask forbids, by weight 0, and ``0 * NaN`` or ``0 * inf`` is NaN:
    a NaN or Inf in a token nobody (or only another segment) attends would spread to every row of the batch
    element. The kernels never touch those pairs, so the definition must not either. Non-finite entries of ``x``
    are taken out of the matmul and added back, with IEEE signs, only where an allowed pair meets them (counts
    of 0/1 matrices, so memory stays ``[B, H, L, L]``; this costs five more matmuls only when ``x`` holds any).
    """
    w = torch.where(allowed, weights, torch.zeros_like(weights))
    finite = torch.isfinite(x)
    # The shortcut reads a flag on the host; traced (torch.compile) or on meta tensors the general path runs.
    if not torch.compiler.is_compiling() and x.device.type != "meta" and bool(finite.all()):
        return torch.matmul(w, x)
    out = torch.matmul(w, torch.where(finite, x, torch.zeros_like(x)))
    def count(pairs: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        return torch.matmul(pairs.to(x.dtype), entries.to(x.dtype)) > 0

    w_pos, w_neg, w_zero = allowed & (weights > 0), allowed & (weights < 0), allowed & (weights == 0)
    x_pos, x_neg = x == float("inf"), x == float("-inf")
    pos = count(w_pos, x_pos) | count(w_neg, x_neg)  # some allowed product is +inf
    neg = count(w_pos, x_neg) | count(w_neg, x_pos)
    nan = count(allowed, torch.isnan(x)) | count(w_zero, x_pos | x_neg) | (pos & neg)
    out = torch.where(pos, float("inf"), out)
    out = torch.where(neg, float("-inf"), out)
    return torch.where(nan, float("nan"), out)


def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention as plain attention: key/value head ``j`` repeated for the ``H // H_kv`` query
    heads that read it (query head ``h`` reads ``h // (H // H_kv)``, as ``enable_gqa`` in SDPA)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def fold_kv_grad(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of :func:`expand_kv`: the query heads' gradients summed per key/value head."""
    batch, heads, length, dim = g.shape
    return g if heads == kv_heads else g.view(batch, kv_heads, heads // kv_heads, length, dim).sum(2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable dense attention under a bool ``[B, L, L]`` mask; rows with no key give 0, never NaN.

    Returns ``(out, lse)`` with ``out`` in the dtype of ``q`` and ``lse`` in ``ops.lse_dtype`` (0 on empty rows).
    Values of tokens a row does not attend never reach that row, not even a NaN (see ``allowed_matmul``).
    ``k`` and ``v`` may have fewer heads than ``q`` (grouped-query attention, see :func:`expand_kv`).
    """
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    allowed = mask[:, None, :, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1, keepdim=True)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(has_key, row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    safe_denom = torch.where(has_key, denom, torch.ones_like(denom))
    out = allowed_matmul(weights / safe_denom, allowed, v.to(compute))
    out = torch.where(has_key, out, torch.zeros_like(out))
    lse = torch.where(has_key, row_max + torch.log(safe_denom), torch.zeros_like(denom)).squeeze(-1)
    return out.to(q.dtype), lse.to(ops.lse_dtype(q.dtype))


def segment_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout,
                                scale: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """Plain-PyTorch segment attention on a :class:`SegmentLayout` (differentiable by autograd)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return masked_attention(q, k, v, layout.materialize(is_causal), scale)[0]


FWD, BWD = ops.define_pair("reference")


@torch.library.impl(FWD, "CompositeExplicitAutograd", lib=ops._library)
def _reference_fwd(q, k, v, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index,
                   summary_offsets, scale, is_causal=False):
    # The other layout tensors are index lists the dense reference does not need. (The dispatcher leaves out
    # trailing arguments that equal their schema default, so is_causal has one here too.)
    out, lse = masked_attention(q, k, v, mask_from_ids(segment, group, is_causal), scale)
    return out.contiguous(), lse.contiguous()


@torch.library.impl(BWD, "CompositeExplicitAutograd", lib=ops._library)
def _reference_bwd(grad_out, q, k, v, out, lse, segment, group, seg_start, seg_end, group_index, group_offsets,
                   summary_index, summary_offsets, scale, is_causal=False):
    # Written out rather than taken from autograd: kernel implementations run below the autograd dispatch key.
    # It is also the plainest statement of the backward every kernel implements.
    kv_heads = k.shape[1]
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Only allowed pairs are combined (where / allowed_matmul), so a NaN in a token a row does not attend stays
    # out of that row's gradients, as in the kernels.
    q_, k_, v_, o_, do_ = (t.to(compute) for t in (q, k, v, out, grad_out))
    allowed = mask_from_ids(segment, group, is_causal)[:, None]
    allowed_t = allowed.transpose(-1, -2)
    scores = torch.matmul(q_, k_.transpose(-1, -2)) * scale
    probs = torch.where(allowed, torch.exp(scores - lse.to(compute)[..., None]), torch.zeros_like(scores))
    grad_v = allowed_matmul(probs.transpose(-1, -2), allowed_t, do_)
    delta = (do_ * o_).sum(-1, keepdim=True)
    grad_scores = torch.where(allowed, probs * (torch.matmul(do_, v_.transpose(-1, -2)) - delta), 0.0)
    grad_q = allowed_matmul(grad_scores, allowed, k_) * scale
    grad_k = allowed_matmul(grad_scores.transpose(-1, -2), allowed_t, q_) * scale
    grad_k, grad_v = fold_kv_grad(grad_k, kv_heads), fold_kv_grad(grad_v, kv_heads)
    return tuple(g.to(q.dtype).contiguous() for g in (grad_q, grad_k, grad_v))


ops.register_pair("reference")

dispatch.register(dispatch.Backend(
    name="reference", op_prefix="reference", device_types=("cpu", "cuda", "mps", "xpu", "meta"),
    refuse=lambda q: None, features=frozenset({"causal", "gqa"}),
))
