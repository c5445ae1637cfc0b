"""Compile checks of the CUDA backend on machines without a GPU (and without a CUDA build of PyTorch).

* every ``csrc/cuda/*.cu`` file is compiled to an object file with the local ``nvcc`` for sm_80 and sm_90, with the
  flags ``setup.py`` passes plus the half/bfloat16 defines PyTorch's CUDAExtension adds, so a syntax, type or
  template error in the kernels fails here;
* ``csrc/cuda/segment_attention_cuda.cpp`` (the PyTorch glue) is syntax-checked with the host compiler against the
  installed torch headers. A CPU wheel ships the c10/cuda headers but not their generated
  ``c10/cuda/impl/cuda_cmake_macros.h``; an empty stand-in is provided in a temporary folder for the check.

All compiles start together (they take 20-30 s each) and each test waits for its own.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cuda_toolkit import cuda_include_dir, find_nvcc

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
GLUE = CUDA_DIR / "segment_attention_cuda.cpp"
ARCHES = ("80", "90")
# The flags setup.py gives nvcc, and the defines torch.utils.cpp_extension adds to every CUDAExtension.
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math"]
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def nvcc_command(nvcc: str, source: Path, obj: Path) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHES]
    # --threads: the two architectures compile in parallel.
    return [nvcc, "-c", *NVCC_FLAGS, *TORCH_NVCC_DEFINES, *gencode, "--threads", str(len(ARCHES)),
            str(source), "-o", str(obj)]


def glue_command(compiler: str, torch_include: Path, cuda_inc: Path, shim: Path) -> list[str]:
    return [compiler, "-fsyntax-only", "-std=c++17", "-w", f"-I{torch_include}",
            f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{cuda_inc}", f"-I{shim}", str(GLUE)]


@pytest.fixture(scope="module")
def nvcc():
    found = find_nvcc()
    if found is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA sources cannot be compile-checked")
    return found


@pytest.fixture(scope="module")
def compile_jobs(nvcc, tmp_path_factory):
    """Start every compile at once; maps a source name to its running process and command."""
    out = tmp_path_factory.mktemp("cuda_compile")
    jobs = {}
    for source in CU_FILES:
        cmd = nvcc_command(nvcc, source, out / (source.stem + ".o"))
        jobs[source.name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd)
    glue_skip = None
    try:
        import torch

        torch_include = Path(torch.__file__).parent / "include"
    except ImportError:
        torch_include = None
    compiler = shutil.which("g++") or shutil.which("c++")
    cuda_inc = cuda_include_dir()
    if torch_include is None or not (torch_include / "c10" / "cuda" / "CUDAStream.h").exists():
        glue_skip = "the installed torch ships no c10/cuda headers"
    elif compiler is None:
        glue_skip = "no host C++ compiler (g++/c++) found"
    elif cuda_inc is None:
        glue_skip = "the CUDA toolkit's include folder (cuda_runtime.h) was not found; set CUDA_HOME"
    else:
        shim = out / "shim"
        generated = torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        if not generated.exists():
            (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
            (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
        cmd = glue_command(compiler, torch_include, cuda_inc, shim)
        jobs[GLUE.name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cmd)
    yield jobs, out, glue_skip
    for proc, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _finish(job) -> None:
    proc, cmd = job
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"compile failed ({proc.returncode}):\n{' '.join(cmd)}\n{output}"


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files in {CUDA_DIR}"
    assert GLUE.exists()


@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_cu_file_compiles_for_sm80_and_sm90(compile_jobs, source):
    jobs, out, _ = compile_jobs
    _finish(jobs[source])
    obj = out / (Path(source).stem + ".o")
    assert obj.exists() and obj.stat().st_size > 0


def test_torch_glue_compiles(compile_jobs):
    jobs, _, glue_skip = compile_jobs
    if glue_skip:
        pytest.skip(f"cannot syntax-check {GLUE.name}: {glue_skip}")
    _finish(jobs[GLUE.name])
