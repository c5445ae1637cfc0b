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

from attention_cases import check_module_matches_reference, check_parity, conduction_layout, layout_cases, random_layout  # noqa: E402

import clear_kernels  # noqa: E402
from clear_kernels import SegmentLayout, ops, segment_attention  # noqa: E402
from clear_kernels.reference import segment_attention_reference  # noqa: E402

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
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_parity_causal(name, strided):
    _triton_usable()
    check_parity("triton", CASES[name], heads=2, head_dim=32, is_causal=True, strided=strided)


@CPU_DEVICE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_parity_causal_half(dtype):
    _triton_usable()
    for name in ("many_summary", "long_runs"):
        check_parity("triton", CASES[name], heads=2, head_dim=32, dtype=dtype, is_causal=True)


@CPU_DEVICE
def test_parity_causal_hypothesis_layouts():
    _triton_usable()
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None)
    @hypothesis.given(seed=st.integers(0, 10_000), length=st.integers(1, 70), max_seg=st.integers(1, 60),
                      p_summary=st.sampled_from([0.0, 0.1]))
    def check(seed, length, max_seg, p_summary):
        layout = random_layout(seed, batch=2, length=length, num_groups=2, max_seg=max_seg, p_summary=p_summary,
                               p_pad=0.1)
        check_parity("triton", layout, heads=2, head_dim=16, seed=seed, is_causal=True)

    check()


@CPU_DEVICE
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", ["conduction", "many_summary", "long_runs", "random_with_empty_row"])
def test_parity_grouped_query(name, is_causal, heads, kv_heads):
    """k and v with fewer heads: each query head reads head h // (H / H_kv); dk/dv sum the query heads of their
    group (in one program, in order), with and without the causal rule and summary tokens."""
    _triton_usable()
    check_parity("triton", CASES[name], heads=heads, head_dim=32, kv_heads=kv_heads, is_causal=is_causal)


@CPU_DEVICE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_parity_grouped_query_half_and_strided(dtype):
    """Grouped-query attention in half precision, with q and k/v as head views of separate projections."""
    _triton_usable()
    for name, is_causal in (("many_summary", False), ("long_runs", True)):
        check_parity("triton", CASES[name], heads=4, head_dim=40, dtype=dtype, kv_heads=2, is_causal=is_causal,
                     strided=True)


@CPU_DEVICE
def test_parity_grouped_query_hypothesis_layouts():
    _triton_usable()
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=6, deadline=None, derandomize=True, database=None)
    @hypothesis.given(seed=st.integers(0, 10_000), length=st.integers(1, 50), max_seg=st.integers(1, 30),
                      p_summary=st.sampled_from([0.0, 0.1, 0.3]), kv_heads=st.sampled_from([1, 2]),
                      is_causal=st.booleans())
    def check(seed, length, max_seg, p_summary, kv_heads, is_causal):
        layout = random_layout(seed, batch=2, length=length, num_groups=2, max_seg=max_seg, p_summary=p_summary,
                               p_pad=0.1)
        check_parity("triton", layout, heads=4, head_dim=16, seed=seed, kv_heads=kv_heads, is_causal=is_causal)

    check()


@CPU_DEVICE
@pytest.mark.parametrize("split", [False, True], ids=["fused_walk", "split_walk"])
def test_both_backward_walks(split, monkeypatch):
    """The backward's two variants (one walk per tile for dq and dk/dv, or one for each; ``split_backward``
    picks by dtype and head dim on the GPU) on the same inputs, so each is tested whatever the dtype picks."""
    _triton_usable()
    from clear_kernels.triton_kernels import common
    monkeypatch.setattr(common, "FORCE_SPLIT", split)
    for name, is_causal, kv_heads in (("conduction", False, None), ("long_runs", True, None),
                                      ("many_summary", True, 1)):
        check_parity("triton", CASES[name], heads=2, head_dim=32, is_causal=is_causal, kv_heads=kv_heads)
    check_parity("triton", CASES["random_mixed"], heads=2, head_dim=32, dtype=torch.bfloat16, seed=4)


