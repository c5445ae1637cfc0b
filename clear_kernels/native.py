"""The native extension (``clear_kernels._C``, built from ``csrc/``): the ``cpu`` and ``cuda`` backends.

Both backends are the one op pair ``clear_kernels::native_{fwd,bwd}``, whose schemas are defined in C++ with
``TORCH_LIBRARY``; the dispatcher sends CPU tensors to the C++ CPU kernel and CUDA tensors to the CUDA kernel.
Importing the package works without the extension: it warns once and these two backends report why they are
unavailable.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from . import dispatch, ops

EXTENSION_ERROR: str | None = None
try:
    importlib.import_module(f"{__package__}._C")  # loading the library registers the ops
except ModuleNotFoundError:
    EXTENSION_ERROR = "the native extension clear_kernels._C is not built"
except ImportError as exc:  # built against another torch, or a missing shared library
    EXTENSION_ERROR = f"the native extension clear_kernels._C failed to load ({exc})"

HEAD_DIM_RANGE = (16, 256)
_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _registered_kernels() -> dict[str, bool]:
    name = f"{ops.NAMESPACE}::native_fwd"
    return {key: EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            for key in ("CPU", "CUDA")}


# Read once at import (the extension registers everything when it loads), so that dispatch stays plain Python
# that torch.compile can trace.
NATIVE_KERNELS = _registered_kernels()


def has_kernel(device_key: str) -> bool:
    """Whether the extension registered a native kernel for a dispatch key ("CPU" or "CUDA")."""
    return NATIVE_KERNELS.get(device_key, False)


def _refuser(device_type: str):
    def refuse(q: torch.Tensor) -> str | None:
        if not has_kernel(device_type.upper()):
            return f"the native extension was built without a {device_type.upper()} kernel"
        if q.dtype not in _DTYPES[device_type]:
            return f"dtype {q.dtype} is not supported (supported: {', '.join(map(str, _DTYPES[device_type]))})"
        lo, hi = HEAD_DIM_RANGE
        if not lo <= q.shape[-1] <= hi:
            return f"head dim {q.shape[-1]} is outside [{lo}, {hi}]"
        return None
    return refuse


def _on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _result_like(t: torch.Tensor) -> torch.Tensor:
    # The CPU kernel reads q, k, v and the output gradient with any strides (unit stride along D) and writes its
    # output and gradients token-major (csrc/cpu/segment_attention_cpu.cpp); the CUDA kernel wants and writes
    # contiguous [B, H, L, D].
    return ops.token_major_like(t) if _on_cpu(t) else t.new_empty(t.shape)


if EXTENSION_ERROR is None:
    ops.register_pair("native", contiguous_grad=lambda grad: not _on_cpu(grad), out_like=_result_like,
                      grad_like=_result_like)
    for _device in ("cpu", "cuda"):
        dispatch.register(dispatch.Backend(_device, "native", (_device,), _refuser(_device),
                                           strided=_device == "cpu", features=frozenset({"causal", "gqa"})))
else:
    dispatch.mark_unavailable("cpu", EXTENSION_ERROR)
    dispatch.mark_unavailable("cuda", EXTENSION_ERROR)
    warnings.warn(
        f"clear_kernels: {EXTENSION_ERROR}; the 'cpu' and 'cuda' backends are disabled and CPU tensors use the "
        "dense reference. Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning, stacklevel=2,
    )


def _fake_dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


if has_kernel("CPU"):
    torch.library.register_fake(f"{ops.NAMESPACE}::dropout_mask", _fake_dropout_mask)


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A CPU dropout mask like ``like``: ``1 / (1 - q)`` where kept, 0 where dropped, each element dropped
    independently with probability ``q`` = ``p`` rounded to a multiple of 2^-16 (``p`` in [0, 1), ``seed`` any
    int64). Counter-based (splitmix64 of the seed and the element's 64-bit word), so it depends only on ``(seed, p,
    shape)``, not on the thread count; one pass, where ``bernoulli_`` calls the generator once per element
    (``csrc/cpu/dropout_mask_cpu.cpp``). Not differentiable (pass ``like`` detached)."""
    if not has_kernel("CPU"):
        raise RuntimeError(f"clear_kernels: {EXTENSION_ERROR or 'the native extension has no CPU kernel'}")
    return torch.ops.clear_kernels.dropout_mask(like, float(p), int(seed))


def cpu_output_cache(release: bool = False) -> dict[str, int]:
    """State of the CPU op's output cache; with ``release=True`` it first frees every cached block.

    The CPU kernel keeps the memory of its large outputs (``out``, ``dq``, ``dk``, ``dv``; 1 MiB and up) when the
    tensors are freed and reuses it for the next output of the same size: fresh pages from the OS would cost as
    much time to fault in as the attention itself. At most ``CLEAR_KERNELS_CPU_CACHE_MB`` MiB (default 1024, 0
    turns the cache off; a value whose bytes overflow size_t, 2^44 MiB and up, is an error) are kept free.
    Returns ``{"free_bytes", "free_blocks", "live_bytes"}``.
    """
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"clear_kernels: {EXTENSION_ERROR}")
    free_bytes, free_blocks, live_bytes = torch.ops.clear_kernels.cpu_output_cache(release)
    return {"free_bytes": free_bytes, "free_blocks": free_blocks, "live_bytes": live_bytes}
