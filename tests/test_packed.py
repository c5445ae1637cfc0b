"""Packed-sequence use (issue 15): causal segments, grouped-query heads, varlen, layouts from cu_seqlens or
document ids, the returned logsumexp; every implementing backend against the float64 reference."""

import random

import pytest
import torch
import torch.nn.functional as F
from attention_cases import check_parity, conduction_layout, layout_cases, random_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clear_kernels
from clear_kernels import PADDING, SUMMARY, SegmentLayout, dispatch, segment_attention, segment_attention_varlen
from clear_kernels.reference import masked_attention

CASES = layout_cases()
CPU = clear_kernels.available_backends()["cpu"] is None
needs_cpu = pytest.mark.skipif(not CPU, reason="the native extension is not built")


def causal_rule(seg_q, seg_k, grp_q, grp_k, pos_q, pos_k) -> bool:
    """SPEC §2.1 with issue 15's causality, for one pair, written as plainly as possible."""
    if PADDING in (seg_q, seg_k):
        return False
    if seg_q >= 0 and seg_q == seg_k:
        return pos_k <= pos_q
    return grp_q == grp_k and SUMMARY in (seg_q, seg_k)


def random_qkv(layout, heads, kv_heads, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((layout.batch_size, h, layout.seq_len, dim), generator=gen).to(dtype)
            for h in (heads, kv_heads, kv_heads)]


# ------------------------------------------------------------------------------------------------- the rule
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), length=st.integers(1, 30))
def test_causal_mask_is_the_rule_pair_by_pair(seed, length):
    layout = random_layout(seed, batch=2, length=length, num_groups=2, p_summary=0.2)
    seg, grp = layout.segment.tolist(), layout.group.tolist()
    want = torch.tensor([[[causal_rule(s[i], s[j], g[i], g[j], i, j) for j in range(length)] for i in range(length)]
                         for s, g in zip(seg, grp)])
    assert torch.equal(layout.materialize(is_causal=True), want)
    # Causality only removes pairs of one segment, and only those with the key after the query.
    full = layout.materialize()
    assert torch.equal(layout.materialize(True), full & (torch.tril(torch.ones(length, length, dtype=torch.bool))
                                                         | ~(layout.segment >= 0)[:, :, None]
                                                         | ~(layout.segment >= 0)[:, None, :]))


def test_one_causal_document_is_sdpa_causal_with_gqa():
    layout = SegmentLayout.block_diagonal([[23]])
    q, k, v = random_qkv(layout, 4, 2, 16, torch.float64)
    got = segment_attention(q, k, v, layout, is_causal=True, enable_gqa=True, backend="reference")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------- layouts
@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6), pad=st.integers(0, 3))
def test_from_cu_seqlens_is_block_diagonal(lengths, pad):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()))
    total = int(cu[-1]) + pad
    if total == 0:
        return
    layout = SegmentLayout.from_cu_seqlens(cu, total_len=total)
    assert torch.equal(layout.materialize(), SegmentLayout.block_diagonal([lengths], total_len=total).materialize())
    if pad == 0:
        assert SegmentLayout.from_cu_seqlens(cu).seq_len == total


@pytest.mark.parametrize("cu, total, match", [
    ([1, 4], None, "cu_seqlens must start at 0"),
    ([0, 5, 3], None, r"cu_seqlens must be increasing .*cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 5"),
    ([0, 3, 9], 6, "cu_seqlens must end at the number of tokens T = 6"),
    ([4], None, r"cu_seqlens must be 1-D with at least 2 entries"),
])
def test_from_cu_seqlens_errors(cu, total, match):
    with pytest.raises(ValueError, match=match):
        SegmentLayout.from_cu_seqlens(torch.tensor(cu), total_len=total)
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        SegmentLayout.from_cu_seqlens(torch.tensor([0.0, 2.0]))


