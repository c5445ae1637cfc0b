"""Segment layouts: which query may attend which key, in a form the kernels can walk.

A layout describes, for each of the ``B`` batch elements, the ``L`` tokens of a sequence with two integers each
(SPEC §2.1):

* ``segment[t]``: ``>= 0`` the segment (heartbeat, document) of the token; ``-1`` a summary token; ``-2`` padding;
* ``group[t]``: ``0 <= group < num_groups`` the group (ECG lead) of the token; for a summary token the group it
  summarises.

Query ``q`` may attend key ``k`` iff neither is padding and
``(segment[q] >= 0 and segment[q] == segment[k]) or (group[q] == group[k] and -1 in (segment[q], segment[k]))``;
with ``is_causal`` a pair of the same segment also needs ``k <= q`` (positions). ``mask_from_ids`` is the one
statement of this rule.

Without ``is_causal`` the rule is symmetric, so the keys a query sees are also the queries that see that key; the
summary part stays symmetric with it, which is what the backward kernels rely on. Besides the ids, a layout
carries the index tensors the kernels walk instead of scanning all ``L``
keys per query (all int32, ``[B, ...]``, on the device of the ids):

* ``seg_start``/``seg_end`` ``[B, L]``: the run ``[start, end)`` of a segment token's segment (segments are
  contiguous); ``start == end == t`` for summary and padding tokens;
* ``group_index`` ``[B, L]`` with ``group_offsets`` ``[B, G + 1]``: the non-padding tokens sorted by (group,
  position), so group ``g``'s tokens are ``group_index[b, group_offsets[b, g]:group_offsets[b, g + 1]]``; the
  tail past ``group_offsets[b, G]`` holds padding positions and must not be read;
* ``summary_index`` ``[B, max_summary]`` with ``summary_offsets`` ``[B, G + 1]``: the same for summary tokens only.

Everything is built with vectorised tensor operations and no host synchronisation (``from_ids`` validates its
input, which does synchronise once; pass ``validate=False`` with ``num_groups`` and ``max_summary`` to skip that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

SUMMARY = -1
PADDING = -2
INT32_MAX = 2**31 - 1

_KERNEL_FIELDS = (
    "segment", "group", "seg_start", "seg_end",
    "group_index", "group_offsets", "summary_index", "summary_offsets",
)


def mask_from_ids(segment: torch.Tensor, group: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """``[B, L, L]`` bool: the attention rule of SPEC §2.1 evaluated on every pair of ``[B, L]`` ids.

    With ``is_causal`` a query of a segment sees the keys of its segment at its own position or before it (the
    causal mask of packed documents); pairs with a summary token are unchanged, so a summary token still sees
    every token of its group and is seen by all of them.
    """
    sq, sk = segment[:, :, None], segment[:, None, :]
    gq, gk = group[:, :, None], group[:, None, :]
    real = (sq != PADDING) & (sk != PADDING)
    same_segment = (sq >= 0) & (sq == sk)
    if is_causal:
        pos = torch.arange(segment.shape[1], device=segment.device)
        same_segment = same_segment & (pos[None, None, :] <= pos[None, :, None])
    summary_pair = (gq == gk) & ((sq == SUMMARY) | (sk == SUMMARY))
    return real & (same_segment | summary_pair)


def _sorted_positions(key_group: torch.Tensor) -> torch.Tensor:
    """Positions sorted by (key_group, position): a stable sort of the per-token group key."""
    return torch.sort(key_group, dim=1, stable=True).indices.to(torch.int32)


def _group_offsets(key_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B, G + 1]`` exclusive prefix sums of the per-group token counts (``key_group == G`` is not counted)."""
    batch = key_group.shape[0]
    counts = torch.zeros(batch, num_groups + 1, dtype=torch.int32, device=key_group.device)
    counts.scatter_add_(1, key_group.long(), torch.ones_like(key_group, dtype=torch.int32))
    offsets = torch.zeros(batch, num_groups + 1, dtype=torch.int32, device=key_group.device)
    offsets[:, 1:] = torch.cumsum(counts[:, :num_groups], dim=1)
    return offsets


