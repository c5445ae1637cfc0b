"""The dense reference: against SDPA, padding rows, gradients, and the op machinery (opcheck, compile)."""

import pytest
import torch
import torch.nn.functional as F
from attention_cases import check_parity, layout_cases, random_layout

import clear_kernels
from clear_kernels import SegmentLayout, segment_attention
from clear_kernels.reference import masked_attention

CASES = layout_cases()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_sdpa_on_real_rows(name, dtype):
    layout = CASES[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.batch_size, 2, layout.seq_len, 16, generator=gen, dtype=dtype) for _ in range(3))
    mask = layout.materialize()
    out = segment_attention(q, k, v, layout, backend="reference")
    rows = mask.any(-1)
    safe = mask | torch.diag_embed(~rows)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None])
    real = rows[:, None, :, None].expand_as(out)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out[real], want[real], atol=tol, rtol=tol)
    assert (out[~real] == 0).all()


def test_padding_rows_are_zero_with_zero_gradient_and_no_nan():
    layout = random_layout(3, length=30, p_pad=0.3)  # seed 3 holds an all-padding row
    assert (layout.segment[1] == clear_kernels.PADDING).all()
    q, k, v = (torch.randn(2, 2, 30, 16, requires_grad=True) for _ in range(3))
    out = segment_attention(q, k, v, layout, backend="reference")
    out.square().sum().backward()
    pad = (layout.segment == clear_kernels.PADDING)[:, None, :, None].expand_as(out)
    assert torch.isfinite(out).all() and (out[pad] == 0).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and (t.grad[pad] == 0).all()


def test_lse_is_the_logsumexp_of_allowed_scores():
    layout = CASES["random_mixed"]
    q, k, v = (torch.randn(2, 1, 40, 8, dtype=torch.float64) for _ in range(3))
    mask = layout.materialize()
    _, lse = masked_attention(q, k, v, mask, 0.5)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask[:, None], float("-inf"))
    want = torch.logsumexp(scores, -1)
    rows = mask.any(-1)[:, None].expand_as(want)
    torch.testing.assert_close(lse[rows].double(), want[rows], atol=1e-6, rtol=0)
    assert (lse[~rows] == 0).all()


@pytest.mark.parametrize("name", ["conduction_compact", "many_summary", "block_diagonal_zeros"])
def test_gradcheck_float64(name):
    layout = CASES[name]
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(layout.batch_size, 1, layout.seq_len, 4, generator=gen, dtype=torch.float64,
                          requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda q, k, v: segment_attention(q, k, v, layout, backend="reference"), inputs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_harness_accepts_the_reference(name):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_parity("reference", CASES[name], dtype=dtype, head_dim=16)


def test_parity_harness_rejects_a_wrong_kernel(monkeypatch):
    """The harness must be able to fail: a reference with a perturbed scale does not pass."""
    from attention_cases import check_parity as harness

    import clear_kernels.ops as ops
    real_fwd = ops.op("reference", "fwd")

    def wrong_fwd(q, k, v, *rest):  # rest ends with scale, is_causal
        return real_fwd(q, k, v, *rest[:-2], rest[-2] * 1.01, rest[-1])

    monkeypatch.setattr(ops, "op", lambda prefix, which="fwd": wrong_fwd if which == "fwd" else real_fwd)
    with pytest.raises(AssertionError, match="out: max abs error"):
        harness("reference", CASES["conduction"], backward=False)


def test_opcheck_reference_op_pair():
    layout = CASES["many_summary"]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, layout.seq_len, 16, generator=gen, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.clear_kernels.reference_fwd.default, (q, k, v, *layout.kernel_args(), 0.25))
    out, lse = torch.ops.clear_kernels.reference_fwd(q, k, v, *layout.kernel_args(), 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.clear_kernels.reference_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                           *layout.kernel_args(), 0.25))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_torch_compile_fullgraph(backend):
    layout = SegmentLayout.conduction(torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(0)) < 0.8)
    proj = torch.nn.Linear(16, 48)

    def step(x):
        q, k, v = proj(x).view(2, layout.seq_len, 3, 1, 16).permute(2, 0, 3, 1, 4)
        return segment_attention(q, k, v, layout, backend=backend).sum()

    x = torch.randn(2, layout.seq_len, 16, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.backward()
    grad = x.grad.clone()
    x.grad = None
    want = step(x)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, x.grad)


