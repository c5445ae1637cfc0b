"""The ``clear_kernels::triton_fwd/triton_bwd`` op pair and the ``triton`` dispatch backend.

The ops are plain custom ops whose implementation calls the launchers; ``torch.compile`` treats them as opaque
calls (their fake implementations give it the output shapes), which keeps one code path for CUDA and for CPU
tensors under the interpreter.
"""

from __future__ import annotations

import functools

import torch

from .. import dispatch, ops
from .backward import segment_attention_backward
from .common import INTERPRET, unit_stride
from .forward import out_like, segment_attention_forward

FWD, BWD = ops.define_pair("triton")


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# float32 runs its dots as exact FMAs (no tensor cores); past head dim 128 its backward does not stay in registers
# on sm_80 / sm_90 even walking the window twice (the compile report: 360-464 B of stack per thread at D=256), so
# such inputs go to the cuda backend instead of running spilled.
MAX_FLOAT32_HEAD_DIM = 128


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    # The public entry points validate this; a direct call of the op must not read the wrong key/value head.
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"clear_kernels::triton: q's {q.shape[1]} heads must be a multiple of k's {k.shape[1]}")


@torch.library.impl(FWD, "CompositeExplicitAutograd", lib=ops._library)
def _triton_fwd(q, k, v, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index,
                summary_offsets, scale, is_causal=False):
    _check_heads(q, k)
    # Strided views (the module's projection split into heads) go to the kernel as they are: no copies.
    return segment_attention_forward(unit_stride(q), unit_stride(k), unit_stride(v), segment, group, seg_start,
                                     seg_end, group_index, group_offsets, summary_index, summary_offsets, scale,
                                     is_causal)


@torch.library.impl(BWD, "CompositeExplicitAutograd", lib=ops._library)
def _triton_bwd(grad_out, q, k, v, out, lse, segment, group, seg_start, seg_end, group_index, group_offsets,
                summary_index, summary_offsets, scale, is_causal=False):
    _check_heads(q, k)
    return segment_attention_backward(unit_stride(grad_out), unit_stride(q), unit_stride(k), unit_stride(v),
                                      unit_stride(out), lse, segment, group, seg_start, seg_end, group_index,
                                      group_offsets, summary_index, summary_offsets, scale, is_causal)


ops.register_pair("triton", contiguous_grad=False, out_like=out_like)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    # Looked up once per device: the driver query costs microseconds on every call otherwise.
    return torch.cuda.get_device_capability(device_index)


def refuse(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run inputs like ``q``, or None."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if q.dtype == torch.float32 and head_dim > MAX_FLOAT32_HEAD_DIM:
        return (f"float32 at head dim {head_dim} > {MAX_FLOAT32_HEAD_DIM} would spill registers (exact float32 dots "
                "take too many); use bfloat16/float16 or another backend")
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and not INTERPRET:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        major, _ = _capability(index)
        if major < 8:
            return f"bfloat16 needs a GPU of compute capability 8.0 or newer, this one is {major}.x"
    return None


DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)

dispatch.register(dispatch.Backend(name="triton", op_prefix="triton", device_types=DEVICE_TYPES, refuse=refuse,
                                   strided=True, features=frozenset({"causal", "gqa"})))