def _runs(segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run starts/ends of equal non-negative ids along each row, and the mask of tokens that start a run."""
    batch, length = segment.shape
    dev = segment.device
    pos = torch.arange(length, device=dev, dtype=torch.int32).expand(batch, length)
    is_seg = segment >= 0
    prev = torch.nn.functional.pad(segment, (1, 0), value=PADDING)[:, :-1]
    nxt = torch.nn.functional.pad(segment, (0, 1), value=PADDING)[:, 1:]
    starts_run = is_seg & (prev != segment)
    ends_run = is_seg & (nxt != segment)
    # The run of a token starts at the last run start at or before it and ends after the first run end at or
    # after it: running max from the left, running min from the right.
    start = torch.cummax(torch.where(starts_run, pos, torch.zeros_like(pos)), dim=1).values
    end_cand = torch.where(ends_run, pos + 1, torch.full_like(pos, length))
    end = torch.flip(torch.cummin(torch.flip(end_cand, (1,)), dim=1).values, (1,))
    start = torch.where(is_seg, start, pos)
    end = torch.where(is_seg, end, pos)
    return start.to(torch.int32), end.to(torch.int32), starts_run


@dataclass(frozen=True, eq=False)
class SegmentLayout:
    """Which tokens may attend which, for a batch of sequences; shared by every layer and head.

    Build one with :meth:`from_ids`, :meth:`block_diagonal` or :meth:`conduction`; do not call the constructor.
    """

    segment: torch.Tensor
    group: torch.Tensor
    seg_start: torch.Tensor
    seg_end: torch.Tensor
    group_index: torch.Tensor
    group_offsets: torch.Tensor
    summary_index: torch.Tensor
    summary_offsets: torch.Tensor
    num_groups: int
    max_summary: int
    # Only for conduction layouts: the token grid is [leads, beats] and grid_index[b, lead * beats + beat] is the
    # sequence position of that token, or L (one past the end) where the token is not in the sequence.
    grid_shape: tuple[int, int] | None = None
    grid_index: torch.Tensor | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_ids(
        cls,
        segment: torch.Tensor,
        group: torch.Tensor | None = None,
        *,
        num_groups: int | None = None,
        max_summary: int | None = None,
        validate: bool = True,
    ) -> SegmentLayout:
        """A layout from raw ``[B, L]`` ids (SPEC §2.1). ``group`` defaults to all zeros.

        Summary tokens and padding may stand anywhere; the tokens of each segment must be contiguous. Ids must
        fit in int32 (they are stored as int32). With ``validate`` (the default) the ids are checked, which
        synchronises with the device once.

        Group ids are only compared, never counted: when ``num_groups`` (given, or the largest id + 1) exceeds
        ``L``, each row's group ids are replaced by their rank among that row's distinct ids, which keeps the
        mask and keeps the per-group tables ``O(B * L)`` (a group id of 2^30 would otherwise cost 4 GiB per row).
        """
        if not isinstance(segment, torch.Tensor):
            raise TypeError(f"segment must be a torch.Tensor, got {type(segment).__name__}")
        if group is None:
            group = torch.zeros_like(segment)
        if not isinstance(group, torch.Tensor):
            raise TypeError(f"group must be a torch.Tensor, got {type(group).__name__}")
        for name, t in (("segment", segment), ("group", group)):
            if t.dim() != 2:
                raise ValueError(f"{name} must be [B, L], got shape {tuple(t.shape)}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if segment.shape != group.shape:
            raise ValueError(f"segment {tuple(segment.shape)} and group {tuple(group.shape)} must have one shape")
        if segment.device != group.device:
            raise ValueError(f"segment is on {segment.device} but group is on {group.device}")
        if segment.shape[1] == 0:
            raise ValueError("segment must hold at least one token (L >= 1)")
        if segment.shape[0] == 0:
            raise ValueError("segment must hold at least one batch element (B >= 1), got shape (0, L)")
        if validate:
            num_groups, max_summary = _validate_ids(segment, group, num_groups, max_summary)
        elif num_groups is None or max_summary is None:
            raise ValueError("from_ids(validate=False) needs num_groups and max_summary")
        if num_groups > segment.shape[1]:
            group, num_groups = _group_ranks(segment, group, exact_count=validate)
        segment = segment.to(torch.int32).contiguous()
        # Padding tokens keep group 0 so that every stored group id is in range.
        group = torch.where(segment == PADDING, 0, group.to(torch.int32)).to(torch.int32).contiguous()
        return cls._build(segment, group, int(num_groups), int(max_summary))

    @classmethod
    def block_diagonal(
        cls, seqlens: torch.Tensor | Sequence[Sequence[int]], *, total_len: int | None = None,
        device: str | torch.device | None = None,
    ) -> SegmentLayout:
        """Plain block-diagonal attention (packed documents) from ``[B, S]`` segment lengths.

        Lengths may be zero; shorter rows are padded at the end. ``total_len`` is the sequence length ``L``; by
        default the longest row (which reads the lengths on the host once when they live on a GPU).
        """
        if not isinstance(seqlens, torch.Tensor):
            try:
                seqlens = torch.as_tensor(seqlens, dtype=torch.int64, device=device)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"seqlens must be a [B, S] integer tensor or nested list: {exc}") from None
        elif device is not None:
            seqlens = seqlens.to(device)
        if seqlens.dim() != 2:
            raise ValueError(f"seqlens must be [B, S], got shape {tuple(seqlens.shape)}")
        if seqlens.dtype.is_floating_point or seqlens.dtype == torch.bool:
            raise TypeError(f"seqlens must be an integer tensor, got {seqlens.dtype}")
        seqlens = seqlens.to(torch.int64)
        if seqlens.shape[0] == 0:
            raise ValueError("seqlens must hold at least one batch element (B >= 1), got shape (0, S)")
        if seqlens.device.type == "cpu" and bool((seqlens < 0).any()):
            raise ValueError("seqlens must be >= 0")
        ends = torch.cumsum(seqlens, dim=1)
        if total_len is None:
            total_len = int(ends[:, -1].max()) if seqlens.shape[1] else 0
        if total_len < 1:
            raise ValueError("block_diagonal needs at least one token (total_len >= 1)")
        if seqlens.device.type == "cpu" and seqlens.shape[1] and bool((ends[:, -1] > total_len).any()):
            raise ValueError(f"seqlens sum to more than total_len={total_len}")
        batch = seqlens.shape[0]
        pos = torch.arange(total_len, device=seqlens.device, dtype=torch.int64).expand(batch, total_len)
        # Token t lies in the first segment whose end exceeds t; zero-length segments are skipped by construction.
        seg = torch.searchsorted(ends.contiguous(), pos.contiguous(), right=True)
        segment = torch.where(seg < seqlens.shape[1], seg, PADDING).to(torch.int32)
        group = torch.zeros_like(segment)
        return cls._build(segment, group, num_groups=1, max_summary=0)

    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: torch.Tensor, *, total_len: int | None = None, max_seqlen: int | None = None,
        _exact_end: bool = False,
    ) -> SegmentLayout:
        """Packed documents of one sequence from cumulative lengths, as ``flash_attn_varlen_func`` takes them.

        ``cu_seqlens`` is ``[N + 1]`` integers: ``0``, then the running end of each document. Document ``i`` is
        tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``; equal neighbours (empty documents) are allowed. The layout
        has batch 1 and ``L = total_len`` (default ``cu_seqlens[-1]``, read on the host); tokens past the last
        document are padding. ``max_seqlen``, if given, must be at least the longest document (it is checked,
        not needed). The checks read ``cu_seqlens`` on the host once; inside ``torch.compile`` they are skipped,
        so the compiled graph does not depend on the lengths (pass ``total_len`` there).
        """
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries [N + 1], got shape "
                             f"{tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                       or max_seqlen < 1):
            raise ValueError(f"max_seqlen must be a positive int or None, got {max_seqlen!r}")
        cu = cu_seqlens.to(torch.int64)
        if total_len is None:
            if torch.compiler.is_compiling():
                raise ValueError("from_cu_seqlens needs total_len inside torch.compile (it would read cu_seqlens)")
            total_len = int(cu[-1])
        if isinstance(total_len, bool) or not isinstance(total_len, int) or total_len < 1:
            raise ValueError(f"total_len must be a positive int, got {total_len!r}")
        if not torch.compiler.is_compiling():
            _check_cu_seqlens(cu, total_len, max_seqlen, _exact_end)
        pos = torch.arange(total_len, device=cu.device, dtype=torch.int64)
        # Token t lies in the first document whose end exceeds t; empty documents are skipped by construction.
        doc = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
        segment = torch.where(doc < cu.shape[0] - 1, doc, PADDING).to(torch.int32)[None]
        return cls._build(segment.contiguous(), torch.zeros_like(segment), num_groups=1, max_summary=0)

    @classmethod
    def from_document_ids(cls, ids: torch.Tensor, *, padding_id: int | None = None) -> SegmentLayout:
        """Packed documents from ``[B, L]`` (or ``[L]``) per-token document ids, as FlexAttention's document mask.

        Tokens with equal ids attend each other; every token with an id equal to ``padding_id`` is padding (no
        other id is special: a negative id is a document like any other, never a summary token). Each document's
        tokens must be contiguous. Reads the ids on the host once to check that.
        """
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"ids must be [L] or [B, L] with B, L >= 1, got shape {tuple(ids.shape)}")
        if padding_id is not None and (isinstance(padding_id, bool) or not isinstance(padding_id, int)):
            raise TypeError(f"padding_id must be an int or None, got {padding_id!r}")
        ids = ids.to(torch.int64)
        pad = ids == padding_id if padding_id is not None else torch.zeros_like(ids, dtype=torch.bool)
        # Segment ids are the rank of each document id among its row's distinct ids: any int64 id fits, and no
        # id can come out as a summary (-1) or padding (-2) marker.
        segment, _ = _group_ranks(torch.where(pad, PADDING, 0), ids, exact_count=False)
        segment = torch.where(pad, PADDING, segment)
        _, _, starts_run = _runs(segment)
        run_ids = torch.sort(torch.where(starts_run, segment, -1), dim=1).values
        if bool(((run_ids[:, 1:] == run_ids[:, :-1]) & (run_ids[:, 1:] >= 0)).any()):
            b, t = _second_run_start(segment, starts_run)
            raise ValueError(f"ids must keep each document contiguous: document {int(ids[b, t])} starts again at "
                             f"ids[{b}, {t}] after other tokens")
        segment = segment.to(torch.int32).contiguous()
        return cls._build(segment, torch.zeros_like(segment), num_groups=1, max_summary=0)

    @classmethod
    def conduction(cls, valid: torch.Tensor, *, compact: bool = False) -> SegmentLayout:
        """The CLEAR layout for a ``[B, leads, beats]`` grid of heartbeat tokens (``valid`` marks real tokens).

        The sequence holds ``leads`` summary tokens (one per lead, in lead order) and then the valid heartbeat
        tokens in beat-major order, so beat ``j`` of every lead is one contiguous segment and a token's group is
        its lead. ``L = leads + leads * beats`` with padding at the end, unless ``compact`` shortens it to the
        longest row (one host synchronisation).
        """
        if not isinstance(valid, torch.Tensor):
            raise TypeError(f"valid must be a torch.Tensor, got {type(valid).__name__}")
        if valid.dim() != 3:
            raise ValueError(f"valid must be [B, leads, beats], got shape {tuple(valid.shape)}")
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
        batch, leads, beats = valid.shape
        if leads < 1:
            raise ValueError("valid needs at least one lead")
        dev = valid.device
        beat_major = valid.transpose(1, 2).reshape(batch, beats * leads)  # index = beat * leads + lead
        rank = torch.cumsum(beat_major.to(torch.int32), dim=1) - 1  # position among the valid tokens
        length = leads + (int(beat_major.sum(1).max()) if compact else beats * leads)
        pos_bm = torch.where(beat_major, leads + rank, length)  # one past the end for absent tokens
        grid_index = pos_bm.view(batch, beats, leads).transpose(1, 2).reshape(batch, leads * beats)

        beat_id = torch.arange(beats, device=dev, dtype=torch.int32).repeat_interleave(leads).expand(batch, -1)
        lead_id = torch.arange(leads, device=dev, dtype=torch.int32).repeat(beats).expand(batch, -1)
        # Scatter ids into a sequence one slot longer than needed; absent tokens land in the extra slot.
        segment = torch.full((batch, length + 1), PADDING, dtype=torch.int32, device=dev)
        group = torch.zeros((batch, length + 1), dtype=torch.int32, device=dev)
        segment.scatter_(1, pos_bm.long(), beat_id.contiguous())
        group.scatter_(1, pos_bm.long(), lead_id.contiguous())
        segment[:, :leads] = SUMMARY
        group[:, :leads] = torch.arange(leads, device=dev, dtype=torch.int32)
        segment = torch.where(torch.arange(length + 1, device=dev) < length, segment, PADDING)
        layout = cls._build(segment[:, :length].contiguous(), group[:, :length].contiguous(), leads, leads)
        return replace(layout, grid_shape=(leads, beats), grid_index=grid_index.to(torch.int64).contiguous())

    @classmethod
    def _build(cls, segment: torch.Tensor, group: torch.Tensor, num_groups: int, max_summary: int) -> SegmentLayout:
        if segment.shape[1] > INT32_MAX:  # positions and run ends (up to L) are int32
            raise ValueError(f"a layout holds at most 2^31 - 1 tokens per row, got L = {segment.shape[1]}")
        seg_start, seg_end, _ = _runs(segment)
        # Sort keys put padding (and, for the summary list, non-summary tokens) after every real group.
        gkey = torch.where(segment == PADDING, num_groups, group)
        skey = torch.where(segment == SUMMARY, group, num_groups)
        group_index = _sorted_positions(gkey)
        summary_index = _sorted_positions(skey)[:, :max_summary].contiguous()
        return cls(
            segment=segment, group=group, seg_start=seg_start, seg_end=seg_end,
            group_index=group_index.contiguous(), group_offsets=_group_offsets(gkey, num_groups),
            summary_index=summary_index, summary_offsets=_group_offsets(skey, num_groups),
            num_groups=num_groups, max_summary=max_summary,
        )

    # ------------------------------------------------------------------ members
    @property
    def batch_size(self) -> int:
        return self.segment.shape[0]

    @property
    def seq_len(self) -> int:
        return self.segment.shape[1]

    @property
    def device(self) -> torch.device:
        return self.segment.device

    def kernel_args(self) -> tuple[torch.Tensor, ...]:
        """The index tensors, in the order of the op schema's layout arguments."""
        return tuple(getattr(self, name) for name in _KERNEL_FIELDS)

    def materialize(self, is_causal: bool = False) -> torch.Tensor:
        """The dense ``[B, L, L]`` bool mask (True = may attend), for tests and dense baselines only."""
        return mask_from_ids(self.segment, self.group, is_causal)

    def to(self, device: str | torch.device) -> SegmentLayout:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return SegmentLayout(**moved)

    def density(self) -> torch.Tensor:
        """Share of the ``L x L`` pairs each batch element needs (float32 ``[B]``); for reports."""
        return self.materialize().float().mean(dim=(1, 2))

    def __repr__(self) -> str:
        kind = "conduction" if self.grid_shape is not None else "segments"
        extra = f", grid={self.grid_shape}" if self.grid_shape is not None else ""
        return (f"SegmentLayout({kind}, batch={self.batch_size}, seq_len={self.seq_len}, "
                f"num_groups={self.num_groups}, max_summary={self.max_summary}{extra}, device={self.device})")

    # ------------------------------------------------------------------ grid helpers (conduction layouts)
    def _require_grid(self) -> tuple[int, int]:
        if self.grid_shape is None or self.grid_index is None:
            raise ValueError("this layout was not built by SegmentLayout.conduction: it has no token grid")
        return self.grid_shape

    def _seq_source(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B * L]`` int64: for each sequence slot, the row of its token in the grid flattened to
        ``[B * leads * beats, ...]`` (0 for summary and padding slots), and ``[B, L]`` bool: the slot holds a grid
        token. The inverse of ``grid_index``, so that moving a grid into the sequence reads only the ``L`` tokens
        the sequence holds rather than writing every grid token (5 times as many in the encoder, which sees 20%)."""
        leads, beats = self._require_grid()
        batch, length, cells = self.batch_size, self.seq_len, leads * beats
        rows = torch.arange(batch * cells, device=self.device).view(batch, cells)
        # One extra slot takes every absent token (grid_index == L); it is dropped.
        src = torch.zeros(batch, length + 1, dtype=torch.int64, device=self.device)
        src.scatter_(1, self.grid_index, rows)
        return src[:, :length].reshape(-1), self.segment >= 0

    def grid_to_seq(self, grid: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        """Move a ``[B, leads, beats, ...]`` grid into the ``[B, L, ...]`` sequence.

        ``summary`` (``[B, leads, ...]`` or ``[leads, ...]``) fills the summary slots; they are zero without it.
        Tokens outside the sequence are dropped and padding slots are zero.
        """
        leads, beats = self._require_grid()
        if grid.dim() < 3 or grid.shape[:3] != (self.batch_size, leads, beats):
            raise ValueError(f"grid must be [B={self.batch_size}, {leads}, {beats}, ...], got {tuple(grid.shape)}")
        tail = grid.shape[3:]
        src, holds_token = self._seq_source()
        flat = grid.reshape(self.batch_size * leads * beats, -1)
        out = flat.index_select(0, src).view(self.batch_size, self.seq_len, -1)
        out = out.masked_fill(~holds_token[:, :, None], 0)
        if summary is not None:
            summary = summary.expand(self.batch_size, leads, *tail).reshape(self.batch_size, leads, -1)
            out = torch.cat([summary.to(out.dtype), out[:, leads:]], dim=1)
        return out.reshape(self.batch_size, self.seq_len, *tail)

    def seq_to_grid(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a ``[B, L, ...]`` sequence into the ``[B, leads, beats, ...]`` grid (zeros where a token is not
        in the sequence) and the ``[B, leads, ...]`` summary tokens."""
        leads, beats = self._require_grid()
        if seq.dim() < 2 or seq.shape[:2] != (self.batch_size, self.seq_len):
            raise ValueError(f"seq must be [B={self.batch_size}, L={self.seq_len}, ...], got {tuple(seq.shape)}")
        tail = seq.shape[2:]
        batch, length = self.batch_size, self.seq_len
        flat = seq.reshape(batch * length, -1)
        # Rows of the flattened sequence; absent tokens (grid_index == L) read row 0 and are zeroed.
        absent = self.grid_index == length
        rows = self.grid_index.masked_fill(absent, 0) + length * torch.arange(batch, device=self.device)[:, None]
        grid = flat.index_select(0, rows.reshape(-1)).view(batch, leads * beats, -1)
        grid = grid.masked_fill(absent[:, :, None], 0)
        return grid.reshape(batch, leads, beats, *tail), seq[:, :leads]


def _validate_ids(
    segment: torch.Tensor, group: torch.Tensor, num_groups: int | None, max_summary: int | None
) -> tuple[int, int]:
    """Check raw ids (one device synchronisation) and return (num_groups, max_summary)."""
    seg = segment.to(torch.int64)
    grp = group.to(torch.int64)
    if bool((seg < PADDING).any()):
        bad = _first_position(seg < PADDING)
        raise ValueError(f"segment ids must be >= -2 (-1 summary, -2 padding); segment[{bad}] = {int(seg[bad])}")
    # Stored as int32: a larger id would wrap (2^32 + 7 to 7, 2^32 - 1 to a summary token).
    if bool((seg > INT32_MAX).any()):
        bad = _first_position(seg > INT32_MAX)
        raise ValueError(f"segment ids must be < 2^31 (they are stored as int32); segment[{bad}] = {int(seg[bad])}")
    real = seg != PADDING
    if bool((real & (grp < 0)).any()):
        bad = _first_position(real & (grp < 0))
        raise ValueError(f"group ids must be >= 0 for non-padding tokens; group[{bad}] = {int(grp[bad])}")
    if bool((real & (grp > INT32_MAX)).any()):
        bad = _first_position(real & (grp > INT32_MAX))
        raise ValueError(f"group ids must be < 2^31 (they are stored as int32); group[{bad}] = {int(grp[bad])}")
    seen_groups = int(torch.where(real, grp, -1).max()) + 1
    if num_groups is None:
        num_groups = max(seen_groups, 1)
    elif seen_groups > num_groups:
        bad = _first_position(real & (grp >= num_groups))
        raise ValueError(f"group ids must be < num_groups={num_groups}; group[{bad}] = {int(grp[bad])}")
    # Contiguity: every segment id may start at most one run per row. Sort the ids of run starts and look for
    # neighbours that are equal.
    _, _, starts_run = _runs(seg)
    run_ids = torch.where(starts_run, seg, -1)
    sorted_ids = torch.sort(run_ids, dim=1).values
    if bool(((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any()):
        b, t = _second_run_start(seg, starts_run)
        raise ValueError(
            f"segment ids must be contiguous: segment {int(seg[b, t])} starts again at segment[{b}, {t}] after "
            "other tokens")
    summaries = int((seg == SUMMARY).sum(1).max())
    if max_summary is None:
        max_summary = summaries
    elif summaries > max_summary:
        raise ValueError(f"a row holds {summaries} summary tokens, more than max_summary={max_summary}")
    return num_groups, max_summary


def _check_cu_seqlens(cu: torch.Tensor, total_len: int, max_seqlen: int | None, exact_end: bool = False,
                      ) -> None:
    """The checks of ``from_cu_seqlens`` (one host read); ``exact_end``: the documents must fill all tokens."""
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"cu_seqlens must be increasing (non-decreasing: empty documents are allowed); "
                             f"cu_seqlens[{i + 1}] = {values[i + 1]} < cu_seqlens[{i}] = {values[i]}")
    if values[-1] > total_len or (exact_end and values[-1] != total_len):
        raise ValueError(f"cu_seqlens must end at the number of tokens T = {total_len}, got cu_seqlens[-1] = "
                         f"{values[-1]}")
    if max_seqlen is not None and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} but document {lengths.index(max(lengths))} has {max(lengths)} "
                         "tokens")


