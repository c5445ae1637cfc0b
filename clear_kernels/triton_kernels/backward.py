"""Backward kernels, then the launcher. Deterministic: every gradient row is written by exactly one program that
sums its contributions in a fixed order; there are no atomics anywhere.

* ``_bwd_delta``: ``delta = rowsum(dO * O)`` (float32), the softmax-gradient correction of each query row.
* ``_bwd_segment_dq``: segment query tiles, over the same keys as the forward (segment window + summary keys).
* ``_bwd_segment_dkdv``: segment key tiles. By the symmetric rule the queries that see a key tile are found
  exactly like the keys a query tile sees: the window of its runs plus the summary tokens of its groups.
* ``_bwd_summary``: one program per summary token computes its dq (as a query over its group) and its dk/dv (as
  a key seen by every token of its group), walking ``group_index`` in order. The reduction over the many
  heartbeat tokens of a group thus happens in one program, in a fixed order.

``CAUSAL`` (causal segments) breaks the symmetry inside a run only: a query tile's key window ends at its last
row, a key tile's query window starts at its first row, and the pairs across the diagonal are masked within the
diagonal blocks; blocks above the diagonal are not visited. With grouped-query attention (``H_KV < H``) the
key-side programs run per kv head and add the query heads that read it in head order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import (INTERPRET_ROW, INTERPRET_TILE, LOG2E, PADDING, ROW_CONFIGS, SUMMARY,
                     TILE_CONFIGS, block_d, dot, fixed, kernel, kv_head, load_ids, load_rows, tile_window)
from .forward import summary_index_arg, uses_f32_dot

DELTA_ROWS = 16


@triton.jit(do_not_specialize=["N"])
def _bwd_delta(Out, GradOut, Delta, N, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < N
    safe = tl.where(ok, rows, 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + safe[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(GradOut + safe[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + safe, tl.sum(o * do, 1), mask=ok)


@kernel(TILE_CONFIGS)
def _bwd_segment_dq(
    Q, K, V, GradOut, Lse, Delta, GradQ, Seg, Grp, SegStart, SegEnd, SumIdx, SumOff,
    L, H, H_KV, NUM_GROUPS, MAX_SUMMARY, scale, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
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
    do = load_rows(GradOut + base, m_safe, m_ok, offs_d, d_ok, D, F32)
    lse2 = tl.load(Lse + bh.to(tl.int64) * L + m_safe, mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(Delta + bh.to(tl.int64) * L + m_safe, mask=m_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
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
        p = tl.where(allowed, tl.exp2(dot(q, tl.trans(k), F32) * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dot(do, tl.trans(v), F32) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, F32)
    for j0 in range(sum_lo, sum_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = offs_j < sum_hi
        pos = tl.load(SumIdx + b * MAX_SUMMARY + tl.where(j_ok, offs_j, 0), mask=j_ok, other=0)
        grp_k = tl.load(Grp + row_base + pos, mask=j_ok, other=-1)
        k = load_rows(K + kv_base, pos, j_ok, offs_d, d_ok, D, F32)
        v = load_rows(V + kv_base, pos, j_ok, offs_d, d_ok, D, F32)
        allowed = q_is_seg[:, None] & (grp_q[:, None] == grp_k[None, :]) & j_ok[None, :]
        p = tl.where(allowed, tl.exp2(dot(q, tl.trans(k), F32) * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dot(do, tl.trans(v), F32) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, F32)

    write = m_ok & (seg_q != SUMMARY)
    tl.store(GradQ + base + m_safe[:, None] * D + offs_d[None, :], (dq * scale).to(GradQ.dtype.element_ty),
             mask=write[:, None] & d_ok[None, :])


@kernel(TILE_CONFIGS)
def _bwd_segment_dkdv(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, Seg, Grp, SegStart, SegEnd, SumIdx, SumOff,
    L, H, H_KV, NUM_GROUPS, MAX_SUMMARY, scale, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr, CAUSAL: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Key tiles of ``BLOCK_M`` positions of one kv head (the tile names mirror the forward: the tile's own tokens
    are M), summed over the ``GROUP = H // H_KV`` query heads that read it. GROUP is a compile-time constant: with
    one query head per kv head the loop disappears and the kernel keeps its registers (no spills at D = 96)."""
    pid_m = tl.program_id(0)
    bj = tl.program_id(1)  # batch * H_KV + kv head
    b = bj // H_KV
    row_base = b.to(tl.int64) * L
    kv_base = bj.to(tl.int64) * L * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok, m_safe, seg_k, grp_k, start_k, end_k = load_ids(Seg, Grp, SegStart, SegEnd, row_base, offs_m, L)
    lo, hi, sum_lo, sum_hi = tile_window(seg_k, grp_k, start_k, end_k, SumOff + b * (NUM_GROUPS + 1), L,
                                         NUM_GROUPS)
    if CAUSAL:
        lo = tl.maximum(lo, pid_m * BLOCK_M)
    k_is_seg = seg_k >= 0
    k = load_rows(K + kv_base, m_safe, m_ok, offs_d, d_ok, D, F32)
    v = load_rows(V + kv_base, m_safe, m_ok, offs_d, d_ok, D, F32)

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for hq in tl.static_range(GROUP):
        bh = (b * H + (bj % H_KV) * GROUP + hq).to(tl.int64)
        base = bh * L * D
        stat_base = bh * L
        dk, dv = _dkdv_head(Q + base, GradOut + base, Lse + stat_base, Delta + stat_base, Seg, Grp, SumIdx, k, v,
                            dk, dv, seg_k, grp_k, k_is_seg, offs_m, offs_d, d_ok, row_base, b, lo, hi, sum_lo,
                            sum_hi, MAX_SUMMARY, qk_scale, D, F32, CAUSAL, BLOCK_N)

    write = m_ok & (seg_k != SUMMARY)
    ptrs = m_safe[:, None] * D + offs_d[None, :]
    mask = write[:, None] & d_ok[None, :]
    tl.store(GradK + kv_base + ptrs, (dk * scale).to(GradK.dtype.element_ty), mask=mask)
    tl.store(GradV + kv_base + ptrs, dv.to(GradV.dtype.element_ty), mask=mask)


