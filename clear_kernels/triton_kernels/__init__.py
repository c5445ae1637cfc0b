"""Triton kernels of segment attention (SPEC §2.3): importing this package registers the ``triton`` backend.

``common`` holds the tile logic shared by ``forward`` and ``backward``; ``op`` registers the op pair.
"""

from . import op  # noqa: F401