@CPU_DEVICE
def test_direct_op_call_with_heads_that_do_not_divide_is_refused():
    _triton_usable()
    layout = CASES["conduction"]
    q = torch.randn(layout.batch_size, 3, layout.seq_len, 16)
    with pytest.raises(ValueError, match="must be a multiple of k's 2"):
        ops.op("triton", "fwd")(q, q[:, :2], q[:, :2], *layout.kernel_args(), 0.25)


def test_split_backward_choice():
    from clear_kernels.triton_kernels.common import split_backward
    assert split_backward(torch.float32, 96) and split_backward(torch.bfloat16, 256)
    assert not split_backward(torch.bfloat16, 96) and not split_backward(torch.float16, 128)


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
@pytest.mark.parametrize("tile", [(32, 32), (64, 16), (16, 64)], ids=lambda t: f"m{t[0]}_n{t[1]}")
def test_parity_other_tile_shapes(tile, monkeypatch):
    """The tile shapes the GPU autotuner may pick (the interpreter otherwise runs one fixed shape); BLOCK_N is
    also the chunk of the summary programs' walk over a lead."""
    _triton_usable()
    from clear_kernels.triton_kernels import common
    block_m, block_n = tile
    monkeypatch.setitem(common.INTERPRET_TILE, "BLOCK_M", block_m)
    monkeypatch.setitem(common.INTERPRET_TILE, "BLOCK_N", block_n)
    for name in ("conduction", "long_runs", "many_summary"):
        check_parity("triton", CASES[name], heads=1, head_dim=40, seed=block_m)


@CPU_DEVICE
@pytest.mark.parametrize("head_dim, dtype", [(24, torch.float32), (128, torch.float32), (256, torch.bfloat16)],
                         ids=["d24_float32", "d128_float32", "d256_bfloat16"])
def test_parity_edge_shapes(head_dim, dtype):
    """One-token sequences (a segment, a summary token, padding) and the largest head dims per dtype / an odd one."""
    _triton_usable()
    for ids in ([[0], [-1]], [[-2], [-1]]):
        check_parity("triton", SegmentLayout.from_ids(torch.tensor(ids)), heads=1, head_dim=head_dim, dtype=dtype)
    check_parity("triton", CASES["random_mixed"], heads=1, head_dim=head_dim, dtype=dtype, seed=3)


@CPU_DEVICE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["conduction", "many_summary", "random_with_empty_row"])
def test_parity_strided_views(name, dtype):
    """q, k, v as head views of one projection and a transposed output gradient: read in place, no copies."""
    _triton_usable()
    check_parity("triton", CASES[name], heads=2, head_dim=40, dtype=dtype, seed=5, strided=True)


def test_strided_views_are_not_copied():
    from attention_cases import strided_views

    from clear_kernels.triton_kernels.common import unit_stride
    base = torch.randn(4, 2, 6, 8)
    (q, k, v), dout = strided_views(base, base + 1, base + 2, base)
    assert all(unit_stride(t) is t for t in (q, k, v, dout))
    # Each tensor keeps its own strides: a contiguous k beside strided q and v is not a reason to copy them.
    assert unit_stride(base) is base
    # A D stride other than 1: copied to contiguous.
    assert unit_stride(base.transpose(2, 3)).is_contiguous()


@CPU_DEVICE
def test_module_with_projection_views():
    """SegmentAttention's heads reach the kernel as views of its projection; output and every gradient match
    the same module on the reference backend."""
    _triton_usable()
    check_module_matches_reference("triton", heads=2, atol=2e-4)


