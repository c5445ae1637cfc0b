"""The ``triton`` backend: imports the Triton kernels package when Triton is importable.

Under ``TRITON_INTERPRET=1`` (read by Triton at import, so it must be set before) the kernels also accept CPU
tensors, which is how machines without a GPU test them; ``"auto"`` never picks the interpreter for CPU inputs.
"""

from __future__ import annotations

from . import dispatch

try:
    import triton  # noqa: F401
except ImportError as exc:
    dispatch.mark_unavailable("triton", f"Triton is not installed ({exc})")
else:
    from . import triton_kernels  # noqa: F401  (registers the backend)
