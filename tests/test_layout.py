"""SegmentLayout against a plain per-pair rule, over random layouts (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_kernels import PADDING, SUMMARY, SegmentLayout


def rule(seg_q: int, seg_k: int, grp_q: int, grp_k: int) -> bool:
    """SPEC §2.1 for one pair, written as plainly as possible."""
    if seg_q == PADDING or seg_k == PADDING:
        return False
    if seg_q >= 0 and seg_q == seg_k:
        return True
    return grp_q == grp_k and (seg_q == SUMMARY or seg_k == SUMMARY)


def mask_by_rule(segment: list[list[int]], group: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[[rule(s[q], s[k], g[q], g[k]) for k in range(len(s))] for q in range(len(s))]
                         for s, g in zip(segment, group)])


def check_index_tensors(layout: SegmentLayout) -> None:
    """The kernels' index tensors say the same as the ids."""
    seg, grp = layout.segment.tolist(), layout.group.tolist()
    starts, ends = layout.seg_start.tolist(), layout.seg_end.tolist()
    for b, (s, g) in enumerate(zip(seg, grp)):
        for t, sid in enumerate(s):
            if sid >= 0:
                run = [u for u in range(len(s)) if s[u] == sid]
                assert (starts[b][t], ends[b][t]) == (run[0], run[-1] + 1)
                assert run == list(range(run[0], run[-1] + 1))
            else:
                assert starts[b][t] == ends[b][t] == t
        offsets = layout.group_offsets[b].tolist()
        soffsets = layout.summary_offsets[b].tolist()
        for gi in range(layout.num_groups):
            members = [t for t in range(len(s)) if s[t] != PADDING and g[t] == gi]
            assert layout.group_index[b, offsets[gi]:offsets[gi + 1]].tolist() == members
            summaries = [t for t in members if s[t] == SUMMARY]
            assert layout.summary_index[b, soffsets[gi]:soffsets[gi + 1]].tolist() == summaries
        assert offsets[-1] == sum(x != PADDING for x in s)


@st.composite
def raw_ids(draw):
    """Rows of contiguous segment runs (ids in arbitrary order), summary tokens and padding anywhere."""
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 24))
    groups = draw(st.integers(1, 4))
    segment, group = [], []
    for _ in range(batch):
        row: list[int] = []
        ids = draw(st.permutations(range(length)))
        n = 0
        if draw(st.integers(0, 5)) == 0:  # an all-padding row
            row = [PADDING] * length
        while len(row) < length:
            kind = draw(st.sampled_from(["seg", "seg", "summary", "pad"]))
            if kind == "summary":
                row.append(SUMMARY)
            elif kind == "pad":
                row.append(PADDING)
            else:
                run = draw(st.integers(1, 6))
                row.extend([ids[n]] * min(run, length - len(row)))
                n += 1
        segment.append(row)
        group.append(draw(st.lists(st.integers(0, groups - 1), min_size=length, max_size=length)))
    return segment, group, groups