@CPU_DEVICE
def test_output_has_the_memory_of_b_l_h_d():
    """Merging the heads after attention (what every multi-head module does next) is a view, not a copy."""
    _triton_usable()
    from einops import rearrange
    layout = CASES["conduction"]
    q = torch.randn(layout.batch_size, 2, layout.seq_len, 16)
    out = segment_attention(q, q, q, layout, backend="triton")
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert rearrange(out, "b h l d -> b l (h d)").data_ptr() == out.data_ptr()


def test_launch_limits_are_clear_errors():
    from clear_kernels.triton_kernels.common import check_limits
    with pytest.raises(ValueError, match="at most 65535 batch"):
        check_limits(torch.empty(70_000, 1, 4, 16, device="meta"), 0)
    with pytest.raises(ValueError, match="at most 65535 batch elements and 65535 heads"):
        check_limits(torch.empty(1, 70_000, 4, 16, device="meta"), 0)
    check_limits(torch.empty(2, 3, 4, 16, device="meta"), 3)  # fits
    long = torch.empty_strided((1, 1, 2**22, 16), (1, 1, 1024, 1), device="meta")
    with pytest.raises(ValueError, match="spans"):
        check_limits(long, 0)


def test_size_bucket_and_pinned_switch():
    """The autotune key's size classes, and CLEAR_KERNELS_TRITON_AUTOTUNE=0 giving plain (pinned) kernels in a
    process that compiles (no interpreter)."""
    import subprocess
    import sys

    from clear_kernels.triton_kernels.common import size_bucket
    assert [size_bucket(n) for n in (1, 2**15 - 1, 2**15, 256 * 8 * 192, 2**24)] == [0, 0, 1, 2, 3]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = ("import triton; from clear_kernels.triton_kernels import common, forward, backward; "
             "kinds = {type(k).__name__ for k in (forward._fwd, backward._bwd)}; "
             "import torch; print(common.AUTOTUNE, sorted(kinds), common.launch_config('_bwd', torch.bfloat16))")
    for value, expected in (("0", "False ['JITFunction']"), ("1", "True ['Autotuner']")):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(CLEAR_KERNELS_TRITON_AUTOTUNE=value, PYTHONPATH=root)
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith(expected), done.stdout
        if value == "0":
            assert "'BLOCK_M': 16" in done.stdout and "'num_warps'" in done.stdout


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
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_opcheck_causal(kv_heads):
    _triton_usable()
    layout = conduction_layout(3, batch=1, leads=3, beats=3)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, layout.seq_len, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, layout.seq_len, 16, generator=gen, requires_grad=True) for _ in range(2))
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
    assert "would spill registers" in refuse(torch.empty(1, 1, 4, 160))
    assert refuse(torch.empty(1, 1, 4, 160, dtype=torch.bfloat16)) is None
    assert refuse(torch.empty(1, 1, 4, 128)) is None


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


