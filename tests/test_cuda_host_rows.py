"""The CUDA kernels' row algorithms, run on the host: the same key walk, online softmax and backward formulas.

``csrc/cuda/segment_attention_rows.cuh`` holds everything a GPU warp does for one row except the lane reductions
and the launch mapping. ``tests/csrc/segment_attention_host_rows.cpp`` builds it with the host compiler and runs
every row on one host "lane"; here it becomes a test-only op pair on CPU tensors and goes through the same
``check_parity`` as every backend. So the CUDA kernel logic is tested on machines without a GPU; what is left for
``test_cuda_kernel.py`` (GPU only) is the warp mapping, the shuffles and the PyTorch glue.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from attention_cases import check_parity, conduction_layout, layout_cases, random_layout
from cuda_toolkit import cuda_include_dir

import clear_kernels
from clear_kernels import dispatch, ops

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "csrc" / "segment_attention_host_rows.cpp"
KERNEL_DIR = ROOT / "csrc" / "cuda"
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_LIB: ctypes.CDLL | None = None


@pytest.fixture(scope="module", autouse=True)
def host_rows_library(tmp_path_factory):
    """Compile the harness once per module (a few seconds)."""
    global _LIB
    include = cuda_include_dir()
    compiler = shutil.which("g++") or shutil.which("c++")
    if include is None or compiler is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers (cuda_fp16.h) to build the host harness")
    target = tmp_path_factory.mktemp("host_rows") / "libhost_rows.so"
    cmd = [compiler, "-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", "-Wall", "-Werror",
           f"-I{include}", f"-I{KERNEL_DIR}",
           str(HARNESS), "-o", str(target)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the host harness failed:\n{' '.join(cmd)}\n{done.stderr}"
    _LIB = ctypes.CDLL(str(target))
    yield _LIB
    _LIB = None


def _ids(layout_tensors) -> ctypes.Array:
    return (ctypes.c_void_p * 8)(*[t.data_ptr() for t in layout_tensors])


def _dims(q, k, layout_tensors):
    batch, heads, length, head_dim = q.shape
    num_groups = layout_tensors[5].shape[1] - 1
    max_summary = layout_tensors[6].shape[1]
    return num_groups, max_summary, batch, heads, k.shape[1], length, head_dim


def _split(rest):
    """The layout tensors, scale and is_causal of an op call (a trailing is_causal=False is left out)."""
    layout, scale, *flags = rest[:ops.NUM_LAYOUT_TENSORS], *rest[ops.NUM_LAYOUT_TENSORS:]
    return layout, scale, bool(flags[0]) if flags else False


def _host_pair(simulate_warp: int):
    """The (fwd, bwd) implementations of one executor: 0 serial, 1 simulated 32-lane warp."""

    def fwd(q, k, v, *rest):
        layout, scale, causal = _split(rest)
        q, k, v = (t.contiguous() for t in (q, k, v))
        out = ops.new_output_like(q)
        lse = ops.new_output(q.shape[:3], dtype=torch.float32)
        status = _LIB.host_rows_forward(
            KINDS[q.dtype], simulate_warp, *(ctypes.c_void_p(t.data_ptr()) for t in (q, k, v, out, lse)),
            _ids(layout), *_dims(q, k, layout), ctypes.c_float(scale), int(causal))
        assert status == 0
        return out, lse

    def bwd(grad_out, q, k, v, out, lse, *rest):
        layout, scale, causal = _split(rest)
        tensors = [t.contiguous() for t in (grad_out, q, k, v, out)]
        delta = torch.empty_like(lse)
        grads = [ops.new_output_like(t) for t in tensors[1:4]]
        status = _LIB.host_rows_backward(
            KINDS[q.dtype], simulate_warp,
            *(ctypes.c_void_p(t.data_ptr()) for t in tensors + [lse.contiguous(), delta] + grads),
            _ids(layout), *_dims(q, tensors[2], layout), ctypes.c_float(scale), int(causal))
        assert status == 0
        return tuple(grads)

    return fwd, bwd


EXECUTORS = {"serial": ("cuda_host_serial", 0), "warp": ("cuda_host_warp", 1)}
for _prefix, _simulate in EXECUTORS.values():
    if not hasattr(getattr(torch.ops, ops.NAMESPACE), f"{_prefix}_fwd"):
        _fwd_name, _bwd_name = ops.define_pair(_prefix)
        _fwd_impl, _bwd_impl = _host_pair(_simulate)
        torch.library.impl(_fwd_name, "CPU", lib=ops._library)(_fwd_impl)
        torch.library.impl(_bwd_name, "CPU", lib=ops._library)(_bwd_impl)


def _as_cuda(monkeypatch, executor: str) -> None:
    """check_parity resolves its backend through dispatch.select; point "cuda" at a host executor."""
    backend = dispatch.Backend("cuda", EXECUTORS[executor][0], ("cpu",), lambda q: None)
    monkeypatch.setattr(clear_kernels.dispatch, "select", lambda name, q, features=frozenset(): backend)


@pytest.fixture
def host_as_cuda(monkeypatch):
    _as_cuda(monkeypatch, "serial")


@pytest.fixture
def warp_as_cuda(monkeypatch):
    _as_cuda(monkeypatch, "warp")


CASES = layout_cases()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_key_walk_is_the_mask(name, causal):
    """Each token's walk lists exactly the keys the mask allows, each once; its walk as a key lists exactly the
    queries that attend it (the mask's column), which the dk/dv pass relies on."""
    layout = CASES[name]
    tensors = layout.kernel_args()
    mask = layout.materialize(causal)
    keys = (ctypes.c_int32 * layout.seq_len)()
    for b in range(layout.batch_size):
        for t in range(layout.seq_len):
            for as_key, allowed in ((0, mask[b, t]), (1, mask[b, :, t])):
                n = _LIB.host_rows_key_walk(_ids(tensors), layout.num_groups, layout.max_summary, layout.seq_len, b,
                                            t, int(causal), as_key, keys)
                walked = list(keys[:n])
                assert len(walked) == len(set(walked)), f"{name}: token ({b}, {t}) walks a key twice: {walked}"
                expected = torch.nonzero(allowed).flatten().tolist()
                assert sorted(walked) == expected, (f"{name}: token ({b}, {t}) as_key={as_key} walks "
                                                    f"{sorted(walked)}, mask {expected}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_layout_cases(host_as_cuda, name, dtype):
    check_parity("cuda", CASES[name], dtype=dtype, head_dim=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("is_causal, kv_heads", [(True, None), (False, 2), (True, 1)],
                         ids=["causal", "gqa", "causal_mqa"])
def test_parity_causal_gqa(host_as_cuda, name, dtype, is_causal, kv_heads):
    check_parity("cuda", CASES[name], dtype=dtype, head_dim=32, heads=4, is_causal=is_causal, kv_heads=kv_heads)


@pytest.mark.parametrize("head_dim", [16, 40, 96, 128, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_head_dims(host_as_cuda, head_dim, dtype):
    check_parity("cuda", conduction_layout(7, batch=2, leads=6, beats=3), dtype=dtype, head_dim=head_dim, heads=3)


@pytest.mark.parametrize("seed", range(8))
def test_parity_random_layouts(host_as_cuda, seed):
    layout = random_layout(100 + seed, batch=3, length=48, num_groups=1 + seed % 4, p_summary=0.05 * (seed % 5))
    check_parity("cuda", layout, dtype=torch.float32, head_dim=24 + 8 * seed, seed=seed, scale=0.3 + 0.1 * seed)


def test_backward_is_deterministic():
    layout = CASES["conduction"]
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(2, 2, layout.seq_len, 64) for _ in range(4))
    fwd, bwd = ops.op("cuda_host_warp", "fwd"), ops.op("cuda_host_warp", "bwd")
    out, lse = fwd(q, k, v, *layout.kernel_args(), 0.125)
    first = bwd(dout, q, k, v, out, lse, *layout.kernel_args(), 0.125)
    second = bwd(dout, q, k, v, out, lse, *layout.kernel_args(), 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# The simulated warp is slow (two barrier waits of 32 threads per reduction), so it gets a focused set: the
# head-dim buckets (1, 2, 3, 4, 6 and 8 elements per lane, with masked tails) and the layouts with summary tokens,
# padding rows and long runs.
@pytest.mark.parametrize("head_dim", [16, 40, 64, 96, 128, 160, 256])
def test_simulated_warp_head_dims(warp_as_cuda, head_dim):
    check_parity("cuda", CASES["random_with_empty_row"], dtype=torch.float32, head_dim=head_dim, heads=1)


@pytest.mark.parametrize("name", ["conduction", "many_summary", "long_runs", "block_diagonal_zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_simulated_warp_layouts(warp_as_cuda, name, dtype):
    check_parity("cuda", CASES[name], dtype=dtype, head_dim=96, heads=1)


@pytest.mark.parametrize("name", ["many_summary", "long_runs"])
def test_simulated_warp_causal_gqa(warp_as_cuda, name):
    check_parity("cuda", CASES[name], dtype=torch.float32, head_dim=40, heads=2, kv_heads=1, is_causal=True)
