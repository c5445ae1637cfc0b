"""CLEAR: presets, shapes, the conduction rule inside the model, sparse/dense parity, masking and the loss."""

import pytest
import torch
from model_fixtures import tiny_config, token_batch

from clear_hug.config import PRESETS, get_config
from clear_hug.masking import random_mask
from clear_hug.model import CLEAR, _Attend, count_parameters, znorm


def test_base_preset_is_the_paper_size():
    cfg = PRESETS["base"]
    assert (cfg.enc_layers, cfg.enc_dim, cfg.enc_heads, cfg.enc_ffn) == (12, 768, 8, 1024)
    assert (cfg.dec_layers, cfg.dec_dim, cfg.dec_heads, cfg.dec_ffn) == (4, 512, 16, 1024)
    assert cfg.dropout == 0.1 and cfg.mask_ratio == 0.8
    model = CLEAR(cfg)
    # Per encoder block: qkv+out (4 E^2 + 4E), FFN (2 E F + E + F), two norms (4E).
    e, f, d, fd = 768, 1024, 512, 1024
    enc_block = 4 * e * e + 4 * e + 2 * e * f + e + f + 4 * e
    dec_block = 4 * d * d + 4 * d + 2 * d * fd + d + fd + 4 * d
    assert sum(p.numel() for p in model.encoder.parameters()) == 12 * enc_block
    assert sum(p.numel() for p in model.decoder.parameters()) == 4 * dec_block
    assert 50e6 < count_parameters(model) < 60e6


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_shapes(preset):
    cfg = get_config(preset)
    model = CLEAR(cfg)
    tokens, valid, time = token_batch(3)
    mask = random_mask(valid, cfg.mask_ratio, torch.Generator().manual_seed(0))
    out = model(tokens, valid, time, mask)
    assert out.pred.shape == tokens.shape and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert model.forward_features(tokens, valid, time).shape == (3, 12, cfg.enc_dim)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_inputs_raise():
    model = CLEAR(tiny_config())
    tokens, valid, time = token_batch(2)
    with pytest.raises(ValueError, match="tokens"):
        model.forward_features(tokens[..., :90], valid, time)
    with pytest.raises(ValueError, match="at least one beat"):
        model.forward_features(tokens[:, :, :0], valid[:, :, :0], time[:, :, :0])
    with pytest.raises(ValueError, match="attn_impl"):
        tiny_config(attn_impl="flash")


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_first_layer_follows_the_conduction_rule(impl):
    """Perturbing one heartbeat changes, after one encoder block, exactly the same beat in every lead and its
    own lead's summary token (and nothing else)."""
    torch.manual_seed(0)
    model = CLEAR(tiny_config(attn_impl=impl)).double().eval()
    tokens, valid, time = token_batch(2, dtype=torch.float64)
    b, lead, beat = 1, 4, 3
    bumped = tokens.clone()
    bumped[b, lead, beat] += torch.randn(96, dtype=torch.float64)
    with torch.no_grad():
        x0, layout = model.encode(tokens, valid, time, depth=1)
        x1, _ = model.encode(bumped, valid, time, depth=1)
    grid0, summary0 = layout.seq_to_grid(x0)
    grid1, summary1 = layout.seq_to_grid(x1)
    changed_grid = (grid0 - grid1).abs().amax(-1) > 1e-12
    changed_summary = (summary0 - summary1).abs().amax(-1) > 1e-12
    expected_grid = torch.zeros_like(changed_grid)
    expected_grid[b, :, beat] = valid[b, :, beat]
    expected_summary = torch.zeros_like(changed_summary)
    expected_summary[b, lead] = True
    assert torch.equal(changed_grid, expected_grid)
    assert torch.equal(changed_summary, expected_summary)
    # Two blocks spread it further (through the summary token to the whole lead), so the check can fail.
    with torch.no_grad():
        y0, _ = model.encode(tokens, valid, time, depth=2)
        y1, _ = model.encode(bumped, valid, time, depth=2)
    g0, _ = layout.seq_to_grid(y0)
    g1, _ = layout.seq_to_grid(y1)
    assert ((g0 - g1).abs().amax(-1) > 1e-12)[b, lead].sum() > 1


def _loss_and_grads(impl, state, tokens, valid, time, mask):
    model = CLEAR(tiny_config(attn_impl=impl)).double()
    model.load_state_dict(state)
    out = model(tokens, valid, time, mask)
    feats = model.forward_features(tokens, valid, time)
    grads = torch.autograd.grad(out.loss + feats.square().mean(), list(model.parameters()))
    return out, feats, grads


def test_sparse_and_dense_agree_in_outputs_and_gradients():
    torch.manual_seed(1)
    state = CLEAR(tiny_config()).double().state_dict()
    tokens, valid, time = token_batch(3, dtype=torch.float64, seed=2)
    mask = random_mask(valid, 0.8, torch.Generator().manual_seed(3))
    s_out, s_feats, s_grads = _loss_and_grads("sparse", state, tokens, valid, time, mask)
    d_out, d_feats, d_grads = _loss_and_grads("dense", state, tokens, valid, time, mask)
    torch.testing.assert_close(s_out.pred, d_out.pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_out.loss, d_out.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_feats, d_feats, rtol=1e-10, atol=1e-10)
    # float64: a wrong mask shows up at 1e-3; summation order across threads moves the smallest grads ~1e-12.
    for gs, gd in zip(s_grads, d_grads):
        torch.testing.assert_close(gs, gd, rtol=1e-8, atol=1e-10)
    # "full" drops the conduction mask, so it must give something else on the same weights.
    f_out, f_feats, _ = _loss_and_grads("full", state, tokens, valid, time, mask)
    assert (f_feats - d_feats).abs().max() > 1e-4
    assert torch.isfinite(f_out.loss)