@pytest.mark.slow
def test_kernels_compile_without_spills(tmp_path):
    """The interpreter never compiles: build both kernels, causal and not, for sm_90 and sm_80 with Triton's
    bundled ptxas (no GPU needed), in every config the autotuner may try at the CLEAR head dim and in the pinned
    config, and check that everything stays in registers."""
    import json
    import subprocess
    import sys

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    missing = [t for t in ("ptxas", "cuobjdump") if not os.path.exists(os.path.join(tools, t))]
    if missing:
        pytest.skip(f"this Triton build does not bundle {', '.join(missing)}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    script = os.path.join(root, "bench", "triton_compile_report.py")
    # The configs the autotuner may try at CLEAR's head dim; the pinned ones at small head dims, and in half
    # precision at the widest (float32 stops at 128: its backward would spill past it, the backend refuses it).
    runs = {"tuned": ["--all-configs", "--head-dims", "96", "--dtypes", "bfloat16,float32"],
            "pinned": ["--head-dims", "32,64", "--dtypes", "bfloat16,float32"],
            "pinned_wide": ["--head-dims", "256", "--dtypes", "bfloat16"]}
    procs = {}
    for name, extra in runs.items():
        cmd = [sys.executable, script, "--arch", "90,80", "--causal", "--json", str(tmp_path / f"{name}.json"),
               *extra]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    from clear_kernels.triton_kernels import common
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output[-3000:]
        rows = json.loads((tmp_path / f"{name}.json").read_text())
        if name == "tuned":
            expected = sum(len(common.tuned_configs("_" + k, 96, dt)) for k in ("fwd", "bwd")
                           for dt in (torch.bfloat16, torch.float32))
            assert len(rows) == 2 * 2 * expected  # two archs, causal and not
        spilled = [(r["arch"], r["kernel"], r["dtype"], r["head_dim"], r["config"], r["num_warps"], r["stack_bytes"])
                   for r in rows if (r["stack_bytes"] or 0) + (r["local_bytes"] or 0) > 0]
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
def test_gpu_parity_causal(dtype):
    _triton_usable()
    packed = SegmentLayout.block_diagonal([[700, 20, 1300, 28], [2000, 48, 0, 0]])
    for layout in (CASES["many_summary"], CASES["long_runs"], packed):
        check_parity("triton", layout, heads=8, head_dim=128, dtype=dtype, device="cuda", is_causal=True)
    check_parity("triton", packed, heads=4, head_dim=96, dtype=dtype, device="cuda", is_causal=True, strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_parity_grouped_query(dtype):
    _triton_usable()
    packed = SegmentLayout.block_diagonal([[700, 20, 1300, 28], [2000, 48, 0, 0]])
    for layout, is_causal in ((CASES["many_summary"], False), (packed, True), (CASES["long_runs"], True)):
        check_parity("triton", layout, heads=8, head_dim=128, dtype=dtype, device="cuda", is_causal=is_causal,
                     kv_heads=2)
    check_parity("triton", packed, heads=4, head_dim=96, dtype=dtype, device="cuda", is_causal=True, kv_heads=1,
                 strided=True)


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
def test_gpu_deterministic_over_record_lengths():
    _triton_usable()
    fwd, bwd = ops.op("triton", "fwd"), ops.op("triton", "bwd")
    for beats in (15, 40, 150):
        layout = conduction_layout(beats, batch=4, leads=12, beats=beats).to("cuda")
        q, k, v, dout = (torch.randn(4, 8, layout.seq_len, 96, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        args = layout.kernel_args()
        out, lse = fwd(q, k, v, *args, 0.1)
        grads = bwd(dout, q, k, v, out, lse, *args, 0.1)
        again = bwd(dout, q, k, v, *fwd(q, k, v, *args, 0.1), *args, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gpu_parity_strided_views(dtype):
    """The module's case on the GPU: q, k, v as views of one projection, a transposed output gradient."""
    _triton_usable()
    for name in ("conduction", "many_summary"):
        check_parity("triton", CASES[name], heads=4, head_dim=96, dtype=dtype, device="cuda", strided=True)


@pytest.mark.gpu
def test_gpu_launch_on_a_device_that_is_not_current():
    """Tensors on the last GPU while device 0 is current: the launcher makes the tensors' device current. With
    one GPU this is the current device itself, and the check is that the guard leaves the current device as it
    found it."""
    _triton_usable()
    last = torch.cuda.device_count() - 1
    before = torch.cuda.current_device()
    check_parity("triton", CASES["conduction"], heads=2, head_dim=64, dtype=torch.float16, device=f"cuda:{last}")
    assert torch.cuda.current_device() == before


@pytest.mark.gpu
def test_gpu_opcheck():
    _triton_usable()
    layout = conduction_layout(3, batch=2, leads=4, beats=5).to("cuda")
    q, k, v = (torch.randn(2, 2, layout.seq_len, 40, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    torch.library.opcheck(ops.op("triton", "fwd"), (q, k, v, *layout.kernel_args(), 0.25))
