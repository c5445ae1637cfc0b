"""Builds the native extension clear_kernels._C from csrc/ against the installed PyTorch.

Build without isolation so the extension matches the torch you run: ``pip install --no-build-isolation .``

Environment variables:
  CLEAR_KERNELS_NO_EXT=1      skip the native extension (the package then uses Triton or the reference)
  CLEAR_KERNELS_FORCE_CUDA=1  build the CUDA kernels even when torch is not a CUDA build (needs nvcc)
  TORCH_CUDA_ARCH_LIST        the GPU architectures to compile for, as torch understands it
"""

import glob
import os

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def native_extensions():
    if _flag("CLEAR_KERNELS_NO_EXT"):
        print("clear_kernels: CLEAR_KERNELS_NO_EXT is set, not building the native extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragmas must be compiled here.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    with_cuda = _flag("CLEAR_KERNELS_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "clear_kernels._C", sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("clear_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"clear_kernels: building the native extension ({'CPU + CUDA' if with_cuda else 'CPU'}) against torch "
          f"{torch.__version__}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