def test_from_document_ids_never_makes_a_summary_token():
    ids = torch.tensor([[-1, -1, -2, 7, 7, 2**40, -5, -5], [3, 3, 3, 0, 0, -1, -1, -1]])
    layout = SegmentLayout.from_document_ids(ids)
    assert (layout.segment >= 0).all()
    same_doc = ids[:, :, None] == ids[:, None, :]
    assert torch.equal(layout.materialize(), same_doc)
    padded = SegmentLayout.from_document_ids(ids, padding_id=-1)
    pad = ids == -1
    assert torch.equal(padded.segment == PADDING, pad)
    assert not (padded.segment == SUMMARY).any()
    assert torch.equal(padded.materialize(), same_doc & ~pad[:, :, None] & ~pad[:, None, :])
    assert torch.equal(SegmentLayout.from_document_ids(ids[0]).materialize(), layout.materialize()[:1])


def test_from_document_ids_errors():
    with pytest.raises(ValueError, match=r"document 4 starts again at ids\[0, 3\]"):
        SegmentLayout.from_document_ids(torch.tensor([4, 4, 5, 4]))
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        SegmentLayout.from_document_ids(torch.zeros(3))
    with pytest.raises(TypeError, match="padding_id must be an int"):
        SegmentLayout.from_document_ids(torch.zeros(3, dtype=torch.long), padding_id=0.5)


# ------------------------------------------------------------------------------------------ input errors
@pytest.mark.parametrize("kwargs, shapes, exc, match", [
    ({"enable_gqa": True}, (4, 3), ValueError, "query heads H = 4 to be a multiple of the key/value heads H_kv = 3"),
    ({}, (4, 2), ValueError, "fewer key/value heads than query heads need enable_gqa=True"),
    ({"is_causal": 1}, (4, 4), TypeError, "is_causal must be a bool"),
    ({"enable_gqa": "yes"}, (4, 4), TypeError, "enable_gqa must be a bool"),
    ({"return_lse": None}, (4, 4), TypeError, "return_lse must be a bool"),
])
def test_bad_packed_inputs_name_the_argument(kwargs, shapes, exc, match):
    layout = CASES["random_mixed"]
    q, k, v = random_qkv(layout, shapes[0], shapes[1], 16)
    with pytest.raises(exc, match=match):
        segment_attention(q, k, v, layout, backend="reference", **kwargs)


def test_causal_with_keys_of_another_length_is_an_error():
    layout = CASES["random_mixed"]
    q, k, v = random_qkv(layout, 2, 2, 16)
    with pytest.raises(ValueError, match="is_causal=True needs k of the length of q"):
        segment_attention(q, k[:, :, :-1], v[:, :, :-1], layout, is_causal=True, backend="reference")


@pytest.mark.parametrize("cu, match", [
    ([0, 5, 3, 12], "cu_seqlens must be increasing"),
    ([0, 5, 10], "cu_seqlens must end at the number of tokens T = 12, got cu_seqlens\\[-1\\] = 10"),
])
def test_varlen_bad_cu_seqlens(cu, match):
    q = torch.randn(12, 2, 16)
    with pytest.raises(ValueError, match=match):
        segment_attention_varlen(q, q, q, torch.tensor(cu), backend="reference")


def test_varlen_other_errors():
    q = torch.randn(12, 4, 16)
    cu = torch.tensor([0, 5, 12])
    with pytest.raises(ValueError, match=r"q must be packed \[T, H, D\]"):
        segment_attention_varlen(q[None], q, q, cu)
    with pytest.raises(ValueError, match="k and v must hold the T = 12 tokens"):
        segment_attention_varlen(q, q[:5], q[:5], cu)
    with pytest.raises(ValueError, match="max_seqlen=3 but document 1 has 7 tokens"):
        segment_attention_varlen(q, q, q, cu, max_seqlen=3)
    with pytest.raises(ValueError, match="query heads H = 4 to be a multiple of the key/value heads H_kv = 3"):
        segment_attention_varlen(q, q[:, :3], q[:, :3], cu)


