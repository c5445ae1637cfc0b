"""Downstream heads on the 12 lead summary outputs ``[B, 12, E]`` of the encoder (docs/clear_hug.md, Heads)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

# Lead order I, II, III, aVR, aVL, aVF, V1-V6, the order of every lead axis in the package (data/leads.py).
LEAD_GROUPS = {"limb": (0, 1, 2), "augmented": (3, 4, 5), "chest": (6, 7, 8, 9, 10, 11)}
GROUP_PAIRS = ((0, 1), (0, 2), (1, 2))
FUSIONS = ("mean", "concat")
# HUG's experts by level: the three lead groups, the three pairs of groups, all of them.
EXPERTS = (("limb", 1), ("augmented", 1), ("chest", 1), ("limb+augmented", 2), ("limb+chest", 2),
           ("augmented+chest", 2), ("all groups", 3))


class HUG(nn.Module):
    """Hierarchical lead-group head.

    Level 1: one linear expert per lead group over the mean of that group's summary outputs (3 outputs).
    Level 2: one linear expert per pair of groups over the two level-1 outputs, concatenated (3 outputs).
    Level 3: one linear expert over the three level-2 outputs, concatenated (1 output).
    The 7 outputs are fused (mean, or concatenation) and a linear layer gives the class logits.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int | None = None, fusion: str = "mean") -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        hidden = hidden or in_dim
        self.fusion = fusion
        self.groups = [torch.tensor(idx) for idx in LEAD_GROUPS.values()]
        self.level1 = nn.ModuleList(nn.Linear(in_dim, hidden) for _ in LEAD_GROUPS)
        self.level2 = nn.ModuleList(nn.Linear(2 * hidden, hidden) for _ in GROUP_PAIRS)
        self.level3 = nn.Linear(3 * hidden, hidden)
        self.classifier = nn.Linear(hidden * (7 if fusion == "concat" else 1), num_classes)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        if summary.dim() != 3 or summary.shape[1] != 12:
            raise ValueError(f"summary must be [B, 12, E], got {tuple(summary.shape)}")
        l1 = [expert(summary[:, idx.to(summary.device)].mean(1)) for expert, idx in zip(self.level1, self.groups)]
        l2 = [expert(torch.cat([l1[a], l1[b]], -1)) for expert, (a, b) in zip(self.level2, GROUP_PAIRS)]
        l3 = self.level3(torch.cat(l2, -1))
        outs = l1 + l2 + [l3]
        fused = torch.stack(outs, 0).mean(0) if self.fusion == "mean" else torch.cat(outs, -1)
        return self.classifier(fused)

    def expert_contributions(self, summary: torch.Tensor) -> torch.Tensor:
        """Each of the 7 experts' share of the class logits, ``[B, 7, C]`` in the order of ``EXPERTS``.

        The classifier is linear in the fused outputs, so the logits are exactly these shares summed plus the
        classifier's bias: what each lead group (level 1), pair of groups (level 2) and the whole (level 3) added.
        """
        if summary.dim() != 3 or summary.shape[1] != 12:
            raise ValueError(f"summary must be [B, 12, E], got {tuple(summary.shape)}")
        l1 = [expert(summary[:, idx.to(summary.device)].mean(1)) for expert, idx in zip(self.level1, self.groups)]
        l2 = [expert(torch.cat([l1[a], l1[b]], -1)) for expert, (a, b) in zip(self.level2, GROUP_PAIRS)]
        outs = l1 + l2 + [self.level3(torch.cat(l2, -1))]
        w = self.classifier.weight  # [C, hidden] (mean) or [C, 7 * hidden] (concat)
        if self.fusion == "mean":
            return torch.stack([o @ w.T / len(outs) for o in outs], 1)
        return torch.stack([o @ wk.T for o, wk in zip(outs, w.chunk(len(outs), dim=1))], 1)


class LinearProbe(nn.Module):
    """The baseline head: one linear layer on the mean of the 12 summary outputs."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        if summary.dim() != 3:
            raise ValueError(f"summary must be [B, leads, E], got {tuple(summary.shape)}")
        return self.linear(summary.mean(1))

    def lead_contributions(self, summary: torch.Tensor) -> torch.Tensor:
        """Each lead's share of the class logits, ``[B, leads, C]``: the logits are their sum plus the bias."""
        if summary.dim() != 3:
            raise ValueError(f"summary must be [B, leads, E], got {tuple(summary.shape)}")
        return summary @ self.linear.weight.T / summary.shape[1]


