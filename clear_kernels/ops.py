"""The op contract every kernel backend implements, and the autograd/fake glue they share.

Each backend is a pair of ops in the ``clear_kernels`` namespace with the schemas below:

* ``<prefix>_fwd(q, k, v, <layout tensors>, scale) -> (out, lse)``: ``out`` has the dtype of ``q``; ``lse`` is
  float32 ``[B, H, L]``, the natural-log sum of exp of the scaled scores of each row, and exactly 0 for padding
  rows (whose output is exactly 0 too).
* ``<prefix>_bwd(grad_out, q, k, v, out, lse, <layout tensors>, scale) -> (grad_q, grad_k, grad_v)``.

The layout tensors are :meth:`SegmentLayout.kernel_args`, in that order. Schemas are written out here once; the
native extension defines the same text in C++ (``csrc/ops.cpp``), and ``opcheck`` in the tests keeps them equal.
"""

from __future__ import annotations

import os

import torch

NAMESPACE = "clear_kernels"

LAYOUT_PARAMS = (
    "Tensor segment, Tensor group, Tensor seg_start, Tensor seg_end, "
    "Tensor group_index, Tensor group_offsets, Tensor summary_index, Tensor summary_offsets"
)
FWD_SCHEMA = f"(Tensor q, Tensor k, Tensor v, {LAYOUT_PARAMS}, float scale) -> (Tensor, Tensor)"
BWD_SCHEMA = (
    f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {LAYOUT_PARAMS}, float scale)"
    " -> (Tensor, Tensor, Tensor)"
)
NUM_LAYOUT_TENSORS = 8

# Tests set this so every backend allocates its outputs filled with NaN: a row a kernel forgets to write then
# fails the comparison instead of passing on leftover memory. Kernels read it through ``poison_outputs()``
# (C++ reads the same variable).
POISON_ENV = "CLEAR_KERNELS_POISON_OUTPUTS"


def poison_outputs() -> bool:
    return os.environ.get(POISON_ENV, "") == "1"


def new_output(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` for kernel outputs, NaN-filled under ``CLEAR_KERNELS_POISON_OUTPUTS=1``."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if poison_outputs() else t


def new_output_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    out = torch.empty_like(t, **kwargs)
    return out.fill_(float("nan")) if poison_outputs() else out


_library = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_pair(prefix: str) -> tuple[str, str]:
    """Define the schemas of a backend's op pair from Python (native ops define theirs in C++)."""
    fwd, bwd = f"{prefix}_fwd", f"{prefix}_bwd"
    _library.define(fwd + FWD_SCHEMA)
    _library.define(bwd + BWD_SCHEMA)
    return f"{NAMESPACE}::{fwd}", f"{NAMESPACE}::{bwd}"


# Outputs are contiguous [B, H, L, D] whatever the strides of the inputs, unless a backend registers its own
# output layout (``register_pair(out_like=...)``).
def _fake_fwd(q, k, v, *rest):
    batch, heads, length, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, length), dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, lse, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_pair(prefix: str, contiguous_grad: bool = True, out_like=None) -> None:
    """Fake implementations and autograd for an op pair whose schemas exist (Python- or C++-defined).
    ``contiguous_grad=False``: the backward op takes the output gradient with any strides. ``out_like(q)``: the
    empty output of a forward whose output is not contiguous (its fake must have the same strides)."""
    fwd_name, bwd_name = f"{NAMESPACE}::{prefix}_fwd", f"{NAMESPACE}::{prefix}_bwd"
    bwd_op = getattr(getattr(torch.ops, NAMESPACE), f"{prefix}_bwd").default
    fake_fwd = _fake_fwd
    if out_like is not None:
        def fake_fwd(q, k, v, *rest):
            return out_like(q), _fake_fwd(q, k, v, *rest)[1]
    torch.library.register_fake(fwd_name, fake_fwd, lib=_library)
    torch.library.register_fake(bwd_name, _fake_bwd, lib=_library)

    def setup_context(ctx, inputs, output):
        q, k, v, *layout, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, *layout)
        ctx.scale = scale

    def backward(ctx, grad_out, grad_lse):
        # lse is an auxiliary output for the backward pass; nothing differentiable depends on it.
        q, k, v, out, lse, *layout = ctx.saved_tensors
        grad_out = grad_out.contiguous() if contiguous_grad else grad_out
        grad_q, grad_k, grad_v = bwd_op(grad_out, q, k, v, out, lse, *layout, ctx.scale)
        return (grad_q, grad_k, grad_v) + (None,) * (NUM_LAYOUT_TENSORS + 1)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context, lib=_library)


def op(prefix: str, which: str = "fwd"):
    """The registered op overload ``clear_kernels::<prefix>_<which>``."""
    return getattr(getattr(torch.ops, NAMESPACE), f"{prefix}_{which}").default
