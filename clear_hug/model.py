"""CLEAR: a masked autoencoder over heartbeat tokens with conduction-sparse attention (docs/clear_hug.md, Model).

Tokens live on a ``[B, leads, beats]`` grid (``tokens [B, leads, beats, 96]``, ``valid``, ``time``). Each block
runs on a sequence built by ``SegmentLayout.conduction``: the 12 lead summary tokens, then the valid heartbeats in
beat-major order. The encoder's sequence holds only the visible heartbeats (compacted, so L is about 20% of the
decoder's); the decoder's holds every valid heartbeat, masked ones as a learned mask token.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from clear_kernels import PADDING, SegmentLayout
from clear_kernels.nn import SegmentAttention

from .config import CLEARConfig
from .dropout import Dropout


def znorm(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token z-normalisation over the samples (last dim). Idempotent on tokens the tokenizer already
    normalised, and all-zero padding tokens stay zero."""
    mean = tokens.mean(-1, keepdim=True)
    centred = tokens - mean
    # Two passes (mean, then the mean square of the centred values) rather than Tensor.std, whose Welford
    # reduction over a 96-sample row is about 6 times slower on CPU; same value to float rounding.
    std = centred.square().mean(-1, keepdim=True).sqrt()
    return centred / (std + eps)


class _Attend:
    """Applies one block's attention under the layout of this forward pass, in the configured implementation.

    Built once per sequence and shared by all blocks, so the dense mask (for "dense"/"full") is built once.
    All implementations use the parameters of the same ``SegmentAttention`` module, so checkpoints move freely
    between them.
    """

    def __init__(self, layout: SegmentLayout, impl: str) -> None:
        self.layout, self.impl = layout, impl
        if impl == "sparse":
            return
        real = layout.segment != PADDING  # [B, L]
        # "full" is the paper's dense ablation: every real token sees every real token. Padding keys stay
        # excluded, since they carry no signal and would make results depend on the batch's padding.
        allowed = layout.materialize() if impl == "dense" else real[:, :, None] & real[:, None, :]
        # Padding rows have no key; let them see themselves so SDPA's softmax stays finite, then zero them,
        # as the op does.
        eye = torch.eye(layout.seq_len, dtype=torch.bool, device=real.device)
        self.mask = (allowed | (eye & ~real[:, :, None]))[:, None]
        self.pad_rows = ~real[:, None, :, None]

    def __call__(self, attn: SegmentAttention, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "sparse":
            return attn(x, self.layout)
        q, k, v = rearrange(attn.in_proj(x), "b l (three h d) -> three b h l d", three=3, h=attn.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=attn.scale)
        out = out.masked_fill(self.pad_rows, 0.0)
        return attn.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # The attention branch's dropout is the block's (self.drop, after attend), not the module's own, so both
        # branches use the cheap CPU mask of clear_hug.dropout and every attn_impl drops the same way.
        self.attn = SegmentAttention(dim, heads)
        self.drop = Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim), Dropout(dropout))

    def forward(self, x: torch.Tensor, attend: _Attend) -> torch.Tensor:
        x = x + self.drop(attend(self.attn, self.norm1(x)))
        return x + self.ffn(self.norm2(x))


# Periods of the sinusoidal encodings, geometric from 2 (the shortest an integer index resolves) to 20 000
# (5.5 hours in seconds, or beats): every record up to a day gets distinct, smoothly varying codes, and longer ones
# still get bounded, well-defined codes rather than an index error.
_NUM_FREQ = 16
_PERIODS = torch.logspace(math.log10(2.0), math.log10(20000.0), _NUM_FREQ, dtype=torch.float64)


# sinusoid() of time and of beat index, concatenated, has norm sqrt(2 * _NUM_FREQ); _Positions scales it to 1.
_CODE_SCALE = 1.0 / math.sqrt(2 * _NUM_FREQ)


