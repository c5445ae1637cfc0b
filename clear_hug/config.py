"""Model configuration for CLEAR: one dataclass and named presets (docs/clear_hug.md, Model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

ATTN_IMPLS = ("sparse", "dense", "full")


@dataclass(frozen=True)
class CLEARConfig:
    # Token grid: 12 leads x any number of heartbeats of token_len samples (100 Hz, 0.96 s windows). There is
    # no length cap: time and beat positions are sinusoidal, so a model trained on 10 s strips runs on hours.
    num_leads: int = 12
    token_len: int = 96
    # Encoder (sees the summary tokens and the visible heartbeats).
    enc_layers: int = 12
    enc_dim: int = 768
    enc_heads: int = 8
    enc_ffn: int = 1024
    # Decoder (sees every heartbeat slot, masked ones as the mask token).
    dec_layers: int = 4
    dec_dim: int = 512
    dec_heads: int = 16
    dec_ffn: int = 1024
    dropout: float = 0.1
    mask_ratio: float = 0.8
    # "sparse": the clear_kernels op; "dense": SDPA with the same materialised mask; "full": no conduction mask.
    attn_impl: str = "sparse"

    def __post_init__(self) -> None:
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        for dim, heads, name in ((self.enc_dim, self.enc_heads, "enc"), (self.dec_dim, self.dec_heads, "dec")):
            if dim % heads:
                raise ValueError(f"{name}_dim={dim} must be divisible by {name}_heads={heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CLEARConfig:
        # Fields of older configs (max_beats, num_time: the learned position tables' sizes) are ignored.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


PRESETS: dict[str, CLEARConfig] = {
    # The paper's size.
    "base": CLEARConfig(),
    # Trains in a few minutes on 2 CPU cores (the demo's model); head dims stay >= 16 for the kernels.
    "small": CLEARConfig(enc_layers=4, enc_dim=128, enc_heads=4, enc_ffn=256,
                         dec_layers=2, dec_dim=128, dec_heads=4, dec_ffn=256, dropout=0.0),
    # For tests: seconds per epoch on tiny data.
    "tiny": CLEARConfig(enc_layers=2, enc_dim=32, enc_heads=2, enc_ffn=64,
                        dec_layers=1, dec_dim=32, dec_heads=2, dec_ffn=64, dropout=0.0),
}


def get_config(preset: str = "base", **overrides: int | float | str | None) -> CLEARConfig:
    """A preset with some fields replaced (``None`` values are ignored, so CLI defaults can pass through)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class ModelChoice:
    """A model as the commands name it (``--preset``, ``--attn-impl``, ...): a preset and the config fields that
    replace the preset's (None: the preset's own)."""

    preset: str = field(default="base", metadata={"choices": tuple(sorted(PRESETS))})
    attn_impl: str | None = field(default=None, metadata={"choices": ATTN_IMPLS})
    dropout: float | None = None
    mask_ratio: float | None = None

    def config(self) -> CLEARConfig:
        return get_config(self.preset, attn_impl=self.attn_impl, dropout=self.dropout, mask_ratio=self.mask_ratio)
