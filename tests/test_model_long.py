"""Long records: no length cap, position codes that extend to any length, the named-tuple output."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny_config, token_batch

from clear_hug.config import get_config
from clear_hug.masking import random_mask
from clear_hug.model import CLEAR, CLEAROutput, znorm


def _long_batch(beats, batch=1, leads_present=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, 12, beats, 96, generator=g)
    valid = torch.zeros(batch, 12, beats, dtype=torch.bool)
    valid[:, :leads_present] = True
    tokens = tokens * valid[..., None]
    # About 75 beats per minute: the second of the record each R peak falls in.
    time = (torch.arange(beats) * 4 // 5).expand(batch, 12, beats).contiguous()
    return tokens, valid, time


def test_forward_returns_a_named_tuple():
    model = CLEAR(tiny_config())
    tokens, valid, time = token_batch(2)
    mask = random_mask(valid, 0.8, torch.Generator().manual_seed(0))
    out = model(tokens, valid, time, mask)
    assert isinstance(out, CLEAROutput)
    loss, pred, target, got_mask = out  # unpacks like a tuple
    assert loss is out.loss and pred.shape == tokens.shape and torch.equal(got_mask, mask & valid)


def test_model_built_for_15_beats_runs_on_600():
    """A model trained on 15-beat strips (a few steps here) runs on a 600-beat record, and its position codes of
    the first 15 beats are the same whatever the record's length (nothing is sized by the length)."""
    torch.manual_seed(0)
    model = CLEAR(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        tokens, valid, time = token_batch(4, beats=15)
        loss = model(tokens, valid, time, random_mask(valid, 0.8, gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tokens, valid, time = _long_batch(600)
    with torch.no_grad():
        out = model(tokens, valid, time, random_mask(valid, 0.8, gen))
        grid, summary = model.forward_tokens(tokens, valid, time)
        short = model.enc_pos(time[..., :15], valid[..., :15])
        long = model.enc_pos(time, valid)[..., :15, :]
    assert out.pred.shape == (1, 12, 600, 96) and torch.isfinite(out.loss)
    assert grid.shape == (1, 12, 600, model.cfg.enc_dim) and torch.isfinite(grid).all()
    assert torch.isfinite(summary).all()
    torch.testing.assert_close(short, long, rtol=0, atol=0)
    # Beats far apart get different codes (the code does not saturate at the trained length).
    codes = model.enc_pos(time, valid)[0, 0]
    assert (codes[599] - codes[15]).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["small", "base"])
@pytest.mark.parametrize("beats", [150, 600])
def test_presets_accept_long_records_without_overrides(preset, beats):
    """``CLEAR(get_config(preset))`` takes 150 and 600 beats as it is. ``base`` at 600 beats runs a one-lead
    Holter-like record (the other 11 leads flagged missing) to keep the test fast; ``small`` runs all 12 leads."""
    torch.manual_seed(0)
    model = CLEAR(get_config(preset)).eval()
    leads = 1 if (preset == "base" and beats == 600) else 12
    tokens, valid, time = _long_batch(beats, leads_present=leads)
    with torch.no_grad():
        out = model(tokens, valid, time, random_mask(valid, 0.8, torch.Generator().manual_seed(0)))
    assert out.pred.shape == (1, 12, beats, 96)
    assert torch.isfinite(out.loss) and int(out.mask.sum()) == round(0.8 * leads * beats)


def _largest_square(fn, min_len):
    """Run ``fn`` and return the shapes of tensors created on the way (forward and backward) that have two dims of
    at least ``min_len``: an L x L tensor of some kind."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    found = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and sum(s >= min_len for s in t.shape) >= 2:
                    found.append((str(func), tuple(t.shape)))
            return out

    with Watch():
        fn()
    return found


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_no_l_by_l_tensor_on_the_sparse_path(impl):
    """A 600-beat record through masking, encoder, decoder, loss, backward and the per-beat head: the sparse path
    makes no tensor with two sequence-length dims; the dense path (the control) does."""
    from clear_hug.heads import BeatHead

    torch.manual_seed(0)
    model = CLEAR(tiny_config(attn_impl=impl))
    head = BeatHead(model.cfg.enc_dim, 2)
    tokens, valid, time = _long_batch(600)
    min_len = 12 + round(0.2 * 12 * 600)  # the encoder's sequence; the decoder's is 5x longer

    def step():
        mask = random_mask(valid, 0.8, torch.Generator().manual_seed(0))
        loss = model(tokens, valid, time, mask).loss
        grid, _ = model.forward_tokens(tokens, valid, time)
        logits = head(BeatHead.pool_leads(grid, valid), valid.any(1))
        (loss + logits.square().mean()).backward()

    found = _largest_square(step, min_len)
    if impl == "sparse":
        assert found == []
    else:
        assert found and max(s[-1] for _, s in found) >= 12 + 12 * 600


def test_position_code_starts_and_moves_below_the_heartbeat_content():
    """Regression for the demo's pretrained encoder falling behind a random one after the position tables became a
    learned map of sinusoidal codes: fed unscaled codes (norm 5.7, where a table lookup's one-hot has 1), the map
    started at 0.56 of the heartbeat embedding's RMS and one Adam step moved it 2.5x as far as the embedding, so
    position swamped content in every token. At the tables' scale it starts at ~0.1 and moves less."""
    torch.manual_seed(0)
    model = CLEAR(tiny_config())
    tokens, valid, time = token_batch(4)

    def position() -> torch.Tensor:  # the time and beat part (the lead embedding is a table already)
        return (model.enc_pos(time, valid) - model.enc_pos.lead[:, None])[valid]

    def rms(x: torch.Tensor) -> float:
        return float(x.pow(2).mean().sqrt())

    pos0, content0 = position().detach(), model.embed(znorm(tokens))[valid].detach()
    assert rms(pos0) < 0.25 * rms(content0)
    lr = 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model(tokens, valid, time, random_mask(valid, 0.8, torch.Generator().manual_seed(0))).loss.backward()
    opt.step()
    with torch.no_grad():
        pos_step, content_step = rms(position() - pos0), rms(model.embed(znorm(tokens))[valid] - content0)
    assert pos_step < content_step
