"""The ``triton`` backend: registered by the Triton kernels package when Triton is importable."""

from __future__ import annotations

from . import dispatch

try:
    import triton  # noqa: F401
except ImportError as exc:
    dispatch.mark_unavailable("triton", f"Triton is not installed ({exc})")
else:
    dispatch.mark_unavailable("triton", "the Triton kernels are not included in this version")
