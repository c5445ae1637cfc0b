"""The Triton kernels against the float64 dense reference.

Without a GPU they run on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest
before Triton is imported); shapes stay small because the interpreter executes every program in NumPy. The
``gpu`` tests run the same checks on CUDA, plus ``torch.compile``.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: the Triton backend is unavailable")

import clear_kernels  # noqa: E402
from clear_kernels import SegmentLayout, ops, segment_attention  # noqa: E402
from clear_kernels.reference import segment_attention_reference  # noqa: E402

from attention_cases import check_parity, conduction_layout, layout_cases, random_layout  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CASES = layout_cases()
CPU_DEVICE = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1 (set by conftest)")


def _triton_usable():
    reason = clear_kernels.available_backends().get("triton")
    if reason is not None:
        pytest.skip(f"the triton backend is unavailable: {reason}")


# ------------------------------------------------------------------------------------ interpreter parity
@CPU_DEVICE
@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_float32_head_dim_32(name):
    _triton_usable()
    check_parity("triton", CASES[name], heads=2, head_dim=32, dtype=torch.float32)


@CPU_DEVICE
@pytest.mark.parametrize("head_dim", [16, 40, 96])
@pytest.mark.parametrize("name", ["conduction", "many_summary", "random_with_empty_row", "long_runs"])
def test_parity_float32_other_head_dims(name, head_dim):
    # 40 and 96 are not powers of two: the kernels pad them to 64 and 128 with masks.
    _triton_usable()
    check_parity("triton", CASES[name], heads=1, head_dim=head_dim, dtype=torch.float32, seed=head_dim)


@CPU_DEVICE
@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_parity_random_layouts(seed):
    _triton_usable()
    layout = random_layout(seed, batch=2, length=48, num_groups=1 + seed % 3, max_seg=4 + 3 * (seed % 4),
                           p_summary=0.05 * (seed % 4), p_pad=0.1)
    check_parity("triton", layout, heads=2, head_dim=32, seed=seed)


@CPU_DEVICE
def test_parity_hypothesis_layouts():
    """Random ids drawn by hypothesis (segments, summary tokens and padding anywhere, 1-3 groups)."""
    _triton_usable()
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None)
    @hypothesis.given(seed=st.integers(0, 10_000), length=st.integers(1, 40), groups=st.integers(1, 3),
                      max_seg=st.integers(1, 20), p_summary=st.sampled_from([0.0, 0.1, 0.4]))
    def check(seed, length, groups, max_seg, p_summary):
        layout = random_layout(seed, batch=2, length=length, num_groups=groups, max_seg=max_seg,
                               p_summary=p_summary, p_pad=0.1)
        check_parity("triton", layout, heads=1, head_dim=16, seed=seed)

    check()


@CPU_DEVICE
@pytest.mark.parametrize("name", ["conduction", "many_summary", "long_runs", "block_diagonal_zeros",
                                  "one_long_segment", "random_with_empty_row"])
@pytest.mark.parametrize("is_causal, heads, kv_heads", [(True, 2, None), (False, 2, 1), (True, 4, 2)],
                         ids=["causal", "mqa", "causal_gqa"])
def test_parity_causal_gqa(name, is_causal, heads, kv_heads):
    _triton_usable()
    check_parity("triton", CASES[name], heads=heads, head_dim=32, is_causal=is_causal, kv_heads=kv_heads)


@CPU_DEVICE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_parity_causal_gqa_half(dtype):
    _triton_usable()
    for name in ("many_summary", "long_runs"):
        check_parity("triton", CASES[name], heads=4, head_dim=32, dtype=dtype, is_causal=True, kv_heads=2)


@CPU_DEVICE
def test_parity_causal_gqa_hypothesis_layouts():
    _triton_usable()
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None)
    @hypothesis.given(seed=st.integers(0, 10_000), length=st.integers(1, 70), max_seg=st.integers(1, 60),
                      p_summary=st.sampled_from([0.0, 0.1]), is_causal=st.booleans(),
                      group_size=st.sampled_from([1, 2]))
    def check(seed, length, max_seg, p_summary, is_causal, group_size):
        layout = random_layout(seed, batch=2, length=length, num_groups=2, max_seg=max_seg, p_summary=p_summary,
                               p_pad=0.1)
        check_parity("triton", layout, heads=2 * group_size, kv_heads=2, head_dim=16, seed=seed,
                     is_causal=is_causal)

    check()


@CPU_DEVICE
@pytest.mark.parametrize("head_dim", [32, 96])
@pytest.mark.parametrize("name", ["conduction", "random_mixed", "one_token_segments"])
def test_parity_bfloat16(name, head_dim):
    _triton_usable()
    check_parity("triton", CASES[name], heads=1, head_dim=head_dim, dtype=torch.bfloat16, seed=1)


@CPU_DEVICE
@pytest.mark.parametrize("name", ["conduction", "many_summary"])
def test_parity_float16(name):
    _triton_usable()
    check_parity("triton", CASES[name], heads=1, head_dim=32, dtype=torch.float16, seed=2)


@CPU_DEVICE
def test_summary_only_and_custom_scale():
    """A row of summary tokens only (no segment query tile does anything), and a non-default scale."""
    _triton_usable()
    segment = torch.tensor([[-1, -1, 0, 0, -2, -1], [-1, -1, -1, -1, -1, -1]], dtype=torch.int32)
    group = torch.tensor([[0, 1, 1, 1, 0, 1], [0, 0, 1, 1, 0, 1]], dtype=torch.int32)
    check_parity("triton", SegmentLayout.from_ids(segment, group), heads=2, head_dim=16, scale=0.3)


@CPU_DEVICE
@pytest.mark.parametrize("tile", [(32, 32, 32), (64, 16, 64), (16, 64, 16)], ids=lambda t: "m%d_n%d_r%d" % t)
def test_parity_other_tile_shapes(tile, monkeypatch):
    """The tile shapes the GPU autotuner may pick (the interpreter otherwise runs one fixed shape)."""
    _triton_usable()
    from clear_kernels.triton_kernels import common
    block_m, block_n, row_n = tile
    monkeypatch.setitem(common.INTERPRET_TILE, "BLOCK_M", block_m)
    monkeypatch.setitem(common.INTERPRET_TILE, "BLOCK_N", block_n)
    monkeypatch.setitem(common.INTERPRET_ROW, "BLOCK_N", row_n)
    for name in ("conduction", "long_runs", "many_summary"):
        check_parity("triton", CASES[name], heads=1, head_dim=40, seed=block_m)


@CPU_DEVICE
@pytest.mark.parametrize("head_dim", [24, 256])
def test_parity_edge_shapes(head_dim):
    """One-token sequences (a segment, a summary token, padding) and the largest / an odd head dim."""
    _triton_usable()
    for ids in ([[0], [-1]], [[-2], [-1]]):
        check_parity("triton", SegmentLayout.from_ids(torch.tensor(ids)), heads=1, head_dim=head_dim)
    check_parity("triton", CASES["random_mixed"], heads=1, head_dim=head_dim, seed=3)


# -------------------------------------------------------------------------------------------- determinism
@CPU_DEVICE
def test_backward_is_deterministic():
    _triton_usable()
    layout = conduction_layout(7, batch=2, leads=6, beats=4)
    gen = torch.Generator().manual_seed(0)
    shape = (2, 2, layout.seq_len, 32)
    q, k, v, dout = (torch.randn(shape, generator=gen) for _ in range(4))
    fwd, bwd = ops.op("triton", "fwd"), ops.op("triton", "bwd")
    args = layout.kernel_args()
    out, lse = fwd(q, k, v, *args, 0.2)
    first = bwd(dout, q, k, v, out, lse, *args, 0.2)
    for _ in range(2):
        out2, lse2 = fwd(q, k, v, *args, 0.2)
        assert torch.equal(out, out2) and torch.equal(lse, lse2)
        again = bwd(dout, q, k, v, out2, lse2, *args, 0.2)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "the backward must be bitwise reproducible"


# ----------------------------------------------------------------------------- registration and module path
@CPU_DEVICE
def test_opcheck():
    _triton_usable()
    layout = conduction_layout(3, batch=1, leads=3, beats=3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, layout.seq_len, 16, generator=gen, requires_grad=True) for _ in range(3))
    torch.library.opcheck(ops.op("triton", "fwd"), (q, k, v, *layout.kernel_args(), 0.25))
    out, lse = ops.op("triton", "fwd")(q.detach(), k.detach(), v.detach(), *layout.kernel_args(), 0.25)
    torch.library.opcheck(ops.op("triton", "bwd"),
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                           *layout.kernel_args(), 0.25))


@CPU_DEVICE
def test_opcheck_causal_gqa():
    _triton_usable()
    layout = conduction_layout(3, batch=1, leads=3, beats=3)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, layout.seq_len, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 1, layout.seq_len, 16, generator=gen, requires_grad=True) for _ in range(2))
    torch.library.opcheck(ops.op("triton", "fwd"), (q, k, v, *layout.kernel_args(), 0.25, True))
    out, lse = ops.op("triton", "fwd")(q.detach(), k.detach(), v.detach(), *layout.kernel_args(), 0.25, True)
    torch.library.opcheck(ops.op("triton", "bwd"),
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                           *layout.kernel_args(), 0.25, True))


@CPU_DEVICE
def test_module_path_with_autograd():
    _triton_usable()
    layout = CASES["conduction_compact"]
    gen = torch.Generator().manual_seed(4)
    shape = (layout.batch_size, 2, layout.seq_len, 40)
    q, k, v = (torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3))
    out = segment_attention(q, k, v, layout, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = segment_attention_reference(q2, k2, v2, layout)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_refuses_unsupported_inputs():
    _triton_usable()
    from clear_kernels.triton_kernels.op import refuse
    assert "head dim 300" in refuse(torch.empty(1, 1, 4, 300))
    assert "head dim 8" in refuse(torch.empty(1, 1, 4, 8))
    assert "float64" in refuse(torch.empty(1, 1, 4, 32, dtype=torch.float64))
    assert refuse(torch.empty(1, 1, 4, 96)) is None


@CPU_DEVICE
def test_compile_fullgraph_interpreter():
    _triton_usable()
    layout = conduction_layout(5, batch=1, leads=3, beats=2)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, layout.seq_len, 16, generator=gen, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return segment_attention(q, k, v, layout, backend="triton").sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    value = compiled(q, k, v)
    grads = torch.autograd.grad(value, (q, k, v))
    expected = f(q, k, v)
    torch.testing.assert_close(value, expected)
    for g, e in zip(grads, torch.autograd.grad(expected, (q, k, v))):
        torch.testing.assert_close(g, e)


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The interpreter never compiles: build every kernel for sm_90 with Triton's bundled ptxas (no GPU needed)
    and check the default tiles of the CLEAR head dim keep everything in registers."""
    import json
    import subprocess
    import sys

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    missing = [t for t in ("ptxas", "cuobjdump") if not os.path.exists(os.path.join(tools, t))]
    if missing:
        pytest.skip(f"this Triton build does not bundle {', '.join(missing)}")
    report = tmp_path / "report.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, os.path.join(root, "bench", "triton_compile_report.py"), "--arch", "90",
                           "--head-dims", "96", "--dtypes", "bfloat16,float32", "--json", str(report)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(report.read_text())
    assert len(rows) == 12
    spilled = [(r["kernel"], r["dtype"], r["stack_bytes"]) for r in rows if r["stack_bytes"]]
    assert not spilled, f"register spills: {spilled}"


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_parity(name, dtype):
    _triton_usable()
    for head_dim in (32, 40, 96, 128):
        check_parity("triton", CASES[name], heads=2, head_dim=head_dim, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_parity_causal_gqa(dtype):
    _triton_usable()
    packed = SegmentLayout.block_diagonal([[700, 20, 1300, 28], [2000, 48, 0, 0]])
    for layout in (CASES["many_summary"], CASES["long_runs"], packed):
        check_parity("triton", layout, heads=8, kv_heads=2, head_dim=128, dtype=dtype, device="cuda",
                     is_causal=True)
    check_parity("triton", CASES["conduction"], heads=4, kv_heads=1, head_dim=96, dtype=dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_parity_long_records():
    _triton_usable()
    layout = conduction_layout(9, batch=3, leads=12, beats=60)
    for dtype in (torch.bfloat16, torch.float32):
        check_parity("triton", layout, heads=4, head_dim=96, dtype=dtype, device="cuda")
    check_parity("triton", SegmentLayout.block_diagonal([[700, 3, 300], [1, 1000, 2]]), heads=2, head_dim=64,
                 dtype=torch.float16, device="cuda")


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    _triton_usable()
    layout = conduction_layout(2, batch=2, leads=12, beats=10).to("cuda")
    q, k, v = (torch.randn(2, 4, layout.seq_len, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def f(q, k, v):
        return segment_attention(q, k, v, layout, backend="triton").float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    value = compiled(q, k, v)
    grads = torch.autograd.grad(value, (q, k, v))
    expected = f(q, k, v)
    torch.testing.assert_close(value, expected)
    for g, e in zip(grads, torch.autograd.grad(expected, (q, k, v))):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
def test_gpu_deterministic_and_no_retune_for_new_lengths():
    _triton_usable()
    from clear_kernels.triton_kernels import forward
    fwd, bwd = ops.op("triton", "fwd"), ops.op("triton", "bwd")
    tuned = []
    for beats in (15, 40, 150):
        layout = conduction_layout(beats, batch=4, leads=12, beats=beats).to("cuda")
        q, k, v, dout = (torch.randn(4, 8, layout.seq_len, 96, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        args = layout.kernel_args()
        out, lse = fwd(q, k, v, *args, 0.1)
        grads = bwd(dout, q, k, v, out, lse, *args, 0.1)
        again = bwd(dout, q, k, v, *fwd(q, k, v, *args, 0.1), *args, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))
        tuned.append(len(getattr(forward._fwd_segment_rows, "cache", {})))
    # The autotuner keys on the head dim and dtypes only: new record lengths reuse the first choice.
    assert tuned[0] == tuned[-1]


@pytest.mark.gpu
def test_gpu_opcheck():
    _triton_usable()
    layout = conduction_layout(3, batch=2, leads=4, beats=5).to("cuda")
    q, k, v = (torch.randn(2, 2, layout.seq_len, 40, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    torch.library.opcheck(ops.op("triton", "fwd"), (q, k, v, *layout.kernel_args(), 0.25))