# --------------------------------------------------------- non-finite values stay with the rows that attend them
def _planted(layout, dtype=torch.float32):
    """q, k, v, grad_out with NaN/Inf in tokens some rows do not attend: every padding token (each tensor a
    different poison), and the v of one segment token and the k of one summary token."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(layout.batch_size, 2, layout.seq_len, 16, generator=gen, dtype=dtype)
                     for _ in range(4))
    pad = (layout.segment == clear_kernels.PADDING)[:, None, :, None]
    for t, poison in ((q, float("nan")), (k, float("inf")), (v, float("-inf")), (dout, float("nan"))):
        t.masked_fill_(pad.expand_as(t), poison)
    seg_token = int(torch.nonzero(layout.segment[0] >= 0)[0])
    summary_token = int(torch.nonzero(layout.segment[0] == clear_kernels.SUMMARY)[0])
    v[0, 1, seg_token, 3] = float("nan")
    k[0, 0, summary_token, :] = float("inf")
    return q, k, v, dout, seg_token, summary_token


def _fwd_bwd(prefix, q, k, v, dout, layout, scale=0.25):
    from clear_kernels import ops

    out, lse = ops.op(prefix, "fwd")(q, k, v, *layout.kernel_args(), scale)
    return (out,) + tuple(ops.op(prefix, "bwd")(dout, q, k, v, out, lse, *layout.kernel_args(), scale))


def test_nonfinite_values_of_unattended_tokens_stay_local():
    """NaN/Inf in padding tokens and in single tokens reach only the rows that attend them, forward and backward:
    every other row equals a run on clean inputs (the reference used to spread them to the whole batch element)."""
    layout = CASES["many_summary"]
    q, k, v, dout, seg_token, summary_token = _planted(layout)
    got = _fwd_bwd("reference", q, k, v, dout, layout)
    clean = [torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for t in (q, k, v, dout)]
    want = _fwd_bwd("reference", *clean, layout)
    mask = layout.materialize()
    touched = torch.zeros(layout.batch_size, 2, layout.seq_len, dtype=torch.bool)  # rows that see a poison
    touched[0, 1] |= mask[0, :, seg_token]
    touched[0, 0] |= mask[0, :, summary_token]
    # dk and dv of a token collect from the rows that attend it
    spread = (touched[..., None, :].double() @ mask[:, None].double()).squeeze(-2) > 0
    for name, g, w, hit in zip(("out", "dq", "dk", "dv"), got, want, (touched, touched, spread, spread)):
        rows = ~hit[..., None].expand_as(g)
        assert torch.isfinite(g[rows]).all(), f"{name}: a NaN/Inf reached a row that does not attend it"
        torch.testing.assert_close(g[rows], w[rows], atol=1e-5, rtol=1e-5)
    assert not torch.isfinite(got[0][0, 1, seg_token]).all() and not torch.isfinite(got[0][0, 0, summary_token]).all()


@pytest.mark.skipif(not clear_kernels.native.has_kernel("CPU"), reason="no CPU kernel")
def test_nonfinite_values_agree_with_the_cpu_kernel():
    """Same planted inputs: the reference and the C++ kernel put NaN/Inf in the same places, equal elsewhere."""
    layout = CASES["many_summary"]
    q, k, v, dout, _, _ = _planted(layout)
    for name, g, w in zip(("out", "dq", "dk", "dv"), _fwd_bwd("reference", q, k, v, dout, layout),
                          _fwd_bwd("native", q, k, v, dout, layout)):
        assert torch.equal(torch.isfinite(g), torch.isfinite(w)), f"{name}: non-finite entries differ"
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], atol=1e-5, rtol=1e-5)


def test_float64_gradients_are_float64_exact():
    """The saved logsumexp is float64 for float64 inputs: gradients agree with float64 autograd of the plain
    masked attention to ~1e-12 (a float32 lse left errors of about 2e-7)."""
    layout = CASES["conduction"]
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(layout.batch_size, 2, layout.seq_len, 32, generator=gen, dtype=torch.float64)
                     for _ in range(4))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(masked_attention(*leaves, layout.materialize(), 0.3)[0], leaves, dout)
    got = torch.autograd.grad(segment_attention(*leaves, layout, scale=0.3, backend="reference"), leaves, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    assert masked_attention(q, k, v, layout.materialize(), 0.3)[1].dtype == torch.float64
