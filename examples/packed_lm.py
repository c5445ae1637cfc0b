"""A small GPT-style character model trained on packed causal documents, with segment attention and with SDPA.

    python examples/packed_lm.py                      # 30 steps at L = 2048 on this machine's CPU
    python examples/packed_lm.py --steps 5 --seq-len 256

The documents are the paragraphs (blank-line separated blocks) of a few modules of Python's standard library,
read from the installation, as bytes. They are packed into rows of ``--seq-len`` tokens; each document attends
only to itself, causally, and positions restart at every document. The same model (same initial weights, same
batches) is trained twice: once with ``clear_kernels.nn.SegmentAttention(is_causal=True)`` and once with
``scaled_dot_product_attention`` on the materialised ``[B, L, L]`` document-causal mask. It prints both loss
curves, their largest difference, and the ratio of the step times.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clear_kernels import SegmentLayout  # noqa: E402
from clear_kernels.nn import SegmentAttention  # noqa: E402

SOURCES = ("argparse.py", "textwrap.py", "difflib.py", "inspect.py", "typing.py", "dataclasses.py")


def documents(min_len: int = 20, max_len: int = 2000) -> list[bytes]:
    """The paragraphs of a few standard-library modules, as byte strings of ``min_len`` to ``max_len`` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in SOURCES:
        for block in (stdlib / name).read_bytes().split(b"\n\n"):
            block = block.strip(b"\n")
            if len(block) >= min_len:
                docs.append(block[:max_len])
    if not docs:
        raise RuntimeError(f"no text found in {stdlib} ({', '.join(SOURCES)})")
    return docs


def packed_batches(docs: list[bytes], batch: int, seq_len: int,
                   seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, SegmentLayout, torch.Tensor]]:
    """Endless batches: rows of documents packed back to back (the last one cut at the row's end).

    Yields ``(tokens [B, L], targets [B, L], layout, positions [B, L])``; a target is the next byte of the same
    document, or -100 (ignored) at a document's last token.
    """
    gen = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        targets = torch.full((batch, seq_len), -100, dtype=torch.long)
        positions = torch.zeros(batch, seq_len, dtype=torch.long)
        lengths = []
        for b in range(batch):
            row, filled = [], 0
            while filled < seq_len:
                doc = docs[int(torch.randint(len(docs), (1,), generator=gen))][: seq_len - filled]
                n = len(doc)
                t = torch.tensor(list(doc))
                tokens[b, filled:filled + n] = t
                targets[b, filled:filled + n - 1] = t[1:]
                positions[b, filled:filled + n] = torch.arange(n)
                row.append(n)
                filled += n
            lengths.append(row)
        width = max(map(len, lengths))
        layout = SegmentLayout.block_diagonal([r + [0] * (width - len(r)) for r in lengths], total_len=seq_len)
        yield tokens, targets, layout, positions


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, attention: str) -> None:
        super().__init__()
        self.attention = attention
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SegmentAttention(dim, heads, num_kv_heads=kv_heads, is_causal=True, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, layout: SegmentLayout, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        if self.attention == "segment":
            h = self.attn(h, layout)
        else:  # the baseline: the same projections around SDPA on the materialised mask
            a = self.attn
            kv = a.num_kv_heads * a.head_dim
            q, k, v = a.in_proj(h).split([a.embed_dim, kv, kv], dim=-1)
            q, k, v = (t.unflatten(-1, (n, a.head_dim)).transpose(1, 2)
                       for t, n in ((q, a.num_heads), (k, a.num_kv_heads), (v, a.num_kv_heads)))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                                 enable_gqa=a.num_kv_heads != a.num_heads)
            h = a.out_proj(out.transpose(1, 2).flatten(2))
        x = x + h
        return x + self.mlp(self.norm2(x))


class PackedLM(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, kv_heads: int = 2, layers: int = 2, max_len: int = 2048,
                 attention: str = "segment") -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, attention) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def set_attention(self, attention: str) -> None:
        for block in self.blocks:
            block.attention = attention

    def forward(self, tokens: torch.Tensor, layout: SegmentLayout, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(positions)
        mask = None
        if self.blocks[0].attention != "segment":
            mask = layout.materialize(is_causal=True)
            # Padding rows (none with full rows, but keep SDPA finite anyway) see themselves.
            mask = mask | torch.diag_embed(~mask.any(-1))
        for block in self.blocks:
            x = block(x, layout, mask)
        return self.head(self.norm(x))


def train(models: dict[str, PackedLM], batches: list, lr: float) -> dict[str, tuple[list[float], list[float]]]:
    """Trains every model on the same batches, one step of each in turn (so that a change in the machine's load
    hits all of them alike); returns each one's losses and step times."""
    opts = {name: torch.optim.AdamW(model.parameters(), lr=lr) for name, model in models.items()}
    record = {name: ([], []) for name in models}
    for tokens, targets, layout, positions in batches:
        for name, model in models.items():
            start = time.perf_counter()
            logits = model(tokens, layout, positions)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            record[name][1].append(time.perf_counter() - start)
            record[name][0].append(float(loss.detach()))
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up for the timing)")

    torch.manual_seed(args.seed)
    docs = documents()
    stream = packed_batches(docs, args.batch, args.seq_len, args.seed)
    batches = [next(stream) for _ in range(args.steps)]
    model = PackedLM(args.dim, args.heads, args.kv_heads, args.layers, max_len=args.seq_len, attention="segment")
    baseline = copy.deepcopy(model)
    baseline.set_attention("sdpa")

    record = train({"segment": model, "sdpa": baseline}, batches, args.lr)
    (seg_loss, seg_time), (sdpa_loss, sdpa_time) = record["segment"], record["sdpa"]

    # block_diagonal numbers a row's documents 0, 1, ...; full rows have no padding.
    docs_per_row = statistics.mean(int(layout.segment.max(dim=1).values.float().mean()) + 1
                                   for _, _, layout, _ in batches)
    print(f"{len(docs)} documents from {', '.join(SOURCES)}; rows of {args.seq_len} tokens hold "
          f"{docs_per_row:.1f} documents on average; {args.steps} steps of batch {args.batch}")
    print(f"{'step':>4}  {'segment_attention':>17}  {'sdpa + mask':>11}")
    for i, (a, b) in enumerate(zip(seg_loss, sdpa_loss)):
        print(f"{i:>4}  {a:>17.5f}  {b:>11.5f}")
    diff = max(abs(a - b) for a, b in zip(seg_loss, sdpa_loss))
    seg_step, sdpa_step = statistics.median(seg_time[1:]), statistics.median(sdpa_time[1:])
    print(f"largest loss difference: {diff:.2e} (float32 noise grows over training steps)")
    print(f"median step time: segment_attention {seg_step * 1e3:.1f} ms, sdpa + mask {sdpa_step * 1e3:.1f} ms, "
          f"ratio {sdpa_step / seg_step:.2f}x")
    if not all(math.isfinite(x) for x in seg_loss + sdpa_loss):
        raise RuntimeError("a training loss is not finite")
    return {"segment_loss": seg_loss, "sdpa_loss": sdpa_loss, "max_loss_diff": diff,
            "segment_step_s": seg_step, "sdpa_step_s": sdpa_step}


if __name__ == "__main__":
    main()