def test_sparse_and_dense_agree_in_float32():
    torch.manual_seed(4)
    state = CLEAR(tiny_config()).state_dict()
    tokens, valid, time = token_batch(3, seed=5)
    mask = random_mask(valid, 0.8, torch.Generator().manual_seed(6))
    outs, grads = [], []
    for impl in ("sparse", "dense"):
        model = CLEAR(tiny_config(attn_impl=impl))
        model.load_state_dict(state)
        outs.append(model.forward_features(tokens, valid, time))
        grads.append(torch.autograd.grad(model(tokens, valid, time, mask).loss, list(model.parameters())))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for gs, gd in zip(*grads):
        torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)


def test_mask_draws_the_ratio_per_sample_and_never_padding():
    tokens, valid, time = token_batch(6, seed=6)
    g = torch.Generator().manual_seed(0)
    m1, m2 = random_mask(valid, 0.8, g), random_mask(valid, 0.8, g)
    assert not (m1 & ~valid).any()
    n_valid = valid.flatten(1).sum(1)
    assert torch.equal(m1.flatten(1).sum(1), torch.round(n_valid * 0.8).long())
    # Per sample: two records with the same valid tokens get different masks, and draws differ.
    assert not torch.equal(m1, m2)
    same = valid[0:1].expand(4, -1, -1)
    m = random_mask(same, 0.8, torch.Generator().manual_seed(1))
    assert len({tuple(x.flatten().tolist()) for x in m}) == 4


def test_loss_counts_masked_tokens_only():
    torch.manual_seed(7)
    model = CLEAR(tiny_config()).double().eval()
    tokens, valid, time = token_batch(3, dtype=torch.float64, seed=8)
    mask = random_mask(valid, 0.8, torch.Generator().manual_seed(9))
    out = model(tokens, valid, time, mask)
    err = (out.pred - znorm(tokens)).pow(2).mean(-1)
    torch.testing.assert_close(out.loss, err[mask].mean())
    # Garbage in padding slots changes nothing (it is neither seen nor scored).
    padded = tokens.clone()
    padded[~valid] = 1e3 * torch.randn_like(padded[~valid])
    torch.testing.assert_close(model(padded, valid, time, mask).loss, out.loss, rtol=0, atol=0)
    # A mask that marks padding is clipped to the valid tokens.
    torch.testing.assert_close(model(tokens, valid, time, mask | ~valid).loss, out.loss, rtol=0, atol=0)


def test_targets_are_znormalised_per_token():
    x = torch.randn(4, 96, dtype=torch.float64) * 5 + 3
    z = znorm(x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(-1, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(znorm(torch.zeros(2, 96)), torch.zeros(2, 96))


def _grid_formulation(model, tokens, valid, time, mask):
    """CLEAR's forward written on the token grid, as the model first stated it: embed and position-code every grid
    token, move the grid into the sequence, and build the decoder's input on the grid too. The model builds both
    inputs in the sequence instead (only the tokens it holds); this is the statement it must keep."""
    from clear_kernels import SegmentLayout

    mask = mask & valid
    visible = valid & ~mask
    enc_layout = SegmentLayout.conduction(visible, compact=True)
    grid = model.embed(znorm(tokens)) + model.enc_pos(time, valid)
    x = enc_layout.grid_to_seq(grid, summary=model.summary + model.enc_pos.lead)
    for block in model.encoder:
        x = block(x, _Attend(enc_layout, model.cfg.attn_impl))
    enc_grid, enc_summary = enc_layout.seq_to_grid(model.enc_norm(x))
    y = torch.where(visible[..., None], model.dec_embed(enc_grid), model.mask_token) + model.dec_pos(time, valid)
    layout = SegmentLayout.conduction(valid, compact=True)
    seq = layout.grid_to_seq(y, summary=model.dec_embed(enc_summary) + model.dec_pos.lead)
    for block in model.decoder:
        seq = block(seq, _Attend(layout, model.cfg.attn_impl))
    pred, _ = layout.seq_to_grid(model.recon(model.dec_norm(seq)))
    err = (pred - znorm(tokens)).pow(2).mean(-1)
    return (err * mask).sum() / mask.sum(), pred


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_sequence_built_inputs_equal_the_grid_formulation(impl):
    """Outputs and every gradient equal the grid statement's, on ragged records (different lengths, a missing lead,
    a dropped beat) and garbage time ids in padding."""
    torch.manual_seed(10)
    model = CLEAR(tiny_config(attn_impl=impl)).double()
    tokens, valid, time = token_batch(3, dtype=torch.float64, seed=11)
    valid[1, 4] = False
    valid[2, 7, 2] = False
    tokens = tokens * valid[..., None]
    time = torch.where(valid, time, 10_000)
    mask = random_mask(valid, 0.8, torch.Generator().manual_seed(12))
    params = list(model.parameters())
    out = model(tokens, valid, time, mask)
    ref_loss, ref_pred = _grid_formulation(model, tokens, valid, time, mask)
    torch.testing.assert_close(out.pred, ref_pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
    for g, ref in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref_loss, params)):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
