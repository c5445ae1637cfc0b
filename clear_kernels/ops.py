"""The op contract every kernel backend implements, and the autograd/fake glue they share.

Each backend is a pair of ops in the ``clear_kernels`` namespace with the schemas below:

* ``<prefix>_fwd(q, k, v, <layout tensors>, scale, is_causal=False) -> (out, lse)``: ``out`` has the dtype of
  ``q``; ``lse`` is ``[B, H, L]`` in :func:`lse_dtype` (float64 for float64 inputs, else float32), the
  natural-log sum of exp of the scaled scores of each row, and exactly 0 for padding rows (whose output is exactly
  0 too).
* ``<prefix>_bwd(grad_out, q, k, v, out, lse, <layout tensors>, scale, is_causal=False) -> (grad_q, grad_k,
  grad_v)``.

``q`` is ``[B, H, L, D]``; ``k`` and ``v`` are ``[B, H_kv, L, D]`` with ``H % H_kv == 0`` (grouped-query
attention: query head ``h`` reads key/value head ``h // (H // H_kv)``; ``H_kv == H`` is plain multi-head), and
``grad_k``/``grad_v`` have their shape. ``is_causal`` applies the causal rule of ``layout.mask_from_ids``.

The layout tensors are :meth:`SegmentLayout.kernel_args`, in that order. Schemas are written out here once; the
native extension defines the same text in C++ (``csrc/ops.cpp``), and ``opcheck`` in the tests keeps them equal.

The pair is differentiable once, in reverse mode. Double backward (``create_graph=True`` followed by another
backward) and forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) raise ``NotImplementedError``,
as the fused kernels of ``scaled_dot_product_attention`` do, instead of returning zeros.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch._library.autograd
import torch._library.utils
import torch.autograd.forward_ad as fwAD

NAMESPACE = "clear_kernels"

LAYOUT_PARAMS = (
    "Tensor segment, Tensor group, Tensor seg_start, Tensor seg_end, "
    "Tensor group_index, Tensor group_offsets, Tensor summary_index, Tensor summary_offsets"
)
FWD_SCHEMA = (
    f"(Tensor q, Tensor k, Tensor v, {LAYOUT_PARAMS}, float scale, bool is_causal=False) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {LAYOUT_PARAMS}, float scale, "
    "bool is_causal=False) -> (Tensor, Tensor, Tensor)"
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


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved logsumexp for inputs of ``dtype``: float64 keeps float64 gradients float64-exact."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Outputs are contiguous [B, H, L, D] whatever the strides of the inputs, unless a backend registers its own
# output layout (``register_pair(out_like=...)``).
def _fake_fwd(q, k, v, *rest):
    batch, heads, length, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, length), dtype=lse_dtype(q.dtype))


def _fake_bwd(grad_out, q, k, v, out, lse, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def token_major_like(t: torch.Tensor) -> torch.Tensor:
    """An empty ``[B, H, L, D]`` tensor like ``t`` laid out as ``[B, L, H, D]`` (the heads of a token side by side):
    the output layout of kernels that write what an output projection reads without a copy."""
    batch, heads, length, head_dim = t.shape
    return t.new_empty((batch, length, heads, head_dim)).transpose(1, 2)


def _refuse_forward_ad(name: str, args) -> None:
    # Without this, the autograd kernel of torch.library drops the tangents of inputs that do not require grad
    # and forward mode silently gets a zero (or no) tangent. torch.func.jvp and forward_ad both hand the op
    # dual tensors of the current forward-AD level.
    for arg in args:
        if isinstance(arg, torch.Tensor) and fwAD.unpack_dual(arg).tangent is not None:
            raise NotImplementedError(
                f"{name}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by "
                "segment_attention; use reverse mode (Tensor.backward, torch.autograd.grad)")


def _no_double_backward(name: str):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{name}: double backward is not supported by segment_attention (the gradient of its gradient is not "
            "implemented, as for the fused kernels of scaled_dot_product_attention); create_graph=True gives "
            "first derivatives only")
    return backward


def _register_autograd(qualname: str, backward, setup_context) -> None:
    """``torch.library.register_autograd``, plus a clear error for forward-mode AD (see _refuse_forward_ad)."""
    op = torch._library.utils.lookup_op(qualname)
    reverse = torch._library.autograd.make_autograd_impl(op, torch._library.autograd.Info(backward, setup_context))

    def autograd_kernel(keyset, *args):
        _refuse_forward_ad(qualname, args)
        return reverse(keyset, *args)

    _library.impl(qualname.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)


def register_pair(prefix: str, contiguous_grad: bool | Callable[[torch.Tensor], bool] = True,
                  out_like: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  grad_like: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Fake implementations and autograd for an op pair whose schemas exist (Python- or C++-defined).

    The backward op gets an autograd formula that raises: with ``create_graph=True`` the first derivatives are
    computed (and keep a graph), and differentiating them again is a clear error instead of zeros.
    ``contiguous_grad``: whether the backward op needs the output gradient contiguous (``False``: any strides), or
    a function of that gradient saying so (a pair whose devices differ). ``out_like(q)`` and ``grad_like(t)`` (for
    each of ``q``, ``k``, ``v``): the empty output of a forward, and the empty gradients of a backward, whose
    results are not contiguous (fakes must have the strides of the real results).
    """
    fwd_name, bwd_name = f"{NAMESPACE}::{prefix}_fwd", f"{NAMESPACE}::{prefix}_bwd"
    bwd_op = getattr(getattr(torch.ops, NAMESPACE), f"{prefix}_bwd").default
    fake_fwd, fake_bwd = _fake_fwd, _fake_bwd
    if out_like is not None:
        def fake_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     *rest: object) -> tuple[torch.Tensor, torch.Tensor]:
            return out_like(q), _fake_fwd(q, k, v, *rest)[1]
    if grad_like is not None:
        def fake_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     *rest: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return grad_like(q), grad_like(k), grad_like(v)
    needs_contiguous = contiguous_grad if callable(contiguous_grad) else (lambda grad: contiguous_grad)
    torch.library.register_fake(fwd_name, fake_fwd, lib=_library)
    torch.library.register_fake(bwd_name, fake_bwd, lib=_library)
    _register_autograd(bwd_name, _no_double_backward(bwd_name), lambda ctx, inputs, output: None)

    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple,
                      output: tuple[torch.Tensor, torch.Tensor]) -> None:
        q, k, v, *layout = inputs[:3 + NUM_LAYOUT_TENSORS]
        scale, is_causal = (tuple(inputs[3 + NUM_LAYOUT_TENSORS:]) + (False,))[:2]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, *layout)
        ctx.scale, ctx.is_causal, ctx.num_inputs = scale, is_causal, len(inputs)

    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor,
                 grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        # The op's lse is its auxiliary output for this backward; a caller who differentiates the logsumexp gets it
        # through api._LseGradient, which adds that gradient only when the loss uses it.
        q, k, v, out, lse, *layout = ctx.saved_tensors
        grad_out = grad_out.contiguous() if needs_contiguous(grad_out) else grad_out
        grad_q, grad_k, grad_v = bwd_op(grad_out, q, k, v, out, lse, *layout, ctx.scale, ctx.is_causal)
        return (grad_q, grad_k, grad_v) + (None,) * (ctx.num_inputs - 3)

    _register_autograd(fwd_name, backward, setup_context)


def op(prefix: str, which: str = "fwd") -> torch._ops.OpOverload:
    """The registered op overload ``clear_kernels::<prefix>_<which>``."""
    return getattr(getattr(torch.ops, NAMESPACE), f"{prefix}_{which}").default
