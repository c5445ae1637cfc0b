"""clear_kernels.nn.SegmentAttention for nn.MultiheadAttention users (issue 15, item 4)."""

import pytest
import torch

from clear_kernels import SegmentLayout, segment_attention
from clear_kernels.nn import SegmentAttention, _HeadsFromProjection


def _mha_and_module(num_heads=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(32, num_heads, batch_first=True, dtype=torch.float64)
    return mha, SegmentAttention.from_multihead(mha, backend="reference", **kwargs)


def test_from_multihead_matches_multihead_attention_with_a_mask_and_padding():
    mha, module = _mha_and_module(is_causal=True)
    layout = SegmentLayout.block_diagonal([[5, 9, 3], [12, 4, 0]], total_len=19)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    key_padding_mask = torch.zeros(2, 19, dtype=torch.bool)
    key_padding_mask[1, 14:] = True  # the tail of row 1's second document, and its padding
    got = module(x, layout, key_padding_mask=key_padding_mask)
    mask = layout.materialize(is_causal=True) & ~key_padding_mask[:, None, :] & ~key_padding_mask[:, :, None]
    rows = mask.any(-1)
    safe = mask | torch.diag_embed(~rows)
    want, _ = mha(x, x, x, attn_mask=(~safe).repeat_interleave(4, dim=0), need_weights=False)
    torch.testing.assert_close(got[rows], want[rows])
    # Padding rows are zero before the output projection: the projection's bias alone.
    torch.testing.assert_close(got[~rows], module.out_proj.bias.expand(int((~rows).sum()), 32))


def test_module_without_layout_is_full_self_attention_and_gqa_shapes():
    mha, module = _mha_and_module()
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(module(x), mha(x, x, x, need_weights=False)[0])
    gqa = SegmentAttention(32, 4, num_kv_heads=2, backend="reference")
    assert gqa.in_proj.out_features == 32 + 2 * 2 * 8
    x = torch.randn(2, 6, 32)
    # Against the same projections with the key/value heads repeated (SDPA's enable_gqa semantics).
    q, k, v = gqa.in_proj(x).split([32, 16, 16], dim=-1)
    q, k, v = (t.unflatten(-1, (n, 8)).transpose(1, 2) for t, n in ((q, 4), (k, 2), (v, 2)))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(gqa(x), gqa.out_proj(want.transpose(1, 2).flatten(2)))


def test_module_errors():
    _, module = _mha_and_module()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        module(x, need_weights=True)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        module(x, key_padding_mask=torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, L\] = \(2, 10\)"):
        module(x, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    split = torch.zeros(2, 10, dtype=torch.bool)
    split[0, 4] = True
    with pytest.raises(ValueError, match="key_padding_mask: padding must not split a segment"):
        module(x, key_padding_mask=split)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int dividing num_heads=4"):
        SegmentAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="pass dropout="):
        SegmentAttention.from_multihead(torch.nn.MultiheadAttention(32, 4, dropout=0.1))
    with pytest.raises(ValueError, match="self-attention only"):
        SegmentAttention.from_multihead(torch.nn.MultiheadAttention(32, 4, kdim=16))


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_module_gradients_match_the_plain_projection_split(num_kv_heads):
    """The module's head split has its own backward (one copy into the projection's gradient); its gradients must
    be those of split + transpose, for multi-head and grouped-query attention."""
    torch.manual_seed(1)
    module = SegmentAttention(32, 4, num_kv_heads=num_kv_heads, backend="reference").double()
    layout = SegmentLayout.block_diagonal([[5, 9, 3], [12, 4, 0]], total_len=17)
    x = torch.randn(2, 17, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 17, 32, dtype=torch.float64)
    params = [x, *module.parameters()]
    got = torch.autograd.grad((module(x, layout) * weight).sum(), params)
    kv = 8 * num_kv_heads
    q, k, v = module.in_proj(x).split([32, kv, kv], dim=-1)
    q, k, v = (t.unflatten(-1, (t.shape[-1] // 8, 8)).transpose(1, 2) for t in (q, k, v))
    out = segment_attention(q, k, v, layout, enable_gqa=num_kv_heads != 4, backend="reference")
    want = torch.autograd.grad((module.out_proj(out.transpose(1, 2).flatten(2)) * weight).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # An unused output gets a zero gradient.
    proj = torch.randn(2, 17, 64, dtype=torch.float64, requires_grad=True)
    q, k, v = _HeadsFromProjection.apply(proj, (4, 2, 2), 8)
    assert all(t.is_contiguous() for t in (q, k, v)) and k.shape == (2, 2, 17, 8)
    (grad,) = torch.autograd.grad(q.sum(), proj)
    assert torch.equal(grad, torch.cat([torch.ones(2, 17, 32), torch.zeros(2, 17, 32)], -1).double())