def _group_ranks(segment: torch.Tensor, group: torch.Tensor, exact_count: bool) -> tuple[torch.Tensor, int]:
    """Each non-padding token's group id replaced by its rank among the distinct ids of its row (ascending), and
    the number of groups: the largest rank + 1 with ``exact_count`` (one device synchronisation), else ``L``."""
    real = segment != PADDING
    key = torch.where(real, group.to(torch.int64), torch.iinfo(torch.int64).max)  # padding sorts last
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    new_id = torch.ones_like(sorted_key, dtype=torch.bool)
    new_id[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    rank = torch.empty_like(sorted_key).scatter_(1, order, torch.cumsum(new_id, dim=1) - 1)
    rank = torch.where(real, rank, 0)
    num_groups = int(rank.max()) + 1 if exact_count else segment.shape[1]
    return rank, num_groups


def _first_position(mask: torch.Tensor) -> tuple[int, int]:
    flat = int(torch.nonzero(mask.reshape(-1))[0])
    return divmod(flat, mask.shape[1])


def _second_run_start(seg: torch.Tensor, starts_run: torch.Tensor) -> tuple[int, int]:
    """Error path only: the first position where a segment id starts a second run (row-major order)."""
    for b in range(seg.shape[0]):
        seen: set[int] = set()
        for t in torch.nonzero(starts_run[b]).flatten().tolist():
            sid = int(seg[b, t])
            if sid in seen:
                return b, t
            seen.add(sid)
    raise AssertionError("no repeated segment run found")