# ------------------------------------------------------------------------------------------- dispatch
def test_a_backend_without_a_feature_refuses_it_and_auto_falls_back(monkeypatch):
    # A stand-in "cpu" backend that lists no optional feature (every real backend implements both).
    monkeypatch.setitem(dispatch._registry, "cpu", dispatch.Backend("cpu", "reference", ("cpu",), lambda q: None))
    monkeypatch.setattr(dispatch, "_warned", set())
    layout = SegmentLayout.block_diagonal([[5, 3]])
    q = torch.randn(1, 2, 8, 16)
    assert "does not implement is_causal=True" in dispatch.why_not("cpu", q, frozenset({"causal"}))
    assert "grouped-query" in dispatch.why_not("cpu", q, frozenset({"gqa"}))
    assert dispatch.why_not("cpu", q) is None
    with pytest.raises(ValueError, match="backend='cpu' cannot run these inputs: it does not implement "
                                         "is_causal=True"):
        segment_attention(q, q, q, layout, is_causal=True, backend="cpu")
    with pytest.warns(RuntimeWarning, match="falling back to the 'reference' backend: 'cpu' not used because it "
                                            "does not implement is_causal=True"):
        out = segment_attention(q, q, q, layout, is_causal=True)
    torch.testing.assert_close(out, segment_attention(q, q, q, layout, is_causal=True, backend="reference"))


def test_what_each_backend_implements():
    # Every backend implements the whole op: causal segments and grouped-query attention.
    for name in ("cpu", "cuda", "reference", "triton"):
        if name in dispatch._registry:
            assert dispatch._registry[name].features == frozenset({"causal", "gqa"}), name


# ------------------------------------------------------------------------------------------------ parity
PARITY_BACKENDS = ["reference"] + (["cpu"] if CPU else [])


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("is_causal, kv_heads", [(True, None), (False, 2), (True, 1)],
                         ids=["causal", "gqa", "causal_mqa"])
def test_parity_layout_cases(backend, name, is_causal, kv_heads):
    check_parity(backend, CASES[name], heads=4, head_dim=24, is_causal=is_causal, kv_heads=kv_heads)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_parity_long_documents(dtype):
    # Documents longer than the kernel's 32-row query tile and than a 256-position task chunk, so causal tiles
    # start at every offset and a key's sums start in its own tile; with summary tokens for the pair rule.
    check_parity("cpu", SegmentLayout.block_diagonal([[70, 1, 33, 300], [5, 260, 0, 2]]), heads=4, head_dim=32,
                 dtype=dtype, is_causal=True, kv_heads=2)
    check_parity("cpu", random_layout(12, length=600, num_groups=3, max_seg=80, p_summary=0.05, p_pad=0.1),
                 heads=2, head_dim=40, dtype=dtype, is_causal=True)
    check_parity("cpu", conduction_layout(11, batch=2, leads=4, beats=80, p_valid=0.85), heads=6, head_dim=16,
                 dtype=dtype, is_causal=True, kv_heads=3)


