"""The CUDA backend on a GPU: parity with the float64 reference, determinism, streams, opcheck.

Skipped on machines without a CUDA GPU (conftest). The row algorithms themselves are also tested without a GPU
in ``test_cuda_host_rows.py``; these tests add the warp mapping, the shuffles, the launches and the PyTorch glue.
"""

from __future__ import annotations

import os

import pytest
import torch
from attention_cases import check_parity, conduction_layout, layout_cases, random_layout

from clear_kernels import SegmentLayout, dispatch, ops, segment_attention

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 32, 64, 96, 128, 256]
CASES = layout_cases()


@pytest.fixture(autouse=True)
def cuda_backend():
    """On a GPU (these tests only run on one) the backend must be there: an extension that failed to build or
    load fails every test here instead of skipping them, so a GPU run cannot pass without testing it.
    ``CLEAR_KERNELS_NO_EXT=1`` (built without the extension on purpose) skips them."""
    probe = torch.empty(1, 1, 1, 64, device="cuda")
    reason = dispatch.why_not("cuda", probe)
    if reason is None:
        return
    if os.environ.get("CLEAR_KERNELS_NO_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip(f"CLEAR_KERNELS_NO_EXT is set: the 'cuda' backend is not built ({reason})")
    pytest.fail(f"the 'cuda' backend is not usable on this GPU machine: {reason} (build it in place with "
                "`python setup.py build_ext --inplace` against a CUDA build of torch)", pytrace=False)


def _inputs(layout: SegmentLayout, heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (layout.batch_size, heads, layout.seq_len, head_dim)
    return [torch.randn(shape, generator=gen, device="cuda", dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_layout_cases(name, dtype):
    check_parity("cuda", CASES[name], device="cuda", dtype=dtype, head_dim=64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("is_causal, kv_heads", [(True, None), (False, 2), (True, 1)],
                         ids=["causal", "gqa", "causal_mqa"])
def test_parity_causal_gqa(name, dtype, is_causal, kv_heads):
    check_parity("cuda", CASES[name], device="cuda", dtype=dtype, head_dim=64, heads=4, is_causal=is_causal,
                 kv_heads=kv_heads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_packed_causal_documents(dtype):
    layout = SegmentLayout.block_diagonal([[700, 20, 1300, 28], [2000, 48, 0, 0]])
    check_parity("cuda", layout, device="cuda", dtype=dtype, head_dim=128, heads=8, kv_heads=2, is_causal=True)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_head_dims(head_dim, dtype):
    check_parity("cuda", conduction_layout(3, batch=2, leads=12, beats=5), device="cuda", dtype=dtype,
                 head_dim=head_dim, heads=3)


@pytest.mark.parametrize("head_dim", [40, 72, 160, 200])
def test_parity_head_dims_not_multiple_of_32(head_dim):
    check_parity("cuda", CASES["random_mixed"], device="cuda", dtype=torch.float32, head_dim=head_dim)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_random_layouts(seed, dtype):
    layout = random_layout(1000 + seed, batch=3, length=96, num_groups=1 + seed % 5, p_summary=0.03 * (seed % 6),
                           max_seg=4 + seed)
    check_parity("cuda", layout, device="cuda", dtype=dtype, head_dim=HEAD_DIMS[seed % len(HEAD_DIMS)], seed=seed,
                 scale=0.05 + 0.05 * seed)


def test_parity_long_record():
    """150 beats x 12 leads + 12 summary tokens (L = 1812): summary rows walk ~150 keys."""
    check_parity("cuda", conduction_layout(9, batch=1, leads=12, beats=150, p_valid=0.9), device="cuda",
                 dtype=torch.bfloat16, head_dim=96, heads=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_deterministic(dtype):
    layout = conduction_layout(4, batch=2, leads=12, beats=20).to("cuda")
    q, k, v, dout = _inputs(layout, 4, 96, dtype)
    fwd, bwd = ops.op("native", "fwd"), ops.op("native", "bwd")
    out, lse = fwd(q, k, v, *layout.kernel_args(), 0.1)
    out2, lse2 = fwd(q, k, v, *layout.kernel_args(), 0.1)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    first = bwd(dout, q, k, v, out, lse, *layout.kernel_args(), 0.1)
    for _ in range(3):
        again = bwd(dout, q, k, v, out, lse, *layout.kernel_args(), 0.1)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_runs_on_the_current_stream():
    layout = CASES["conduction"].to("cuda")
    q, k, v, _ = _inputs(layout, 2, 64, torch.float16)
    expected = segment_attention(q, k, v, layout, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = segment_attention(q, k, v, layout, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd_through_the_public_op(dtype):
    layout = CASES["many_summary"].to("cuda")
    q, k, v, dout = _inputs(layout, 2, 96, dtype, seed=3)
    grads = {}
    for backend in ("cuda", "reference"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = segment_attention(*leaves, layout, backend=backend)
        grads[backend] = (out, *torch.autograd.grad(out, leaves, dout))
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for got, want in zip(grads["cuda"], grads["reference"]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_opcheck():
    layout = CASES["conduction"].to("cuda")
    q, k, v, dout = _inputs(layout, 2, 32, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(ops.op("native", "fwd"), (*leaves, *layout.kernel_args(), 0.2))
    out, lse = ops.op("native", "fwd")(q, k, v, *layout.kernel_args(), 0.2)
    torch.library.opcheck(ops.op("native", "bwd"), (dout, q, k, v, out, lse, *layout.kernel_args(), 0.2))


def test_rejects_bad_inputs():
    layout = CASES["conduction"].to("cuda")
    q, k, v, _ = _inputs(layout, 2, 32, torch.float32)
    fwd = ops.op("native", "fwd")
    with pytest.raises(RuntimeError, match="head dim"):
        big = torch.zeros(*q.shape[:3], 300, device="cuda")
        fwd(big, big, big, *layout.kernel_args(), 0.1)
    with pytest.raises((RuntimeError, TypeError), match="dtype"):
        fwd(q, k.half(), v, *layout.kernel_args(), 0.1)
    args = list(layout.kernel_args())
    args[0] = args[0].long()
    with pytest.raises((RuntimeError, TypeError), match="int32"):
        fwd(q, k, v, *args, 0.1)


@pytest.mark.parametrize("field, index, value, match", [
    ("group_index", (0, 0), 10_000, "is not a non-padding token"),
    ("seg_end", None, 10_000, "do not contain it"),
    ("group", (0, 0), 99, "outside \\[0, num_groups"),
    ("summary_index", (0, 0), -5, "is not a summary token"),
])
def test_rejects_layout_values_out_of_range(field, index, value, match):
    """The glue range-checks the layout's values on the host (csrc/layout_check.h) before a kernel indexes
    memory with them, as the CPU backend does."""
    layout = CASES["conduction"]
    names = ("segment", "group", "seg_start", "seg_end", "group_index", "group_offsets", "summary_index",
             "summary_offsets")
    args = [t.clone() for t in layout.kernel_args()]
    target = args[names.index(field)]
    if index is None:  # the first segment token
        index = tuple(int(i) for i in torch.nonzero(layout.segment >= 0)[0])
    target[index] = value
    args = [t.to("cuda") for t in args]
    q, k, v, _ = _inputs(layout, 2, 32, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        ops.op("native", "fwd")(q, k, v, *args, 0.1)
    out, lse = ops.op("native", "fwd")(q, k, v, *[t.to("cuda") for t in layout.kernel_args()], 0.1)
    with pytest.raises(RuntimeError, match=match):
        ops.op("native", "bwd")(out, q, k, v, out, lse, *args, 0.1)


def test_rejects_a_scale_that_overflows_float32():
    layout = CASES["conduction"].to("cuda")
    q, k, v, _ = _inputs(layout, 2, 32, torch.float32)
    with pytest.raises(RuntimeError, match="overflows float32"):
        ops.op("native", "fwd")(q, k, v, *layout.kernel_args(), 3e38)