def sinusoid(x: torch.Tensor) -> torch.Tensor:
    """``[...]`` positions (any real values) to ``[..., 2 * _NUM_FREQ]`` sin/cos features; defined for any length."""
    angle = x.to(torch.float64)[..., None] * (2 * math.pi / _PERIODS.to(x.device))
    return torch.cat([angle.sin(), angle.cos()], -1).to(torch.float32)


class _Positions(nn.Module):
    """Learned lead embedding plus a learned linear map of sinusoidal codes of the token's time (seconds from the
    start of the record or window) and beat index, summed per token.

    Sinusoids rather than learned tables, so no length is baked into the weights: a model trained on 15-beat strips
    runs on a 30-minute record, and the code of beat j does not depend on how many beats follow it.

    The concatenated codes (``4 * _NUM_FREQ`` values, each sin/cos pair of norm 1) are scaled to unit norm before
    the map, as a table lookup's one-hot input is. Unscaled (norm ``sqrt(2 * _NUM_FREQ)`` = 5.7), the map started
    at 0.56 of the heartbeat embedding's RMS (the tables: ~0.14), and since Adam moves every weight by about lr per
    step and every position uses every weight, one step moved it 2.5x as far as the embedding: position swamped
    content in every token, and the pretrained summary features fell behind a random encoder's (docs/clear_hug.md,
    "What it gives"). Scaled, it starts at ~0.1 of the embedding and moves about half as far per step.
    """

    def __init__(self, cfg: CLEARConfig, dim: int) -> None:
        super().__init__()
        self.lead = nn.Parameter(torch.zeros(cfg.num_leads, dim))
        self.proj = nn.Linear(4 * _NUM_FREQ, dim)

    def forward(self, time: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, leads, beats, dim]`` codes of every grid token."""
        beats = time.shape[-1]
        t = torch.where(valid, time, torch.zeros_like(time))  # padding may carry any time id
        beat = torch.arange(beats, device=time.device).expand_as(t)
        return self.lead[:, None, :] + self._map(t, beat)

    def at(self, time: torch.Tensor, beat: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` codes of tokens given by their time, beat index and lead (``[...]`` each): the codes
        ``forward`` gives those tokens on the grid, for a sequence of some of them."""
        # F.embedding rather than self.lead[lead]: the same rows, with a scatter-add gradient instead of index_put's
        # accumulate, ~3x faster on CPU for one table row per token.
        return F.embedding(lead, self.lead) + self._map(time, beat)

    def _map(self, time: torch.Tensor, beat: torch.Tensor) -> torch.Tensor:
        codes = torch.cat([sinusoid(time), sinusoid(beat)], -1) * _CODE_SCALE
        return self.proj(codes.to(self.proj.weight.dtype))


class CLEAROutput(NamedTuple):
    """What ``CLEAR.forward`` returns."""

    loss: torch.Tensor  # scalar: MSE over the masked valid tokens only
    pred: torch.Tensor  # [B, leads, beats, 96] the reconstruction
    target: torch.Tensor  # [B, leads, beats, 96] z-normalised input tokens
    mask: torch.Tensor  # [B, leads, beats] bool: the masked valid tokens the loss is over