@needs_cpu
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), length=st.integers(1, 90), groups=st.integers(1, 3),
       max_seg=st.integers(1, 70), p_summary=st.floats(0.0, 0.4), p_pad=st.floats(0.0, 0.3),
       is_causal=st.booleans(), group_size=st.sampled_from([1, 2, 3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_cpu_parity_random_layouts(seed, length, groups, max_seg, p_summary, p_pad, is_causal, group_size, dtype):
    layout = random_layout(seed, batch=2, length=length, num_groups=groups, max_seg=max_seg, p_summary=p_summary,
                           p_pad=p_pad)
    kv_heads = 2
    check_parity("cpu", layout, heads=kv_heads * group_size, head_dim=16 + 8 * (seed % 3), dtype=dtype, seed=seed,
                 is_causal=is_causal, kv_heads=kv_heads)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_causal_gqa_is_bitwise_deterministic(dtype):
    layout = SegmentLayout.block_diagonal([[100, 40, 300, 72], [512, 0, 0, 0]])
    q, k, v = random_qkv(layout, 6, 2, 64, dtype)
    dout = torch.randn_like(q)
    ops = clear_kernels.ops

    def run():
        out, lse = ops.op("native", "fwd")(q, k, v, *layout.kernel_args(), 0.125, True)
        return (out, lse) + tuple(ops.op("native", "bwd")(dout, q, k, v, out, lse, *layout.kernel_args(), 0.125,
                                                          True))
    first = run()
    for _ in range(2):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------- varlen
@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_matches_the_reference_on_the_materialised_mask(backend, is_causal):
    lengths = [7, 1, 0, 20, 12]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(total, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(total, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = segment_attention_varlen(q, k, v, cu, max_seqlen=20, is_causal=is_causal, backend=backend)
    assert out.shape == q.shape
    mask = SegmentLayout.block_diagonal([lengths]).materialize(is_causal)
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    want = masked_attention(q4, k4, v4, mask, 16 ** -0.5)[0][0].transpose(0, 1)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    for g, w in zip(got, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------------------------- return_lse
@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("is_causal, kv_heads", [(False, 4), (True, 2)], ids=["plain", "causal_gqa"])
def test_returned_lse_and_its_gradient(backend, is_causal, kv_heads):
    layout = CASES["many_summary"]
    leaves = [t.double().requires_grad_(True) for t in random_qkv(layout, 4, kv_heads, 16)]
    out, lse = segment_attention(*leaves, layout, is_causal=is_causal, enable_gqa=True, return_lse=True,
                                 backend=backend)
    want_out, want_lse = masked_attention(*leaves, layout.materialize(is_causal), 0.25)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    gen = torch.Generator().manual_seed(9)
    w_out, w_lse = torch.randn(out.shape, generator=gen, dtype=out.dtype), torch.randn(lse.shape, generator=gen,
                                                                                          dtype=lse.dtype)

    def loss(o, s):
        return (o * w_out).sum() + (s * w_lse).sum()

    got = torch.autograd.grad(loss(out, lse), leaves, retain_graph=True)
    want = torch.autograd.grad(loss(want_out, want_lse), leaves, retain_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # Only the logsumexp in the loss: the gradient is the logsumexp's alone (not zero).
    got = torch.autograd.grad((lse * w_lse).sum(), leaves[:2])
    want = torch.autograd.grad((want_lse * w_lse).sum(), leaves[:2])
    assert float(want[0].abs().max()) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_returned_lse_is_float32_for_low_precision():
    layout = CASES["random_mixed"]
    q, k, v = random_qkv(layout, 2, 2, 16, torch.bfloat16)
    _, lse = segment_attention(q, k, v, layout, return_lse=True, backend="reference")
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]


# ----------------------------------------------------------------------------------------- torch.library
@needs_cpu
def test_opcheck_native_ops_causal_gqa():
    layout = CASES["many_summary"]
    q, k, v = (t.requires_grad_(True) for t in random_qkv(layout, 4, 2, 16))
    fwd, bwd = clear_kernels.ops.op("native", "fwd"), clear_kernels.ops.op("native", "bwd")
    torch.library.opcheck(fwd, (q, k, v, *layout.kernel_args(), 0.25, True))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), *layout.kernel_args(), 0.25, True)
    dout = torch.randn_like(out)
    torch.library.opcheck(bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, *layout.kernel_args(), 0.25,
                                True))


def test_opcheck_reference_ops_causal_gqa():
    layout = CASES["many_summary"]
    q, k, v = (t.requires_grad_(True) for t in random_qkv(layout, 4, 2, 16))
    fwd, bwd = clear_kernels.ops.op("reference", "fwd"), clear_kernels.ops.op("reference", "bwd")
    torch.library.opcheck(fwd, (q, k, v, *layout.kernel_args(), 0.25, True))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), *layout.kernel_args(), 0.25, True)
    torch.library.opcheck(bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                *layout.kernel_args(), 0.25, True))


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
def test_compiled_varlen_does_not_recompile_when_lengths_change(backend):
    torch._dynamo.reset()
    total, heads, dim = 48, 4, 64
    proj = torch.nn.Linear(dim, 3 * dim)

    def step(x, cu):
        q, k, v = proj(x).view(total, 3, heads, dim // heads).unbind(1)
        out, lse = segment_attention_varlen(q, k[:, :2], v[:, :2], cu, is_causal=True, return_lse=True,
                                            backend=backend)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(total, dim, requires_grad=True)
    rng = random.Random(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            cuts = sorted(rng.sample(range(1, total), 3))
            cu = torch.tensor([0] + cuts + [total])
            got = compiled(x, cu)
            (grad,) = torch.autograd.grad(got, x)
            want = step(x, cu)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(grad, torch.autograd.grad(want, x)[0])
