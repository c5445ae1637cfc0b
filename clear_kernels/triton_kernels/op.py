"""The ``clear_kernels::triton_fwd/triton_bwd`` op pair and the ``triton`` dispatch backend.

The ops are plain custom ops whose implementation calls the launchers; ``torch.compile`` treats them as opaque
calls (their fake implementations give it the output shapes), which keeps one code path for CUDA and for CPU
tensors under the interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch, ops
from .backward import segment_attention_backward
from .common import INTERPRET
from .forward import segment_attention_forward

FWD, BWD = ops.define_pair("triton")


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


@torch.library.impl(FWD, "CompositeExplicitAutograd", lib=ops._library)
def _triton_fwd(q, k, v, segment, group, seg_start, seg_end, group_index, group_offsets, summary_index,
                summary_offsets, scale, is_causal=False):
    return segment_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), segment, group, seg_start,
                                     seg_end, group_index, group_offsets, summary_index, summary_offsets, scale,
                                     is_causal)


@torch.library.impl(BWD, "CompositeExplicitAutograd", lib=ops._library)
def _triton_bwd(grad_out, q, k, v, out, lse, segment, group, seg_start, seg_end, group_index, group_offsets,
                summary_index, summary_offsets, scale, is_causal=False):
    return segment_attention_backward(grad_out, q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
                                      segment, group, seg_start, seg_end, group_index, group_offsets,
                                      summary_index, summary_offsets, scale, is_causal)


ops.register_pair("triton")


def refuse(q: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run inputs like ``q``, or None."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and not INTERPRET:
        major, _ = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return f"bfloat16 needs a GPU of compute capability 8.0 or newer, this one is {major}.x"
    return None


DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)

dispatch.register(dispatch.Backend(name="triton", op_prefix="triton", device_types=DEVICE_TYPES, refuse=refuse,
                                   features=frozenset({"causal", "gqa"})))