def build_head(kind: str, in_dim: int, num_classes: int, fusion: str = "mean") -> nn.Module:
    if kind == "hug":
        return HUG(in_dim, num_classes, fusion=fusion)
    if kind == "linear":
        return LinearProbe(in_dim, num_classes)
    raise ValueError(f"head must be 'hug' or 'linear', got {kind!r}")


class Classifier(nn.Module):
    """Encoder + head, for fine-tuning the encoder end to end (the frozen path precomputes features instead)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(tokens, valid, time))

    def save_pretrained(self, directory: str | os.PathLike, class_names: Sequence[str],
                        preprocessing: dict | None = None) -> os.PathLike:
        """Write ``model.safetensors`` + ``config.json`` (see ``clear_hug.checkpoint.save_pretrained``)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory, class_names=class_names, preprocessing=preprocessing)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Classifier:
        """The classifier saved by ``save_pretrained`` (no pickle is read); class names: ``load_pretrained_config``."""
        from .checkpoint import from_pretrained

        return from_pretrained(directory, kind="classifier")

    def predict_record(self, path: str | os.PathLike, device: str | None = None) -> dict:
        """Class probabilities of one WFDB record on disk (no token cache): ``{"record", "path", "beats",
        "beats_dropped", "probabilities": {class: p}}``. Needs the class names and preprocessing that
        ``from_pretrained`` reads; a record that cannot be read raises ``RecordReadError``."""
        from .predict import predict_record

        return predict_record(self, path, device)

class BeatHead(nn.Module):
    """Per-beat head beside HUG: token outputs to per-beat logits ``[B, beats, C]``.

    Beat ``j`` is the same cardiac cycle in every lead, so its token outputs are first averaged over the leads
    where it is valid (``pool_leads``, done once when the encoder is frozen). A depthwise convolution over
    ``context`` neighbouring beats then lets a beat see the rhythm around it (AF is irregularity over several
    beats), and an MLP gives the logits. Cost and memory are linear in beats; beats without a valid lead give
    zero features and are masked out of the loss.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int | None = None, context: int = 9) -> None:
        super().__init__()
        if context < 1 or context % 2 == 0:
            raise ValueError(f"context must be a positive odd number of beats, got {context}")
        hidden = hidden or in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.mix = nn.Conv1d(in_dim, in_dim, context, padding=context // 2, groups=in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    @staticmethod
    def pool_leads(grid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, leads, beats, E]`` token outputs to ``[B, beats, E]``: the mean over the leads a beat is valid in."""
        if grid.dim() != 4 or valid.shape != grid.shape[:3]:
            raise ValueError(f"grid must be [B, leads, beats, E] with valid [B, leads, beats], got "
                             f"{tuple(grid.shape)} and {tuple(valid.shape)}")
        w = valid.to(grid.dtype)[..., None]
        return (grid * w).sum(1) / w.sum(1).clamp(min=1.0)

    def forward(self, beats: torch.Tensor, beat_valid: torch.Tensor) -> torch.Tensor:
        """``beats [B, n, E]`` (from ``pool_leads``) and ``beat_valid [B, n]`` to logits ``[B, n, C]``."""
        if beats.dim() != 3 or beat_valid.shape != beats.shape[:2]:
            raise ValueError(f"beats must be [B, n, E] with beat_valid [B, n], got {tuple(beats.shape)} and "
                             f"{tuple(beat_valid.shape)}")
        x = self.norm(beats) * beat_valid[..., None]  # padding beats add nothing to their neighbours
        x = x + self.mix(x.transpose(1, 2)).transpose(1, 2)
        return self.mlp(x)


class BeatClassifier(nn.Module):
    """Encoder + per-beat head, end to end: ``(tokens, valid, time) -> [B, beats, C]`` logits."""

    def __init__(self, encoder: nn.Module, head: BeatHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        grid, _ = self.encoder.forward_tokens(tokens, valid, time)
        return self.head(BeatHead.pool_leads(grid, valid), valid.any(1))
