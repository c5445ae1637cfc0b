"""clear_kernels: heartbeat-sparse (segment-local) attention for PyTorch.

``segment_attention(q, k, v, layout)`` computes attention where each token sees only its own segment plus its
group's summary tokens (SPEC §2.1), skipping the work between segments instead of masking it.
"""

from . import native as _native  # noqa: F401
from . import nn  # noqa: E402
from . import reference as _reference  # noqa: F401  (registers the reference backend first)
from . import triton_backend as _triton_backend  # noqa: F401
from .api import segment_attention, segment_attention_varlen
from .dispatch import ENV_VAR, available_backends
from .layout import PADDING, SUMMARY, SegmentLayout

__all__ = [
    "segment_attention", "segment_attention_varlen", "SegmentLayout", "available_backends", "ENV_VAR", "PADDING",
    "SUMMARY", "nn",
]
__version__ = "0.1.0"