class CLEAR(nn.Module):
    def __init__(self, cfg: CLEARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, d = cfg.enc_dim, cfg.dec_dim
        # Per-token linear embedding: no convolution across neighbouring tokens, so masking hides a token fully.
        self.embed = nn.Linear(cfg.token_len, e)
        self.enc_pos = _Positions(cfg, e)
        self.summary = nn.Parameter(torch.zeros(cfg.num_leads, e))
        self.encoder = nn.ModuleList(Block(e, cfg.enc_heads, cfg.enc_ffn, cfg.dropout) for _ in range(cfg.enc_layers))
        self.enc_norm = nn.LayerNorm(e)
        self.dec_embed = nn.Linear(e, d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.dec_pos = _Positions(cfg, d)
        self.decoder = nn.ModuleList(Block(d, cfg.dec_heads, cfg.dec_ffn, cfg.dropout) for _ in range(cfg.dec_layers))
        self.dec_norm = nn.LayerNorm(d)
        self.recon = nn.Linear(d, cfg.token_len)
        self.apply(self._init)
        for p in (self.summary, self.mask_token, self.enc_pos.lead, self.dec_pos.lead):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _check(self, tokens: torch.Tensor, valid: torch.Tensor, time: torch.Tensor) -> None:
        c = self.cfg
        if tokens.dim() != 4 or tokens.shape[1] != c.num_leads or tokens.shape[3] != c.token_len:
            raise ValueError(f"tokens must be [B, {c.num_leads}, beats, {c.token_len}], got {tuple(tokens.shape)}")
        if tokens.shape[2] < 1:
            raise ValueError("tokens must hold at least one beat per lead (a window with none is all padding)")
        if valid.shape != tokens.shape[:3] or time.shape != tokens.shape[:3]:
            raise ValueError(
                f"valid {tuple(valid.shape)} and time {tuple(time.shape)} must be {tuple(tokens.shape[:3])}")

    def encode(self, tokens: torch.Tensor, valid: torch.Tensor, time: torch.Tensor,
               visible: torch.Tensor | None = None,
               depth: int | None = None) -> tuple[torch.Tensor, SegmentLayout]:
        """Run the encoder on the summary tokens plus the ``visible`` heartbeats (all valid ones by default).

        Returns the ``[B, L, enc_dim]`` sequence and its layout. ``depth`` stops after that many blocks (without
        the final norm); tests use it to look at a single layer.
        """
        self._check(tokens, valid, time)
        visible = valid if visible is None else visible & valid
        layout = SegmentLayout.conduction(visible, compact=True)
        x = self._embed_sequence(layout, tokens, time)
        attend = _Attend(layout, self.cfg.attn_impl)
        blocks = self.encoder if depth is None else self.encoder[:depth]
        for block in blocks:
            x = block(x, attend)
        return (self.enc_norm(x) if depth is None else x), layout

    def _heartbeat_slots(self, layout: SegmentLayout, time: torch.Tensor,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the heartbeat slots of ``layout``'s sequence (all but the leading summary slots), ``[B, L - leads]``
        each: the token's time, beat and lead, and whether the slot is padding. A heartbeat slot's segment is its
        beat and its group its lead."""
        leads = self.cfg.num_leads
        segment = layout.segment[:, leads:]
        t = layout.grid_to_seq(time)[:, leads:]
        return t, segment.clamp(min=0), layout.group[:, leads:], segment < 0

    def _embed_sequence(self, layout: SegmentLayout, tokens: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """The encoder's input ``[B, L, enc_dim]``: the summary tokens, then each heartbeat of the sequence embedded
        with its position codes, zero padding. Built in the sequence rather than on the grid, so only the tokens in
        the sequence are embedded: in pretraining the encoder sees 20% of the grid."""
        leads = self.cfg.num_leads
        t, beat, lead, padding = self._heartbeat_slots(layout, time)
        tok = layout.grid_to_seq(tokens)[:, leads:]
        h = self.embed(znorm(tok)) + self.enc_pos.at(t, beat, lead)
        h = h.masked_fill(padding[..., None], 0.0)
        summary = (self.summary + self.enc_pos.lead).expand(layout.batch_size, leads, -1)
        return torch.cat([summary.to(h.dtype), h], dim=1)

    def _decoder_input(self, layout: SegmentLayout, enc_layout: SegmentLayout, y: torch.Tensor,
                       time: torch.Tensor) -> torch.Tensor:
        """The decoder's input ``[B, L, dec_dim]`` from ``y``, the encoder's sequence already mapped to ``dec_dim``:
        the summary tokens, then each heartbeat of ``layout``'s sequence as its encoder output (or the mask token
        where the encoder did not see it) plus its position codes, zero padding. Built in the sequence: every
        grid token is read once, from the encoder's sequence, with no grid-sized intermediate."""
        leads = self.cfg.num_leads
        batch, enc_len = y.shape[:2]
        t, beat, lead, padding = self._heartbeat_slots(layout, time)
        # Where each decoder heartbeat sits in the encoder's sequence: enc_len (one past its end) if masked.
        enc_slot = layout.grid_to_seq(enc_layout.grid_index.view(batch, leads, -1))[:, leads:]
        seen = enc_slot < enc_len
        rows = (enc_slot.clamp(max=enc_len - 1) + enc_len * torch.arange(batch, device=y.device)[:, None]).reshape(-1)
        h = y.reshape(batch * enc_len, -1).index_select(0, rows).view(batch, enc_slot.shape[1], -1)
        # torch.where, not a mask-token row in the gather: its gradient is then a sum (float accumulation under
        # bf16 autocast) rather than thousands of bf16 index_add steps into one row.
        h = torch.where(seen[..., None], h, self.mask_token.to(h.dtype))
        h = (h + self.dec_pos.at(t, beat, lead)).masked_fill(padding[..., None], 0.0)
        summary = y[:, :leads] + self.dec_pos.lead
        return torch.cat([summary.to(h.dtype), h], dim=1)

    def forward_features(self, tokens: torch.Tensor, valid: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """The 12 lead summary outputs ``[B, leads, enc_dim]`` of the encoder on every valid heartbeat."""
        x, _ = self.encode(tokens, valid, time)
        return x[:, : self.cfg.num_leads]

    def forward_tokens(self, tokens: torch.Tensor, valid: torch.Tensor,
                       time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs on every valid heartbeat: the token grid ``[B, leads, beats, enc_dim]`` (zeros at
        padding) and the 12 lead summaries ``[B, leads, enc_dim]``; per-beat heads read the grid."""
        x, layout = self.encode(tokens, valid, time)
        return layout.seq_to_grid(x)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, time: torch.Tensor,
                mask: torch.Tensor) -> CLEAROutput:
        """Reconstruct the masked heartbeats. ``mask`` (bool, like ``valid``) marks the masked tokens.

        Returns a ``CLEAROutput``: ``loss`` (MSE over the masked valid tokens only, targets z-normalised per
        token), ``pred`` (the ``[B, leads, beats, 96]`` reconstruction), ``target`` and ``mask``.
        """
        mask = mask & valid
        visible = valid & ~mask
        x, enc_layout = self.encode(tokens, valid, time, visible)
        layout = SegmentLayout.conduction(valid, compact=True)
        # dec_embed maps the encoder's sequence (the visible tokens), not the grid, where most tokens are masked.
        seq = self._decoder_input(layout, enc_layout, self.dec_embed(x), time)
        attend = _Attend(layout, self.cfg.attn_impl)
        for block in self.decoder:
            seq = block(seq, attend)
        pred, _ = layout.seq_to_grid(self.recon(self.dec_norm(seq)))
        # The loss is computed in at least float32 (bf16 autocast outputs are upcast; float64 stays float64).
        dtype = torch.promote_types(pred.dtype, torch.float32)
        pred = pred.to(dtype)
        target = znorm(tokens.to(dtype))
        err = (pred - target).pow(2).mean(-1)
        weight = mask.to(err.dtype)
        loss = (err * weight).sum() / weight.sum().clamp(min=1.0)
        return CLEAROutput(loss, pred, target, mask)

    def save_pretrained(self, directory: str | os.PathLike, preprocessing: dict | None = None) -> os.PathLike:
        """Write ``model.safetensors`` + ``config.json`` (see ``clear_hug.checkpoint.save_pretrained``)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory, preprocessing=preprocessing)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CLEAR:
        """The encoder saved by ``save_pretrained`` (no pickle is read)."""
        from .checkpoint import from_pretrained

        return from_pretrained(directory, kind="clear")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