@triton.jit
def _dkdv_head(Q, GradOut, Lse, Delta, Seg, Grp, SumIdx, k, v, dk, dv, seg_k, grp_k, k_is_seg, offs_m, offs_d,
               d_ok, row_base, b, lo, hi, sum_lo, sum_hi, MAX_SUMMARY, qk_scale, D: tl.constexpr,
               F32: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query head's share of a key tile's dk and dv (``Q``, ``GradOut``, ``Lse``, ``Delta`` at that head)."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        n_safe = tl.where(n_ok, offs_n, 0)
        seg_q = tl.load(Seg + row_base + n_safe, mask=n_ok, other=PADDING)
        q = load_rows(Q, n_safe, n_ok, offs_d, d_ok, D, F32)
        do = load_rows(GradOut, n_safe, n_ok, offs_d, d_ok, D, F32)
        lse2 = tl.load(Lse + n_safe, mask=n_ok, other=0.0) * LOG2E
        delta = tl.load(Delta + n_safe, mask=n_ok, other=0.0)
        allowed = k_is_seg[:, None] & (seg_k[:, None] == seg_q[None, :])
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] >= offs_m[:, None])
        p_t = tl.where(allowed, tl.exp2(dot(k, tl.trans(q), F32) * qk_scale - lse2[None, :]), 0.0)
        dv += dot(p_t.to(do.dtype), do, F32)
        ds_t = p_t * (dot(v, tl.trans(do), F32) - delta[None, :])
        dk += dot(ds_t.to(q.dtype), q, F32)
    for j0 in range(sum_lo, sum_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = offs_j < sum_hi
        pos = tl.load(SumIdx + b * MAX_SUMMARY + tl.where(j_ok, offs_j, 0), mask=j_ok, other=0)
        grp_q = tl.load(Grp + row_base + pos, mask=j_ok, other=-1)
        q = load_rows(Q, pos, j_ok, offs_d, d_ok, D, F32)
        do = load_rows(GradOut, pos, j_ok, offs_d, d_ok, D, F32)
        lse2 = tl.load(Lse + pos, mask=j_ok, other=0.0) * LOG2E
        delta = tl.load(Delta + pos, mask=j_ok, other=0.0)
        allowed = k_is_seg[:, None] & (grp_k[:, None] == grp_q[None, :]) & j_ok[None, :]
        p_t = tl.where(allowed, tl.exp2(dot(k, tl.trans(q), F32) * qk_scale - lse2[None, :]), 0.0)
        dv += dot(p_t.to(do.dtype), do, F32)
        ds_t = p_t * (dot(v, tl.trans(do), F32) - delta[None, :])
        dk += dot(ds_t.to(q.dtype), q, F32)
    return dk, dv


@kernel(ROW_CONFIGS)
def _bwd_summary(
    Q, K, V, GradOut, Lse, Delta, GradQ, GradK, GradV, Grp, GrpIdx, GrpOff, SumIdx, SumOff,
    L, H, H_KV, NUM_GROUPS, MAX_SUMMARY, scale, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr, CAUSAL: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (summary slot, batch * kv head): the summary token's dq in each query head that reads the
    kv head, and its dk/dv summed over those heads, in head order. (Pairs with a summary token are the same with
    causal segments.)"""
    i = tl.program_id(0)
    bj = tl.program_id(1)
    b = bj // H_KV
    row_base = b.to(tl.int64) * L
    kv_base = bj.to(tl.int64) * L * D
    count = tl.load(SumOff + b * (NUM_GROUPS + 1) + NUM_GROUPS)
    if i < count:
        pos = tl.load(SumIdx + b * MAX_SUMMARY + i)
        g = tl.load(Grp + row_base + pos)
        g_lo = tl.load(GrpOff + b * (NUM_GROUPS + 1) + g)
        g_hi = tl.load(GrpOff + b * (NUM_GROUPS + 1) + g + 1)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        own = pos * D + offs_d  # the summary token's row, in any head's [L, D] slice
        k_s = tl.load(K + kv_base + own, mask=d_ok, other=0.0).to(tl.float32)
        v_s = tl.load(V + kv_base + own, mask=d_ok, other=0.0).to(tl.float32)
        dk = tl.zeros([BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_D], tl.float32)
        for hq in tl.static_range(GROUP):
            bh = (b * H + (bj % H_KV) * GROUP + hq).to(tl.int64)
            base = bh * L * D
            dq, dk, dv = _summary_head(Q + base, K + kv_base, V + kv_base, GradOut + base, Lse + bh * L,
                                       Delta + bh * L, GrpIdx, row_base, pos, own, g_lo, g_hi, k_s, v_s, dk, dv,
                                       offs_d, d_ok, qk_scale, D, BLOCK_D, BLOCK_N)
            tl.store(GradQ + base + own, (dq * scale).to(GradQ.dtype.element_ty), mask=d_ok)
        tl.store(GradK + kv_base + own, (dk * scale).to(GradK.dtype.element_ty), mask=d_ok)
        tl.store(GradV + kv_base + own, dv.to(GradV.dtype.element_ty), mask=d_ok)


@triton.jit
def _summary_head(Q, K, V, GradOut, Lse, Delta, GrpIdx, row_base, pos, own, g_lo, g_hi, k_s, v_s, dk, dv, offs_d,
                  d_ok, qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query head's part of ``_bwd_summary``: the summary token's dq there, and dk/dv plus that head's share.
    ``Q``, ``GradOut``, ``Lse``, ``Delta`` point at the query head, ``K`` and ``V`` at its kv head."""
    q_s = tl.load(Q + own, mask=d_ok, other=0.0).to(tl.float32)
    do_s = tl.load(GradOut + own, mask=d_ok, other=0.0).to(tl.float32)
    lse2_s = tl.load(Lse + pos) * LOG2E
    delta_s = tl.load(Delta + pos)
    # Each chunk is reduced to one row before it is added: few registers, and a fixed order of sums.
    dq = tl.zeros([BLOCK_D], tl.float32)
    for j0 in range(g_lo, g_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = offs_j < g_hi
        tok = tl.load(GrpIdx + row_base + tl.where(j_ok, offs_j, 0), mask=j_ok, other=0)
        k = load_rows(K, tok, j_ok, offs_d, d_ok, D, True)
        v = load_rows(V, tok, j_ok, offs_d, d_ok, D, True)
        # The summary token as the query, the group's tokens as keys.
        p = tl.where(j_ok, tl.exp2(tl.sum(k * q_s[None, :], 1) * qk_scale - lse2_s), 0.0)
        ds = p * (tl.sum(v * do_s[None, :], 1) - delta_s)
        dq += tl.sum(ds[:, None] * k, 0)
        # The group's tokens as queries, the summary token as their key.
        q = load_rows(Q, tok, j_ok, offs_d, d_ok, D, True)
        do = load_rows(GradOut, tok, j_ok, offs_d, d_ok, D, True)
        lse2 = tl.load(Lse + tok, mask=j_ok, other=0.0) * LOG2E
        delta = tl.load(Delta + tok, mask=j_ok, other=0.0)
        p_t = tl.where(j_ok, tl.exp2(tl.sum(q * k_s[None, :], 1) * qk_scale - lse2), 0.0)
        dv += tl.sum(p_t[:, None] * do, 0)
        ds_t = p_t * (tl.sum(do * v_s[None, :], 1) - delta)
        dk += tl.sum(ds_t[:, None] * q, 0)
    return dq, dk, dv


def segment_attention_backward(grad_out, q, k, v, out, lse, segment, group, seg_start, seg_end, group_index,
                               group_offsets, summary_index, summary_offsets, scale: float, is_causal: bool = False):
    """Launch the backward kernels: ``(dq, dk, dv)`` per the op contract."""
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    num_groups = group_offsets.shape[1] - 1
    max_summary = summary_index.shape[1]
    grad_q, grad_k, grad_v = (ops.new_output_like(t) for t in (q, k, v))
    if q.numel() == 0:
        return grad_q, grad_k, grad_v
    grad_out = grad_out.contiguous()
    lse = lse.contiguous()
    bd = block_d(head_dim)
    rows = batch * heads * length
    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    _bwd_delta[(triton.cdiv(rows, DELTA_ROWS),)](out.contiguous(), grad_out, delta, rows, D=head_dim,
                                                 BLOCK_D=bd, ROWS=DELTA_ROWS)
    sum_idx = summary_index_arg(summary_index)
    common = dict(L=length, H=heads, H_KV=kv_heads, NUM_GROUPS=num_groups, MAX_SUMMARY=max_summary,
                  scale=float(scale), qk_scale=float(scale) * LOG2E.value, D=head_dim, BLOCK_D=bd,
                  F32=uses_f32_dot(q.dtype), CAUSAL=bool(is_causal))
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    kv_grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * kv_heads)  # noqa: E731
    layout = (segment, group, seg_start, seg_end, sum_idx, summary_offsets)
    _bwd_segment_dq[grid](q, k, v, grad_out, lse, delta, grad_q, *layout, **common, **fixed(INTERPRET_TILE))
    _bwd_segment_dkdv[kv_grid](q, k, v, grad_out, lse, delta, grad_k, grad_v, *layout, **common,
                               GROUP=heads // kv_heads, **fixed(INTERPRET_TILE))
    if max_summary > 0:
        _bwd_summary[(max_summary, batch * kv_heads)](
            q, k, v, grad_out, lse, delta, grad_q, grad_k, grad_v, group, group_index, group_offsets, sum_idx,
            summary_offsets, **common, GROUP=heads // kv_heads, **fixed(INTERPRET_ROW))
    return grad_q, grad_k, grad_v
