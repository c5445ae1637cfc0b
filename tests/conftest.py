"""Test session setup. Runs before any test module imports Triton or the package."""

import os

import pytest

# torch.compile's on-disk caches key a graph by its code, not by the fake functions of the custom ops in it: a cache
# written before a kernel changed its output strides replays the old strides and fails. Compile afresh every session
# (set before torch is imported: its config reads the variable then).
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
# Triton reads TRITON_INTERPRET when it is imported: without a GPU, its kernels run on CPU tensors through the
# interpreter. Set it before anything imports triton.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernels allocate outputs filled with NaN so that unwritten rows fail the parity checks.
os.environ.setdefault("CLEAR_KERNELS_POISON_OUTPUTS", "1")
# A backend forced from the environment would silently change what the tests exercise.
os.environ.pop("CLEAR_KERNELS_BACKEND", None)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
