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


def znorm(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token z-normalisation over the samples (last dim). Idempotent on tokens the tokenizer already
    normalised, and all-zero padding tokens stay zero."""
    mean = tokens.mean(-1, keepdim=True)
    std = tokens.std(-1, keepdim=True, unbiased=False)
    return (tokens - mean) / (std + eps)


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
        return attn.dropout(attn.out_proj(rearrange(out, "b h l d -> b l (h d)")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SegmentAttention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, attend: _Attend) -> torch.Tensor:
        x = x + attend(self.attn, self.norm1(x))
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
        beats = time.shape[-1]
        t = torch.where(valid, time, torch.zeros_like(time))  # padding may carry any time id
        beat = torch.arange(beats, device=time.device).expand_as(t)
        codes = torch.cat([sinusoid(t), sinusoid(beat)], -1) * _CODE_SCALE
        return self.lead[:, None, :] + self.proj(codes.to(self.proj.weight.dtype))


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
        grid = self.embed(znorm(tokens)) + self.enc_pos(time, valid)
        x = layout.grid_to_seq(grid, summary=self.summary + self.enc_pos.lead)
        attend = _Attend(layout, self.cfg.attn_impl)
        blocks = self.encoder if depth is None else self.encoder[:depth]
        for block in blocks:
            x = block(x, attend)
        return (self.enc_norm(x) if depth is None else x), layout

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
        enc_grid, enc_summary = enc_layout.seq_to_grid(x)
        y = self.dec_embed(enc_grid)
        y = torch.where(visible[..., None], y, self.mask_token.to(y.dtype)) + self.dec_pos(time, valid)
        layout = SegmentLayout.conduction(valid, compact=True)
        seq = layout.grid_to_seq(y, summary=self.dec_embed(enc_summary) + self.dec_pos.lead)
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
