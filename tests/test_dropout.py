"""clear_hug.dropout: the CPU mask is i.i.d. Bernoulli at the rounded p, scales kept values exactly, and its gradient is
the mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clear_hug.config import get_config
from clear_hug.dropout import Dropout, _native_mask_available, dropout, keep_scale_mask, quantized_p
from clear_hug.model import CLEAR
from clear_kernels import native as native_ext

# Both sources of the mask's bits: the extension's counter-based op and torch's generator alone.
NATIVE = pytest.mark.parametrize("native", [
    pytest.param(True, marks=pytest.mark.skipif(not _native_mask_available(), reason="native extension not built")),
    False], ids=["native", "torch"])


def _within_sigmas(count: int, n: int, prob: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * prob) <= sigmas * math.sqrt(n * prob * (1 - prob))


@NATIVE
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_every_lane_of_a_draw_drops_at_the_rounded_p(p, native):
    # Elements 4i..4i+3 share one 64-bit draw; each lane must drop at p on its own. (A draw from random_() without
    # a range has a 15-bit top lane that is never below the threshold: that lane would keep everything.)
    torch.manual_seed(0)
    n = 1 << 20
    mask = keep_scale_mask(torch.empty(n), p, native=native)
    q = quantized_p(p)
    for lane in range(4):
        dropped = int((mask.view(-1, 4)[:, lane] == 0).sum())
        assert _within_sigmas(dropped, n // 4, q), (lane, dropped / (n // 4), q)


@NATIVE
def test_neighbouring_elements_are_independent(native):
    torch.manual_seed(1)
    n = 1 << 20
    drop = (keep_scale_mask(torch.empty(n), 0.5, native=native) == 0).view(-1, 4)
    # Pairs of lanes in one draw and across draws: both dropped a quarter of the time.
    for a, b in ((drop[:, 0], drop[:, 1]), (drop[:, 2], drop[:, 3]), (drop[:-1, 3], drop[1:, 0])):
        assert _within_sigmas(int((a & b).sum()), a.numel(), 0.25)


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_values_are_scaled_and_dropped_ones_are_zero(dtype, native):
    torch.manual_seed(2)
    x = torch.randn(3, 50, 41, dtype=dtype) + 3.0  # no zeros in x itself; an odd count (a partial last word)
    out = x * keep_scale_mask(x, 0.1, native=native)
    assert out.dtype == dtype and out.shape == x.shape
    kept = out != 0
    scale = torch.tensor(1 / (1 - quantized_p(0.1)), dtype=dtype)
    torch.testing.assert_close(out[kept], x[kept] * scale, rtol=0, atol=0)
    assert 0 < int((~kept).sum()) < x.numel() // 4


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(3)
    x = torch.randn(64, 33, requires_grad=True)
    out = dropout(x, 0.3)
    grad = torch.randn_like(out)
    out.backward(grad)
    mask = torch.where(out != 0, 1 / (1 - quantized_p(0.3)), 0.0)
    torch.testing.assert_close(x.grad, grad * mask, rtol=0, atol=0)


def test_expectation_is_the_input():
    torch.manual_seed(4)
    x = torch.full((1 << 20,), 2.0)
    q = quantized_p(0.25)
    mean = float(dropout(x, 0.25).double().mean())
    sd = 2.0 * math.sqrt(q / (1 - q)) / math.sqrt(x.numel())  # of the mean of (x / (1 - q)) * Bernoulli(1 - q)
    assert abs(mean - 2.0) <= 5 * sd


def test_seeded_runs_repeat_and_differ_across_seeds():
    x = torch.randn(1000)
    torch.manual_seed(5)
    a = dropout(x, 0.5)
    torch.manual_seed(5)
    b = dropout(x, 0.5)
    torch.manual_seed(6)
    c = dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(dropout(x, 0.5, generator=g1), dropout(x, 0.5, generator=g2))


def test_identity_in_eval_and_at_zero_and_zeros_at_one():
    x = torch.randn(10, 7)
    assert dropout(x, 0.0) is x and dropout(x, 0.7, training=False) is x
    module = Dropout(0.7).eval()
    assert module(x) is x
    out = dropout(x, 1.0)
    assert torch.equal(out, torch.zeros_like(x)) and not out.isnan().any()


def test_same_p_semantics_as_f_dropout_within_the_rounding():
    assert quantized_p(0.1) == pytest.approx(0.1, abs=2 ** -17)
    torch.manual_seed(8)
    x = torch.ones(1 << 18)
    ours = float((dropout(x, 0.1) == 0).double().mean())
    theirs = float((F.dropout(x, 0.1) == 0).double().mean())
    assert abs(ours - theirs) < 0.005


@pytest.mark.parametrize("p", [-0.1, 1.5, True, "0.1", None])
def test_bad_p_is_a_value_error(p):
    with pytest.raises(ValueError, match="dropout probability p"):
        dropout(torch.ones(3), p)
    with pytest.raises(ValueError, match="dropout probability p"):
        Dropout(p)


def test_model_blocks_drop_both_branches_and_are_deterministic_in_eval():
    model = CLEAR(get_config("tiny", dropout=0.5))
    drops = [m for m in model.modules() if isinstance(m, Dropout)]
    assert len(drops) == 2 * (len(model.encoder) + len(model.decoder)) and all(m.p == 0.5 for m in drops)
    block = model.encoder[0]
    assert block.attn.dropout.p == 0.0  # the block's Dropout is the only one on the attention branch
    torch.manual_seed(0)
    b, beats = 2, 5
    tokens = torch.randn(b, 12, beats, 96)
    valid = torch.ones(b, 12, beats, dtype=torch.bool)
    time = torch.arange(beats).expand(b, 12, beats).contiguous()
    model.eval()
    a = model.forward_features(tokens, valid, time)
    assert torch.equal(a, model.forward_features(tokens, valid, time))
    model.train()
    assert not torch.equal(a, model.forward_features(tokens, valid, time))


@pytest.mark.skipif(not _native_mask_available(), reason="native extension not built")
def test_native_mask_depends_on_seed_and_shape_only():
    like = torch.empty(3, 1001)
    masks = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        masks.append(native_ext.dropout_mask(like, 0.3, 12345))
    torch.set_num_threads(2)
    assert torch.equal(*masks)
    assert not torch.equal(masks[0], native_ext.dropout_mask(like, 0.3, 12346))
    # A bfloat16 mask drops the same elements as the float32 one of the same seed.
    assert torch.equal(native_ext.dropout_mask(like.bfloat16(), 0.3, 12345) == 0, masks[0] == 0)


@pytest.mark.skipif(not _native_mask_available(), reason="native extension not built")
def test_native_mask_op_checks_and_bad_arguments():
    torch.library.opcheck(torch.ops.clear_kernels.dropout_mask.default, (torch.empty(4, 9), 0.25, 3))
    with pytest.raises(RuntimeError, match="p must be in"):
        native_ext.dropout_mask(torch.empty(3), 1.5, 0)
    with pytest.raises(RuntimeError, match="drops everything"):
        native_ext.dropout_mask(torch.empty(3), 1.0, 0)
    with pytest.raises(RuntimeError, match="floating-point"):
        native_ext.dropout_mask(torch.empty(3, dtype=torch.int64), 0.5, 0)


def test_the_model_uses_the_native_mask_when_built(monkeypatch):
    calls = []
    real = native_ext.dropout_mask
    monkeypatch.setattr(native_ext, "dropout_mask", lambda *a: calls.append(a) or real(*a))
    out = dropout(torch.ones(100), 0.5)
    assert (len(calls) == 1) == _native_mask_available()
    assert 0 < int((out == 0).sum()) < 100


def test_compiles_in_one_graph():
    # The seed draw of the CPU mask is a host read: under torch.compile the compiler's own dropout is used instead.
    fn = torch.compile(lambda x: dropout(x, 0.5) * 2, fullgraph=True, backend="aot_eager")
    out = fn(torch.ones(1000))
    assert 0 < int((out == 0).sum()) < 1000
