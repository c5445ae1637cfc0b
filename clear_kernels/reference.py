"""The dense reference: materialise the mask, run plain attention. It defines the semantics of every kernel.

It computes in float32 for low-precision inputs (float64 for float64), so it is also the accuracy yardstick.
It is registered as the ``clear_kernels::reference_{fwd,bwd}`` op pair so that it exercises the same dispatch,
autograd and fake-tensor paths as the kernels, and it is exposed as a plain differentiable function for tests.
"""

from __future__ import annotations

import torch

from . import dispatch, ops
from .layout import mask_from_ids


def masked_attention(q, k, v, mask, scale):
    """Differentiable dense attention under a bool ``[B, L, L]`` mask; rows with no key give 0, never NaN.

    Returns ``(out, lse)`` with ``out`` in the dtype of ``q`` and ``lse`` float32 (0 on empty rows).
    """
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
    out = torch.matmul(weights / safe_denom, v.to(compute))
    out = torch.where(has_key, out, torch.zeros_like(out))
    lse = torch.where(has_key, row_max + torch.log(safe_denom), torch.zeros_like(denom)).squeeze(-1)
    return out.to(q.dtype), lse.to(torch.float32)


def segment_attention_reference(q, k, v, layout, scale=None):
    """Plain-PyTorch segment attention on a :class:`SegmentLayout` (differentiable by autograd)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return masked_attention(q, k, v, layout.materialize(), scale)[0]


FWD, BWD = ops.define_pair("reference")


@torch.library.impl(FWD, "CompositeExplicitAutograd", lib=ops._library)
def _reference_fwd(q, k, v, segment, group, *rest):
    scale = rest[-1]  # the remaining layout tensors are index lists the dense reference does not need
    out, lse = masked_attention(q, k, v, mask_from_ids(segment, group), scale)
    return out.contiguous(), lse.contiguous()


@torch.library.impl(BWD, "CompositeExplicitAutograd", lib=ops._library)
def _reference_bwd(grad_out, q, k, v, out, lse, segment, group, *rest):
    # Written out rather than taken from autograd: kernel implementations run below the autograd dispatch key.
    # It is also the plainest statement of the backward every kernel implements.
    scale = rest[-1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_, k_, v_, o_, do_ = (t.to(compute) for t in (q, k, v, out, grad_out))
    allowed = mask_from_ids(segment, group)[:, None]
    scores = torch.matmul(q_, k_.transpose(-1, -2)) * scale
    probs = torch.where(allowed, torch.exp(scores - lse.to(compute)[..., None]), torch.zeros_like(scores))
    grad_v = torch.matmul(probs.transpose(-1, -2), do_)
    delta = (do_ * o_).sum(-1, keepdim=True)
    grad_scores = probs * (torch.matmul(do_, v_.transpose(-1, -2)) - delta)
    grad_q = torch.matmul(grad_scores, k_) * scale
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q_) * scale
    return tuple(g.to(q.dtype).contiguous() for g in (grad_q, grad_k, grad_v))


ops.register_pair("reference")

dispatch.register(dispatch.Backend(
    name="reference", op_prefix="reference", device_types=("cpu", "cuda", "mps", "xpu", "meta"),
    refuse=lambda q: None,
))