@settings(max_examples=60, deadline=None)
@given(raw_ids())
def test_from_ids_matches_rule(ids):
    segment, group, groups = ids
    layout = SegmentLayout.from_ids(torch.tensor(segment), torch.tensor(group), num_groups=groups)
    expected = mask_by_rule(segment, [[gi if s != PADDING else 0 for s, gi in zip(sr, gr)]
                                      for sr, gr in zip(segment, group)])
    assert torch.equal(layout.materialize(), expected)
    check_index_tensors(layout)
    assert layout.segment.dtype == layout.group.dtype == torch.int32


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=6), min_size=1, max_size=3).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_block_diagonal_matches_lengths(seqlens):
    total = max(max(sum(r) for r in seqlens), 1)
    layout = SegmentLayout.block_diagonal(seqlens, total_len=total)
    segment = []
    for row in seqlens:
        ids = [s for s, n in enumerate(row) for _ in range(n)]
        segment.append(ids + [PADDING] * (total - len(ids)))
    assert layout.segment.tolist() == segment
    assert torch.equal(layout.materialize(), mask_by_rule(segment, [[0] * total] * len(segment)))
    check_index_tensors(layout)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_conduction_order_and_grid_round_trip(batch, leads, beats, seed, compact):
    gen = torch.Generator().manual_seed(seed)
    valid = torch.rand(batch, leads, beats, generator=gen) < 0.7
    layout = SegmentLayout.conduction(valid, compact=compact)
    for b in range(batch):
        # Summary tokens first, one per lead, then the valid tokens beat by beat, lead by lead.
        expected_seg = [SUMMARY] * leads + [j for j in range(beats) for i in range(leads) if valid[b, i, j]]
        expected_grp = list(range(leads)) + [i for j in range(beats) for i in range(leads) if valid[b, i, j]]
        n = len(expected_seg)
        assert layout.segment[b, :n].tolist() == expected_seg
        assert layout.group[b, :n].tolist() == expected_grp
        assert (layout.segment[b, n:] == PADDING).all()
    if compact:
        assert layout.seq_len == leads + int(valid.sum((1, 2)).max())
    else:
        assert layout.seq_len == leads + leads * beats
    check_index_tensors(layout)
    assert torch.equal(layout.materialize(), mask_by_rule(layout.segment.tolist(), layout.group.tolist()))

    grid = torch.randn(batch, leads, beats, 3, generator=gen)
    summary = torch.randn(batch, leads, 3, generator=gen)
    seq = layout.grid_to_seq(grid, summary)
    for b in range(batch):  # each heartbeat slot holds its grid token: lead = group, beat = segment
        for t in range(leads, layout.seq_len):
            if layout.segment[b, t] >= 0:
                assert torch.equal(seq[b, t], grid[b, layout.group[b, t], layout.segment[b, t]])
    assert torch.equal(seq[:, :leads], summary)
    back, summary_back = layout.seq_to_grid(seq)
    assert torch.equal(back, torch.where(valid[..., None], grid, torch.zeros_like(grid)))
    assert torch.equal(summary_back, summary)
    assert (seq[layout.segment == PADDING] == 0).all()


def test_conduction_sparsity_matches_spec():
    # SPEC §2.4: 15 beats x 12 leads + 12 summary tokens need 6.9% of the pairs; 150 beats 0.8%.
    for beats, share in ((15, 0.069), (150, 0.008)):
        layout = SegmentLayout.conduction(torch.ones(1, 12, beats, dtype=torch.bool))
        assert abs(float(layout.density()) - share) < 0.0015


def test_from_ids_names_the_first_non_contiguous_position():
    segment = torch.tensor([[0, 0, 1, 1, -1, 0, 2], [3, 3, -2, 4, 4, 4, 4]])
    with pytest.raises(ValueError, match=r"segment 0 starts again at segment\[0, 5\]"):
        SegmentLayout.from_ids(segment)


@pytest.mark.parametrize("segment, group, match", [
    ([[0, -3, 1]], [[0, 0, 0]], r"segment ids must be >= -2.*segment\[\(0, 1\)\]"),
    ([[0, 1, 1]], [[0, -1, 0]], r"group ids must be >= 0.*group\[\(0, 1\)\]"),
    ([[0, 1, -1]], [[0, 0, 5]], r"group ids must be < num_groups=2"),
])
def test_from_ids_rejects_out_of_range_ids(segment, group, match):
    with pytest.raises(ValueError, match=match):
        SegmentLayout.from_ids(torch.tensor(segment), torch.tensor(group), num_groups=2)


@pytest.mark.parametrize("segment, group, match", [
    ([[0, 0, 2**32 + 7, 2**32 + 7]], [[0, 0, 0, 0]], r"segment ids must be < 2\^31.*segment\[\(0, 2\)\]"),
    ([[0, 2**31, -1]], [[0, 0, 0]], r"segment ids must be < 2\^31.*segment\[\(0, 1\)\]"),
    ([[0, 0, 2**32 - 1]], [[0, 0, 0]], r"segment ids must be < 2\^31.*segment\[\(0, 2\)\]"),
    ([[0, 1, -1]], [[0, 0, 2**32 - 1]], r"group ids must be < 2\^31.*group\[\(0, 2\)\]"),
    ([[0, 1, 1]], [[2**31, 0, 0]], r"group ids must be < 2\^31.*group\[\(0, 0\)\]"),
])
def test_from_ids_rejects_ids_beyond_int32(segment, group, match):
    """The ids are stored as int32: 2^32 + 7 used to wrap to 7 and 2^32 - 1 to a summary token."""
    with pytest.raises(ValueError, match=match):
        SegmentLayout.from_ids(torch.tensor(segment), torch.tensor(group))


