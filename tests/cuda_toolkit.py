"""Where the local CUDA toolkit is, for the tests that compile the CUDA sources without a GPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return str(Path(os.environ[var]) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir() -> Path | None:
    """The toolkit's include folder (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), or None.

    ``nvcc`` on PATH may be a wrapper script outside the toolkit, so its folder is only one of the guesses.
    """
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime.h").exists() and (c / "cuda_fp16.h").exists()), None)
