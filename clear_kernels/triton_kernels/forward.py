"""Forward kernels: segment/padding rows by query tiles, summary rows one program each; then the launcher.

``CAUSAL``: inside a segment a query sees the keys at or before it; a query tile's key window then ends at its last
row, so key blocks above the diagonal are not visited. ``H_KV``: the heads of k and v (grouped-query attention).

Scores are kept in the log2 domain (``qk_scale = scale * log2(e)``) so the online softmax uses ``exp2``; the
saved logsumexp is converted back to the natural log the op contract asks for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import (INTERPRET, INTERPRET_ROW, INTERPRET_TILE, LN2, LOG2E, PADDING, ROW_CONFIGS, SUMMARY,
                     TILE_CONFIGS, block_d, dot, fixed, kernel, kv_head, load_ids, load_rows, tile_window)


@triton.jit
def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, F32: tl.constexpr):
    s = dot(q, tl.trans(k), F32) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no allowed key so far keeps m = -inf; shifting by 0 then gives exp2(-inf) = 0, never NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, F32)
    return m_new, l_i, acc


@kernel(TILE_CONFIGS)
def _fwd_segment_rows(
    Q, K, V, Out, Lse, Seg, Grp, SegStart, SegEnd, SumIdx, SumOff,
    L, H, H_KV, NUM_GROUPS, MAX_SUMMARY, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (query tile, batch * head). Writes the tile's segment and padding rows; summary rows
    belong to ``_fwd_summary_rows``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    row_base = b.to(tl.int64) * L
    base = bh.to(tl.int64) * L * D
    kv_base = kv_head(bh, H, H_KV).to(tl.int64) * L * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok, m_safe, seg_q, grp_q, start_q, end_q = load_ids(Seg, Grp, SegStart, SegEnd, row_base, offs_m, L)
    lo, hi, sum_lo, sum_hi = tile_window(seg_q, grp_q, start_q, end_q, SumOff + b * (NUM_GROUPS + 1), L,
                                         NUM_GROUPS)
    if CAUSAL:
        hi = tl.minimum(hi, pid_m * BLOCK_M + BLOCK_M)
    q_is_seg = seg_q >= 0
    q = load_rows(Q + base, m_safe, m_ok, offs_d, d_ok, D, F32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys of the tile's own segments: one contiguous window.
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        n_safe = tl.where(n_ok, offs_n, 0)
        seg_k = tl.load(Seg + row_base + n_safe, mask=n_ok, other=PADDING)
        k = load_rows(K + kv_base, n_safe, n_ok, offs_d, d_ok, D, F32)
        v = load_rows(V + kv_base, n_safe, n_ok, offs_d, d_ok, D, F32)
        allowed = q_is_seg[:, None] & (seg_q[:, None] == seg_k[None, :])
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, F32)
    # Summary keys of the tile's groups: gathered through summary_index.
    for j0 in range(sum_lo, sum_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = offs_j < sum_hi
        pos = tl.load(SumIdx + b * MAX_SUMMARY + tl.where(j_ok, offs_j, 0), mask=j_ok, other=0)
        grp_k = tl.load(Grp + row_base + pos, mask=j_ok, other=-1)
        k = load_rows(K + kv_base, pos, j_ok, offs_d, d_ok, D, F32)
        v = load_rows(V + kv_base, pos, j_ok, offs_d, d_ok, D, F32)
        allowed = q_is_seg[:, None] & (grp_q[:, None] == grp_k[None, :]) & j_ok[None, :]
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, F32)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * LN2, 0.0)
    write = m_ok & (seg_q != SUMMARY)
    tl.store(Out + base + m_safe[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=write[:, None] & d_ok[None, :])
    tl.store(Lse + bh.to(tl.int64) * L + m_safe, lse, mask=write)


@kernel(ROW_CONFIGS)
def _fwd_summary_rows(
    Q, K, V, Out, Lse, Grp, GrpIdx, GrpOff, SumIdx, SumOff,
    L, H, H_KV, NUM_GROUPS, MAX_SUMMARY, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (summary slot, batch * head): the summary query attends every token of its group, walked
    in ``BLOCK_N`` chunks of ``group_index`` with one query row (vector products, no ``tl.dot``: a single row is
    below the dot's 16-row minimum and this is a small share of the work)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    row_base = b.to(tl.int64) * L
    base = bh.to(tl.int64) * L * D
    kv_base = kv_head(bh, H, H_KV).to(tl.int64) * L * D
    off_row = SumOff + b * (NUM_GROUPS + 1)
    count = tl.load(off_row + NUM_GROUPS)
    if i < count:
        pos = tl.load(SumIdx + b * MAX_SUMMARY + i)
        g = tl.load(Grp + row_base + pos)
        g_lo = tl.load(GrpOff + b * (NUM_GROUPS + 1) + g)
        g_hi = tl.load(GrpOff + b * (NUM_GROUPS + 1) + g + 1)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(Q + base + pos * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for j0 in range(g_lo, g_hi, BLOCK_N):
            offs_j = j0 + tl.arange(0, BLOCK_N)
            j_ok = offs_j < g_hi
            kpos = tl.load(GrpIdx + row_base + tl.where(j_ok, offs_j, 0), mask=j_ok, other=0)
            k = load_rows(K + kv_base, kpos, j_ok, offs_d, d_ok, D, True)
            v = load_rows(V + kv_base, kpos, j_ok, offs_d, d_ok, D, True)
            s = tl.where(j_ok, tl.sum(k * q[None, :], 1) * qk_scale, float("-inf"))
            # Every chunk holds at least one token of the group, so the running max is finite from the first.
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m_i = m_new
        out = acc / l_i
        tl.store(Out + base + pos * D + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)
        tl.store(Lse + bh.to(tl.int64) * L + pos, (m_i + tl.log2(l_i)) * LN2)


def summary_index_arg(summary_index: torch.Tensor) -> torch.Tensor:
    """A non-empty tensor to pass for ``summary_index`` (an empty one may have no valid device address); with
    ``max_summary == 0`` the kernels never read it."""
    if summary_index.shape[1] > 0:
        return summary_index
    return torch.zeros(1, dtype=torch.int32, device=summary_index.device)


def uses_f32_dot(dtype: torch.dtype) -> bool:
    return INTERPRET or dtype == torch.float32


def segment_attention_forward(q, k, v, segment, group, seg_start, seg_end, group_index, group_offsets,
                              summary_index, summary_offsets, scale: float, is_causal: bool = False):
    """Launch the forward kernels: ``(out, lse)`` per the op contract."""
    batch, heads, length, head_dim = q.shape
    num_groups = group_offsets.shape[1] - 1
    max_summary = summary_index.shape[1]
    out = ops.new_output_like(q)
    lse = ops.new_output((batch, heads, length), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.zero_()
    sum_idx = summary_index_arg(summary_index)
    common = dict(L=length, H=heads, H_KV=k.shape[1], NUM_GROUPS=num_groups, MAX_SUMMARY=max_summary,
                  qk_scale=float(scale) * LOG2E.value, D=head_dim, BLOCK_D=block_d(head_dim),
                  F32=uses_f32_dot(q.dtype), CAUSAL=bool(is_causal))
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _fwd_segment_rows[grid](q, k, v, out, lse, segment, group, seg_start, seg_end, sum_idx, summary_offsets,
                            **common, **fixed(INTERPRET_TILE))
    if max_summary > 0:
        _fwd_summary_rows[(max_summary, batch * heads)](
            q, k, v, out, lse, group, group_index, group_offsets, sum_idx, summary_offsets,
            **common, **fixed(INTERPRET_ROW))
    return out, lse