@pytest.mark.parametrize("validate", [True, False])
def test_sparse_group_ids_are_ranked_not_counted(validate):
    """A group id of 2^30 made the per-group tables [B, 2^30 + 1] (4 GiB a row); ids are only compared."""
    segment = torch.tensor([[-1, 0, 0, -1, 1, 1, -2], [-1, 3, 3, 3, -1, -1, 4]])
    big = torch.tensor([[2**30, 2**30, 7, 7, 7, 2**30, 0], [5, 5, 2**29, 9, 9, 2**29, 5]])
    small = torch.tensor([[1, 1, 0, 0, 0, 1, 0], [0, 0, 2, 1, 1, 2, 0]])
    kwargs = {} if validate else {"num_groups": 2**30 + 1, "max_summary": 3, "validate": False}
    layout = SegmentLayout.from_ids(segment, big, **kwargs)
    assert layout.num_groups <= layout.seq_len and layout.group_offsets.shape[1] <= layout.seq_len + 1
    assert torch.equal(layout.materialize(), mask_by_rule(segment.tolist(), big.tolist()))
    want = SegmentLayout.from_ids(segment, small)
    assert torch.equal(layout.materialize(), want.materialize())
    check_index_tensors(layout)


def test_empty_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"segment must hold at least one batch element \(B >= 1\)"):
        SegmentLayout.from_ids(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"seqlens must hold at least one batch element \(B >= 1\)"):
        SegmentLayout.block_diagonal(torch.zeros(0, 3, dtype=torch.long))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: SegmentLayout.from_ids(torch.zeros(4, dtype=torch.int32)), ValueError, "segment must be"),
    (lambda: SegmentLayout.from_ids(torch.zeros(1, 4)), TypeError, "segment must be an integer tensor"),
    (lambda: SegmentLayout.from_ids(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)),
     ValueError, "one shape"),
    (lambda: SegmentLayout.from_ids([[0, 1]]), TypeError, "segment must be a torch.Tensor"),
    (lambda: SegmentLayout.from_ids(torch.tensor([[0, -1]]), max_summary=0), ValueError, "max_summary"),
    (lambda: SegmentLayout.block_diagonal([[1, -1]]), ValueError, "seqlens must be >= 0"),
    (lambda: SegmentLayout.block_diagonal([3, 4]), ValueError, r"seqlens must be \[B, S\]"),
    (lambda: SegmentLayout.block_diagonal([[3, 4]], total_len=5), ValueError, "more than total_len"),
    (lambda: SegmentLayout.conduction(torch.ones(2, 3)), ValueError, "valid must be"),
    (lambda: SegmentLayout.conduction(torch.ones(2, 3, 4)), TypeError, "bool"),
])
def test_constructor_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_grid_helpers_need_a_conduction_layout():
    layout = SegmentLayout.block_diagonal([[2, 2]])
    with pytest.raises(ValueError, match="not built by SegmentLayout.conduction"):
        layout.seq_to_grid(torch.zeros(1, 4))


def test_repr_and_to():
    layout = SegmentLayout.conduction(torch.ones(2, 3, 4, dtype=torch.bool))
    text = repr(layout)
    assert "conduction" in text and "batch=2" in text and "seq_len=15" in text
    moved = layout.to("cpu")
    assert moved.grid_shape == (3, 4) and torch.equal(moved.grid_index, layout.grid_index)
    assert torch.equal(moved.materialize(), layout.materialize())


@pytest.mark.gpu
def test_layouts_build_without_host_synchronisation():
    torch.cuda.set_sync_debug_mode("error")
    try:
        valid = torch.rand(4, 12, 15, device="cuda") < 0.8
        SegmentLayout.conduction(valid).materialize()
        lens = torch.randint(0, 9, (4, 6), device="cuda")
        SegmentLayout.block_diagonal(lens, total_len=64)
    finally:
        torch.cuda.set_sync_debug_mode(0)
