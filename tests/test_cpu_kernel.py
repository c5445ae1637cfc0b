"""The C++ CPU kernel (backend "cpu", op pair clear_kernels::native_*): parity with the float64 dense reference,
determinism, input checks of the registered op, and the torch.library / autograd / torch.compile integration."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from attention_cases import check_module_matches_reference, check_parity, conduction_layout, layout_cases, random_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clear_kernels
from clear_kernels import SegmentLayout, native, ops, segment_attention

pytestmark = pytest.mark.skipif(not native.has_kernel("CPU"), reason=f"no CPU kernel: {native.EXTENSION_ERROR}")

CASES = layout_cases()
FWD = ops.op("native", "fwd")
BWD = ops.op("native", "bwd")


UNSUPPORTED_ISA = "but this CPU does not support it"


def _supported_isas() -> list[str]:
    """Every kernel table this CPU can run. Only the op's own "this CPU does not support it" refusal of avx2 or
    avx512 leaves a table out; any other error (a broken table, generic refused) propagates and fails."""
    found = []
    q = torch.randn(1, 1, 4, 16)
    layout = SegmentLayout.block_diagonal([[4]])
    for isa in ("generic", "avx2", "avx512"):
        os.environ["CLEAR_KERNELS_CPU_ISA"] = isa
        try:
            FWD(q, q, q, *layout.kernel_args(), 0.25)
            found.append(isa)
        except RuntimeError as exc:
            if isa == "generic" or UNSUPPORTED_ISA not in str(exc):
                raise
        finally:
            del os.environ["CLEAR_KERNELS_CPU_ISA"]
    return found


def test_supported_isas_does_not_hide_a_broken_table(monkeypatch):
    """A table that fails must fail the suite, not drop out of the parametrisation as a skip."""
    def fail_with(message):
        def fwd(*args):
            raise RuntimeError(message)
        return fwd

    this_module = sys.modules[__name__]
    monkeypatch.setattr(this_module, "FWD", fail_with("kernel table crashed"))
    with pytest.raises(RuntimeError, match="kernel table crashed"):
        _supported_isas()
    monkeypatch.setattr(this_module, "FWD", fail_with(f"CLEAR_KERNELS_CPU_ISA=generic {UNSUPPORTED_ISA}"))
    with pytest.raises(RuntimeError, match=UNSUPPORTED_ISA):  # the generic table runs everywhere
        _supported_isas()


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_layout_cases(name, dtype):
    check_parity("cpu", CASES[name], heads=2, head_dim=32, dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128])
@pytest.mark.parametrize("name", ["conduction", "random_mixed", "long_runs"])
def test_parity_head_dims(name, head_dim, dtype):
    check_parity("cpu", CASES[name], heads=2, head_dim=head_dim, dtype=dtype, seed=head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal, kv_heads", [(False, None), (True, None), (False, 1), (True, 2)],
                         ids=["mha", "causal", "mqa", "causal_gqa"])
@pytest.mark.parametrize("name", ["conduction", "many_summary", "random_with_empty_row", "long_runs"])
def test_parity_strided_views(name, causal, kv_heads, dtype):
    """q, k, v as head views of a projection ([B, L, 3, H, D], or q apart from a [B, L, 2, H_kv, D] k/v) and a
    transposed output gradient, read in place."""
    check_parity("cpu", CASES[name], heads=4, head_dim=32, dtype=dtype, seed=7, strided=True, is_causal=causal,
                 kv_heads=kv_heads)


def test_parity_strided_rows_of_several_chunks():
    # Rows longer than one task's chunk of positions, strided, with summary tokens: the backward's summary phase.
    layout = conduction_layout(3, batch=2, leads=12, beats=30)
    assert layout.seq_len > 256
    check_parity("cpu", layout, heads=2, head_dim=16, strided=True, kv_heads=1)


def test_inputs_strided_along_d_and_expanded_gradients():
    # A transposed (D-strided) q and a broadcast output gradient (stride 0 everywhere, as sum().backward() gives):
    # copied to rows the kernel can read, same results as contiguous inputs.
    layout = CASES["many_summary"]
    gen = torch.Generator().manual_seed(0)
    shape = (layout.batch_size, 2, layout.seq_len, 16)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    q_t = q.transpose(2, 3).contiguous().transpose(2, 3)
    ones = torch.ones(()).expand(shape)
    args = (*layout.kernel_args(), 0.25)
    out, lse = FWD(q, k, v, *args)
    out_t, lse_t = FWD(q_t, k, v, *args)
    assert torch.equal(out, out_t) and torch.equal(lse, lse_t)
    want = BWD(ones.contiguous(), q, k, v, out, lse, *args)
    for got, ref in zip(BWD(ones, q_t, k, v, out, lse, *args), want):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "mqa"])
def test_results_are_token_major(kv_heads):
    """The output and every gradient have the memory of [B, L, H, D]: merging the heads after attention, and the
    gradient of a fused projection, are views, not copies."""
    from einops import rearrange
    layout = CASES["conduction"]
    q = torch.randn(layout.batch_size, 2, layout.seq_len, 16)
    k = torch.randn(layout.batch_size, kv_heads, layout.seq_len, 16)
    out, lse = FWD(q, k, k, *layout.kernel_args(), 0.25)
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous()
    assert rearrange(out, "b h l d -> b l (h d)").data_ptr() == out.data_ptr()
    for g in BWD(torch.randn_like(q), q, k, k, out, lse, *layout.kernel_args(), 0.25):
        assert g.transpose(1, 2).is_contiguous()


def test_module_reads_its_projection_in_place():
    """SegmentAttention on the cpu backend hands the kernel views of its projection; output and every gradient match
    the same module on the reference backend."""
    assert clear_kernels.dispatch.select("cpu", torch.empty(1, 1, 1, 16)).strided
    check_module_matches_reference("cpu", heads=4, kv_heads=2, atol=2e-5)


def test_parity_head_dim_256_and_odd():
    check_parity("cpu", CASES["many_summary"], heads=1, head_dim=256, dtype=torch.float32)
    check_parity("cpu", CASES["random_mixed"], heads=1, head_dim=23, dtype=torch.float32)  # scalar tails


@pytest.mark.parametrize("isa", _supported_isas())
def test_parity_every_instruction_set(isa, monkeypatch):
    monkeypatch.setenv("CLEAR_KERNELS_CPU_ISA", isa)
    for name in ("conduction", "many_summary", "one_long_segment"):
        for head_dim in (17, 96):
            check_parity("cpu", CASES[name], head_dim=head_dim, dtype=torch.float32)
        check_parity("cpu", CASES[name], head_dim=80, dtype=torch.bfloat16)
        check_parity("cpu", CASES[name], head_dim=40, dtype=torch.float64)


def test_parity_long_records_and_custom_scale():
    # A conduction layout with many beats (long summary rows) and a run longer than one query tile (32).
    check_parity("cpu", conduction_layout(7, batch=2, leads=3, beats=40, p_valid=0.9), head_dim=48)
    check_parity("cpu", SegmentLayout.block_diagonal([[3, 65, 1], [100, 0, 0]]), head_dim=32, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_parity_rows_of_several_chunks(dtype):
    # Rows longer than one task chunk (256 positions): the summary tokens' gradients are then summed from
    # several chunks' partial sums by separate tasks, not finished by the run task itself.
    check_parity("cpu", conduction_layout(11, batch=2, leads=4, beats=80, p_valid=0.85), head_dim=32, dtype=dtype)
    check_parity("cpu", random_layout(12, length=600, num_groups=3, max_seg=20, p_summary=0.15, p_pad=0.1),
                 head_dim=40, dtype=dtype)
    # 20 summary slots x 3 heads x 2 rows: the summary phase's blocks of tasks then straddle heads, so a task list
    # must reload the summary tokens' deltas when it moves to the next head (small groups make the error show).
    check_parity("cpu", conduction_layout(11, batch=2, leads=20, beats=13, p_valid=0.85), heads=3, head_dim=32,
                 dtype=dtype)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), length=st.integers(1, 70), groups=st.integers(1, 4),
       max_seg=st.integers(1, 40), p_summary=st.floats(0.0, 0.6), p_pad=st.floats(0.0, 0.5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_parity_random_layouts(seed, length, groups, max_seg, p_summary, p_pad, dtype):
    layout = random_layout(seed, batch=2, length=length, num_groups=groups, max_seg=max_seg, p_summary=p_summary,
                           p_pad=p_pad)
    check_parity("cpu", layout, heads=2, head_dim=16 + 8 * (seed % 4), dtype=dtype, seed=seed)


# -------------------------------------------------------------------------------------------- determinism
def _fwd_bwd(q, k, v, dout, layout):
    out, lse = FWD(q, k, v, *layout.kernel_args(), 0.125)
    return (out, lse) + tuple(BWD(dout, q, k, v, out, lse, *layout.kernel_args(), 0.125))


@pytest.mark.parametrize("beats", [20, 40], ids=["one_chunk", "two_chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype, beats):
    layout = conduction_layout(3, batch=3, leads=12, beats=beats)  # L = 252 or 492: one or two task chunks
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(3, 4, layout.seq_len, 64, generator=gen).to(dtype) for _ in range(4))
    first = _fwd_bwd(q, k, v, dout, layout)
    for _ in range(3):
        for a, b in zip(first, _fwd_bwd(q, k, v, dout, layout)):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a, b.view(torch.uint8)
                               if b.dtype == torch.bfloat16 else b)
    # Each output row is computed by one task in a fixed order, so even another thread count gives the same bits.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for a, b in zip(first, _fwd_bwd(q, k, v, dout, layout)):
            assert torch.equal(a.float(), b.float())
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- input checks
def _good_args(dtype=torch.float32):
    layout = CASES["many_summary"]  # both rows hold segments and summary tokens
    q = torch.randn(layout.batch_size, 2, layout.seq_len, 16, dtype=dtype)
    return q, q.clone(), q.clone(), list(layout.kernel_args())


@pytest.mark.parametrize("case, message", [
    ("float16", "supports float32, bfloat16 and float64"),
    ("k_shape", "k must be [B, H_kv, L, D]"),
    ("kv_heads", "heads of q .2. must be a multiple of the heads of k .3."),
    ("v_heads", "v must be [B, H_kv, L, D] = [2, 2, "),
    ("v_dtype", "v has dtype"),
    ("q_3d", "q must be [B, H, L, D]"),
    ("layout_int64", "layout tensor segment must be int32"),
    ("layout_batch", "layout tensor group must be [B=2"),
    ("seg_end_out_of_range", "do not contain it"),
    ("group_out_of_range", "is outside [0, num_groups"),
    ("summary_index_not_summary", "is not a summary token"),
    ("group_index_out_of_range", "is not a non-padding token"),
])
def test_bad_inputs_raise_clearly(case, message):
    q, k, v, lay = _good_args()
    if case == "float16":
        q, k, v = q.half(), k.half(), v.half()
    elif case == "k_shape":
        k = k[:, :, 1:].contiguous()
    elif case == "kv_heads":
        k = v = torch.cat([k, k[:, :1]], dim=1)
    elif case == "v_heads":
        v = v[:, :1].contiguous()
    elif case == "v_dtype":
        v = v.double()
    elif case == "q_3d":
        q = q[0]
    elif case == "layout_int64":
        lay[0] = lay[0].long()
    elif case == "layout_batch":
        lay[1] = lay[1][:1].contiguous()
    elif case == "seg_end_out_of_range":
        seg_end = lay[3].clone()
        t = int(torch.nonzero(lay[0][0] >= 0)[0])
        seg_end[0, t] = q.shape[2] + 5
        lay[3] = seg_end
    elif case == "group_out_of_range":
        group = lay[1].clone()
        group[0, 0] = 99
        lay[1] = group
    elif case == "summary_index_not_summary":
        summary_index = lay[6].clone()
        t = int(torch.nonzero(lay[0][0] >= 0)[0])
        summary_index[0, 0] = t
        lay[6] = summary_index
    elif case == "group_index_out_of_range":
        group_index = lay[4].clone()
        group_index[0, 0] = 10_000
        lay[4] = group_index
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FWD(q, k, v, *lay, 0.25)


def _run_of(layout, length_at_least):
    """(b, start, end) of the first segment run of at least that many tokens."""
    for b in range(layout.batch_size):
        for t in range(layout.seq_len):
            start, end = int(layout.seg_start[b, t]), int(layout.seg_end[b, t])
            if start == t and layout.segment[b, t] >= 0 and end - start >= length_at_least:
                return b, start, end
    raise AssertionError("no such run")


@pytest.mark.parametrize("case, message", [
    ("overlapping_runs", "overlapping runs"),
    ("split_run", "is split into two runs"),
    ("segment_in_two_runs", "has two runs"),
    ("group_index_repeats_a_token", "group_index.* must be ascending"),
    ("group_index_misses_a_token", "group_offsets.* lists .* tokens but segment holds"),
])
def test_layouts_where_two_tasks_write_one_row_are_rejected(case, message):
    """Index tensors that pass every range check but do not describe the ids: runs that overlap (two tasks write
    one row), a segment cut into two runs, group lists with a token twice or missing (wrong sums)."""
    layout = CASES["long_runs"]
    q = torch.randn(layout.batch_size, 1, layout.seq_len, 16)
    lay = [t.clone() for t in layout.kernel_args()]
    segment, _, seg_start, seg_end, group_index, group_offsets, _, _ = lay
    b, start, end = _run_of(layout, 3)
    if case == "overlapping_runs":  # token start + 1 claims a run of its own inside [start, end)
        seg_start[b, start + 1] = start + 1
    elif case == "split_run":  # [start, end) cut into [start, start + 1) and [start + 1, end), one segment id
        seg_end[b, start] = start + 1
        seg_start[b, start + 1:end] = start + 1
    elif case == "segment_in_two_runs":  # another run gets this run's segment id
        later = [t for t in range(end + 1, layout.seq_len) if seg_start[b, t] == t and segment[b, t] >= 0]
        other = later[0]
        segment[b, other:int(seg_end[b, other])] = segment[b, start]
    elif case == "group_index_repeats_a_token":
        g_start = int(group_offsets[b, 0])
        group_index[b, g_start + 1] = group_index[b, g_start]
    elif case == "group_index_misses_a_token":
        assert group_offsets[b, -2] < group_offsets[b, -1]
        group_offsets[b, -1] -= 1  # the last group's list loses its last token
    with pytest.raises(RuntimeError, match=message):
        FWD(q, q, q, *lay, 0.25)


def test_float64_logsumexp_is_float64():
    """lse of float64 inputs is float64 (a float32 one costs the backward half its precision); the backward
    checks it gets the same dtype back."""
    q, k, v, lay = _good_args(torch.float64)
    out, lse = FWD(q, k, v, *lay, 0.25)
    assert lse.dtype == torch.float64
    mask = CASES["many_summary"].materialize()
    _, want = clear_kernels.reference.masked_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(lse, want, atol=1e-13, rtol=0)
    with pytest.raises(RuntimeError, match="lse must be a contiguous float64"):
        BWD(out, q, k, v, out, lse.float(), *lay, 0.25)


def test_float64_gradients_are_float64_exact():
    layout = CASES["conduction"]
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(layout.batch_size, 2, layout.seq_len, 32, generator=gen, dtype=torch.float64)
                     for _ in range(4))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(clear_kernels.reference.masked_attention(*leaves, layout.materialize(), 0.3)[0],
                               leaves, dout)
    got = torch.autograd.grad(segment_attention(*leaves, layout, scale=0.3, backend="cpu"), leaves, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_scale_that_overflows_float32_is_rejected_by_the_op():
    """A direct op call with a scale finite in double but inf in float32 used to give NaN rows."""
    q, k, v, lay = _good_args()
    with pytest.raises(RuntimeError, match="scale must be finite in the compute precision"):
        FWD(q, k, v, *lay, 3.5e38)
    out, _ = FWD(q.double(), k.double(), v.double(), *lay, 3.5e38)  # float64 computes in double: no overflow
    assert out.dtype == torch.float64


def test_bad_backward_inputs_raise_clearly():
    q, k, v, lay = _good_args()
    out, lse = FWD(q, k, v, *lay, 0.25)
    with pytest.raises(RuntimeError, match="lse must be a contiguous float32"):
        BWD(out, q, k, v, out, lse.double(), *lay, 0.25)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of q"):
        BWD(out[:, :1].contiguous(), q, k, v, out, lse, *lay, 0.25)


# ---------------------------------------------------------------------------- torch.library integration
def test_opcheck_native_ops():
    layout = CASES["conduction"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.batch_size, 2, layout.seq_len, 16, generator=gen, requires_grad=True)
               for _ in range(3))
    torch.library.opcheck(FWD, (q, k, v, *layout.kernel_args(), 0.25))
    out, lse = FWD(q.detach(), k.detach(), v.detach(), *layout.kernel_args(), 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(BWD, (dout, q.detach(), k.detach(), v.detach(), out, lse, *layout.kernel_args(), 0.25))


def test_gradcheck_float64():
    layout = random_layout(11, batch=2, length=14, num_groups=2, p_summary=0.2)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 14, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: segment_attention(a, b, c, layout, backend="cpu"), (q, k, v))


def test_auto_picks_cpu_and_matches_explicit():
    layout = CASES["conduction"]
    q = torch.randn(layout.batch_size, 2, layout.seq_len, 32)
    assert clear_kernels.dispatch.select("auto", q).name == "cpu"
    assert torch.equal(segment_attention(q, q, q, layout), segment_attention(q, q, q, layout, backend="cpu"))


def test_torch_compile_fullgraph():
    layout = CASES["conduction"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.batch_size, 2, layout.seq_len, 32, generator=gen, requires_grad=True)
               for _ in range(3))

    def f(q, k, v):
        return (segment_attention(q * 2.0, k, v, layout, backend="cpu") ** 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)
