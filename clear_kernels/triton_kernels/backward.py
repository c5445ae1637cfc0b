"""Backward kernel (one launch), then the launcher. Deterministic: every gradient row is written by exactly one
program that sums its contributions in a fixed order; there are no atomics anywhere.

The grid is the forward's: ``(MAX_SUMMARY + cdiv(L, BLOCK_M), H, B)``. With grouped-query attention a program of
query head ``h`` reads key/value head ``h // KV_GROUP`` and writes that head's share of dk/dv; the launcher sums
the shares of each group.

* A tile program owns ``BLOCK_M`` positions and writes dq, dk and dv of its segment and padding rows. The rule is
  symmetric, so the keys its queries see and the queries that see its keys are the same tokens: the window of
  its segments' runs plus the summary tokens of its groups (``tile_window``). Each chunk of that window is loaded
  once (q, k, v, dO, O, lse) and used both ways: the tile as queries against the chunk as keys (dq) and the tile
  as keys against the chunk as queries (dk, dv). Where that holds too many tiles for the registers (``SPLIT``:
  float32, head dims past 128) the window is walked twice instead, once per direction.
* ``delta = rowsum(dO * O)``, the softmax-gradient correction of a query row, is computed where it is needed
  from the dO and O rows already loaded: no separate pass, no buffer.
* ``CAUSAL``: the two directions differ inside a run (tile query m sees chunk key n iff n <= m; chunk query n sees
  tile key m iff m <= n), so a chunk wholly before the tile adds only to dq and a chunk wholly after it only to dk
  and dv; the work above the diagonal is skipped, and the diagonal chunk is masked both ways.
* A summary program computes one summary token's dq (as a query over its group) and dk/dv (as a key seen by
  every token of its group), walking ``group_index`` in order: the reduction over the many heartbeat tokens of
  a lead happens in one program, in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import (
    LOG2E,
    PADDING,
    SUMMARY,
    TILE_CONFIGS,
    block_d,
    dot,
    kernel,
    launch,
    load_ids,
    load_rows,
    split_backward,
    tile_window,
)
from .forward import summary_index_arg


@triton.jit
def _as_queries(q, do, delta, lse2, k_n, v_n, allowed, dq, qk_scale, F32: tl.constexpr):
    """One chunk's contribution to a tile's dq: the tile as queries (``allowed[m, n]``: tile m sees chunk n)."""
    p = tl.where(allowed, tl.exp2(dot(q, tl.trans(k_n), F32) * qk_scale - lse2[:, None]), 0.0)
    ds = p * (dot(do, tl.trans(v_n), F32) - delta[:, None])
    dq += dot(ds.to(k_n.dtype), k_n, F32)
    return dq


@triton.jit
def _as_keys(k, v, q_n, do_n, delta_n, lse2_n, allowed, dk, dv, qk_scale, F32: tl.constexpr):
    """One chunk's contribution to a tile's dk and dv: the tile as keys (``allowed[m, n]``: chunk n sees tile m)."""
    p_t = tl.where(allowed, tl.exp2(dot(k, tl.trans(q_n), F32) * qk_scale - lse2_n[None, :]), 0.0)
    dv += dot(p_t.to(do_n.dtype), do_n, F32)
    ds_t = p_t * (dot(v, tl.trans(do_n), F32) - delta_n[None, :])
    dk += dot(ds_t.to(q_n.dtype), q_n, F32)
    return dk, dv


@triton.jit
def _both_ways(q, k, v, do, delta, lse2, q_n, k_n, v_n, do_n, delta_n, lse2_n, allowed, dq, dk, dv, qk_scale,
               F32: tl.constexpr):
    """One chunk's contribution to a tile's dq (tile as queries) and dk/dv (tile as keys). ``allowed[m, n]`` is
    symmetric in meaning: tile token m and chunk token n see each other."""
    dq = _as_queries(q, do, delta, lse2, k_n, v_n, allowed, dq, qk_scale, F32)
    dk, dv = _as_keys(k, v, q_n, do_n, delta_n, lse2_n, allowed, dk, dv, qk_scale, F32)
    return dq, dk, dv


@triton.jit
def _load_grad_rows(GradOut, Out, Lse, go_base, o_base, lse_base, rows, ok, offs_d, d_ok, sgl, sol,
                    F32: tl.constexpr):
    """dO rows, their delta (float32, from O in its stored precision, as the op's output was rounded) and
    their logsumexp in the log2 domain."""
    do = load_rows(GradOut + go_base, rows, ok, offs_d, d_ok, sgl, F32)
    o = load_rows(Out + o_base, rows, ok, offs_d, d_ok, sol, True)
    delta = tl.sum(do.to(tl.float32) * o, 1)
    lse2 = tl.load(Lse + lse_base + rows, mask=ok, other=0.0) * LOG2E
    return do, delta, lse2


@triton.jit
def _summary_grads(Q, K, V, Out, GradOut, Lse, GradQ, GradK, GradV, Grp, GrpIdx, GrpOff, SumIdx, i, b,
                   q_base, k_base, v_base, go_base, o_base, grad_base, lse_base, sql, skl, svl, sgl, sol, L,
                   NUM_GROUPS, MAX_SUMMARY, scale, qk_scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Summary slot ``i`` of batch row ``b``: its dq (as a query over its group's tokens) and its dk/dv (as the
    key every token of its group sees)."""
    row_base = b.to(tl.int64) * L
    pos = tl.load(SumIdx + b * MAX_SUMMARY + i)
    g = tl.load(Grp + row_base + pos)
    g_lo = tl.load(GrpOff + b * (NUM_GROUPS + 1) + g)
    g_hi = tl.load(GrpOff + b * (NUM_GROUPS + 1) + g + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_s = tl.load(Q + q_base + pos * sql + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_s = tl.load(K + k_base + pos * skl + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    v_s = tl.load(V + v_base + pos * svl + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    do_s = tl.load(GradOut + go_base + pos * sgl + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    o_s = tl.load(Out + o_base + pos * sol + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    delta_s = tl.sum(do_s * o_s, 0)
    lse2_s = tl.load(Lse + lse_base + pos) * LOG2E
    # Each chunk is reduced to one row before it is added: few registers, and a fixed order of sums.
    dq = tl.zeros([BLOCK_D], tl.float32)
    dk = tl.zeros([BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_D], tl.float32)
    for j0 in range(g_lo, g_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = offs_j < g_hi
        tok = tl.load(GrpIdx + row_base + tl.where(j_ok, offs_j, 0), mask=j_ok, other=0)
        k = load_rows(K + k_base, tok, j_ok, offs_d, d_ok, skl, True)
        v = load_rows(V + v_base, tok, j_ok, offs_d, d_ok, svl, True)
        # The summary token as the query, the group's tokens as keys.
        p = tl.where(j_ok, tl.exp2(tl.sum(k * q_s[None, :], 1) * qk_scale - lse2_s), 0.0)
        ds = p * (tl.sum(v * do_s[None, :], 1) - delta_s)
        dq += tl.sum(ds[:, None] * k, 0)
        # The group's tokens as queries, the summary token as their key.
        q = load_rows(Q + q_base, tok, j_ok, offs_d, d_ok, sql, True)
        do, delta, lse2 = _load_grad_rows(GradOut, Out, Lse, go_base, o_base, lse_base, tok, j_ok, offs_d,
                                          d_ok, sgl, sol, True)
        p_t = tl.where(j_ok, tl.exp2(tl.sum(q * k_s[None, :], 1) * qk_scale - lse2), 0.0)
        dv += tl.sum(p_t[:, None] * do, 0)
        ds_t = p_t * (tl.sum(do * v_s[None, :], 1) - delta)
        dk += tl.sum(ds_t[:, None] * q, 0)
    dst = grad_base + pos * D + offs_d
    tl.store(GradQ + dst, (dq * scale).to(GradQ.dtype.element_ty), mask=d_ok)
    tl.store(GradK + dst, (dk * scale).to(GradK.dtype.element_ty), mask=d_ok)
    tl.store(GradV + dst, dv.to(GradV.dtype.element_ty), mask=d_ok)


@triton.jit
def _chunk_as_keys(Seg, Grp, SumIdx, K, V, k_base, v_base, row_base, b, n0, hi, offs_d, d_ok, skl, svl,
                   MAX_SUMMARY, SUMMARY_CHUNK: tl.constexpr, F32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Positions, ids (segment ids of a window chunk, group ids of a summary chunk) and k/v rows of one chunk:
    positions ``n0 .. hi`` of the window, or entries ``n0 .. hi`` of the batch row's ``summary_index``."""
    offs = n0 + tl.arange(0, BLOCK_N)
    ok = offs < hi
    if SUMMARY_CHUNK:
        rows = tl.load(SumIdx + b * MAX_SUMMARY + tl.where(ok, offs, 0), mask=ok, other=0)
        ids = tl.load(Grp + row_base + rows, mask=ok, other=-1)
    else:
        rows = tl.where(ok, offs, 0)
        ids = tl.load(Seg + row_base + rows, mask=ok, other=PADDING)
    k_n = load_rows(K + k_base, rows, ok, offs_d, d_ok, skl, F32)
    v_n = load_rows(V + v_base, rows, ok, offs_d, d_ok, svl, F32)
    return offs, ok, rows, ids, k_n, v_n


@kernel(TILE_CONFIGS)
def _bwd(
    Q, K, V, Out, GradOut, Lse, GradQ, GradK, GradV, Seg, Grp, SegStart, SegEnd, GrpIdx, GrpOff, SumIdx, SumOff,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sgb, sgh, sgl, sob, soh, sol,
    L, H, KV_GROUP, NUM_GROUPS, MAX_SUMMARY, BUCKET, scale, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``Q``, ``K``, ``V``, ``GradOut`` and ``Out`` have their own strides (unit stride along D); ``K`` and ``V``
    have ``H / KV_GROUP`` heads. ``Lse`` and the three gradients are contiguous ``[B, H, L(, D)]``: with
    ``KV_GROUP > 1`` dk and dv are written per query head and summed over each group by the launcher.

    ``SPLIT`` walks the window twice, once for dq (the chunks' k, v) and once for dk/dv (the chunks' q, dO),
    instead of once for both: fewer tiles are live at a time, which keeps the float32 and the widest-head programs
    in registers (``common.split_backward``); the second walk reads from cache."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b.to(tl.int64) * H + h
    hk = (h // KV_GROUP).to(tl.int64)
    q_base = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = b.to(tl.int64) * skb + hk * skh
    v_base = b.to(tl.int64) * svb + hk * svh
    go_base = b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
    o_base = b.to(tl.int64) * sob + h.to(tl.int64) * soh
    grad_base = bh * L * D
    lse_base = bh * L
    if pid < MAX_SUMMARY:
        if pid < tl.load(SumOff + b * (NUM_GROUPS + 1) + NUM_GROUPS):
            _summary_grads(Q, K, V, Out, GradOut, Lse, GradQ, GradK, GradV, Grp, GrpIdx, GrpOff, SumIdx, pid, b,
                           q_base, k_base, v_base, go_base, o_base, grad_base, lse_base, sql, skl, svl, sgl, sol, L,
                           NUM_GROUPS, MAX_SUMMARY, scale, qk_scale, D, BLOCK_D, BLOCK_N)
    else:
        row_base = b.to(tl.int64) * L
        tile_lo = (pid - MAX_SUMMARY) * BLOCK_M
        offs_m = tile_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        m_ok, m_safe, seg_m, grp_m, start_m, end_m = load_ids(Seg, Grp, SegStart, SegEnd, row_base, offs_m, L)
        lo, hi, sum_lo, sum_hi = tile_window(seg_m, grp_m, start_m, end_m, SumOff + b * (NUM_GROUPS + 1), L,
                                             NUM_GROUPS)
        # Causal: the tile's queries see window keys before its end; its keys are seen by window queries from
        # its start on. Chunks outside those ranges are not visited in that direction.
        hi_q = tl.minimum(hi, tile_lo + BLOCK_M) if CAUSAL else hi
        lo_k = tl.maximum(lo, tile_lo) if CAUSAL else lo
        m_is_seg = seg_m >= 0
        q = load_rows(Q + q_base, m_safe, m_ok, offs_d, d_ok, sql, F32)
        do, delta, lse2 = _load_grad_rows(GradOut, Out, Lse, go_base, o_base, lse_base, m_safe, m_ok, offs_d,
                                          d_ok, sgl, sol, F32)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if SPLIT:
            # dq: the tile as queries against the window's and the summary chunks' keys.
            for n0 in range(lo, hi_q, BLOCK_N):
                offs_n, n_ok, n_safe, seg_n, k_n, v_n = _chunk_as_keys(
                    Seg, Grp, SumIdx, K, V, k_base, v_base, row_base, b, n0, hi_q, offs_d, d_ok, skl, svl,
                    MAX_SUMMARY, False, F32, BLOCK_N)
                allowed = m_is_seg[:, None] & (seg_m[:, None] == seg_n[None, :])
                if CAUSAL:
                    allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
                dq = _as_queries(q, do, delta, lse2, k_n, v_n, allowed, dq, qk_scale, F32)
            for j0 in range(sum_lo, sum_hi, BLOCK_N):
                offs_j, j_ok, pos, grp_n, k_n, v_n = _chunk_as_keys(
                    Seg, Grp, SumIdx, K, V, k_base, v_base, row_base, b, j0, sum_hi, offs_d, d_ok, skl, svl,
                    MAX_SUMMARY, True, F32, BLOCK_N)
                allowed = m_is_seg[:, None] & (grp_m[:, None] == grp_n[None, :]) & j_ok[None, :]
                dq = _as_queries(q, do, delta, lse2, k_n, v_n, allowed, dq, qk_scale, F32)
            # dk, dv: the tile as keys of the same chunks as queries.
            k = load_rows(K + k_base, m_safe, m_ok, offs_d, d_ok, skl, F32)
            v = load_rows(V + v_base, m_safe, m_ok, offs_d, d_ok, svl, F32)
            for n0 in range(lo_k, hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < hi
                n_safe = tl.where(n_ok, offs_n, 0)
                seg_n = tl.load(Seg + row_base + n_safe, mask=n_ok, other=PADDING)
                q_n = load_rows(Q + q_base, n_safe, n_ok, offs_d, d_ok, sql, F32)
                do_n, delta_n, lse2_n = _load_grad_rows(GradOut, Out, Lse, go_base, o_base, lse_base, n_safe, n_ok,
                                                        offs_d, d_ok, sgl, sol, F32)
                allowed = m_is_seg[:, None] & (seg_m[:, None] == seg_n[None, :])
                if CAUSAL:
                    allowed = allowed & (offs_n[None, :] >= offs_m[:, None])
                dk, dv = _as_keys(k, v, q_n, do_n, delta_n, lse2_n, allowed, dk, dv, qk_scale, F32)
            for j0 in range(sum_lo, sum_hi, BLOCK_N):
                offs_j = j0 + tl.arange(0, BLOCK_N)
                j_ok = offs_j < sum_hi
                pos = tl.load(SumIdx + b * MAX_SUMMARY + tl.where(j_ok, offs_j, 0), mask=j_ok, other=0)
                grp_n = tl.load(Grp + row_base + pos, mask=j_ok, other=-1)
                q_n = load_rows(Q + q_base, pos, j_ok, offs_d, d_ok, sql, F32)
                do_n, delta_n, lse2_n = _load_grad_rows(GradOut, Out, Lse, go_base, o_base, lse_base, pos, j_ok,
                                                        offs_d, d_ok, sgl, sol, F32)
                allowed = m_is_seg[:, None] & (grp_m[:, None] == grp_n[None, :]) & j_ok[None, :]
                dk, dv = _as_keys(k, v, q_n, do_n, delta_n, lse2_n, allowed, dk, dv, qk_scale, F32)
        else:
            # One walk: each chunk's q, k, v, dO loaded once and used both ways.
            k = load_rows(K + k_base, m_safe, m_ok, offs_d, d_ok, skl, F32)
            v = load_rows(V + v_base, m_safe, m_ok, offs_d, d_ok, svl, F32)
            for n0 in range(lo, hi, BLOCK_N):
                offs_n, n_ok, n_safe, seg_n, k_n, v_n = _chunk_as_keys(
                    Seg, Grp, SumIdx, K, V, k_base, v_base, row_base, b, n0, hi, offs_d, d_ok, skl, svl,
                    MAX_SUMMARY, False, F32, BLOCK_N)
                q_n = load_rows(Q + q_base, n_safe, n_ok, offs_d, d_ok, sql, F32)
                do_n, delta_n, lse2_n = _load_grad_rows(GradOut, Out, Lse, go_base, o_base, lse_base, n_safe, n_ok,
                                                        offs_d, d_ok, sgl, sol, F32)
                allowed = m_is_seg[:, None] & (seg_m[:, None] == seg_n[None, :])
                if CAUSAL:
                    if n0 < hi_q:
                        dq = _as_queries(q, do, delta, lse2, k_n, v_n, allowed & (offs_n[None, :] <= offs_m[:, None]),
                                         dq, qk_scale, F32)
                    if n0 + BLOCK_N > lo_k:
                        dk, dv = _as_keys(k, v, q_n, do_n, delta_n, lse2_n,
                                          allowed & (offs_n[None, :] >= offs_m[:, None]), dk, dv, qk_scale, F32)
                else:
                    dq, dk, dv = _both_ways(q, k, v, do, delta, lse2, q_n, k_n, v_n, do_n, delta_n, lse2_n, allowed,
                                            dq, dk, dv, qk_scale, F32)
            for j0 in range(sum_lo, sum_hi, BLOCK_N):
                offs_j, j_ok, pos, grp_n, k_n, v_n = _chunk_as_keys(
                    Seg, Grp, SumIdx, K, V, k_base, v_base, row_base, b, j0, sum_hi, offs_d, d_ok, skl, svl,
                    MAX_SUMMARY, True, F32, BLOCK_N)
                q_n = load_rows(Q + q_base, pos, j_ok, offs_d, d_ok, sql, F32)
                do_n, delta_n, lse2_n = _load_grad_rows(GradOut, Out, Lse, go_base, o_base, lse_base, pos, j_ok,
                                                        offs_d, d_ok, sgl, sol, F32)
                allowed = m_is_seg[:, None] & (grp_m[:, None] == grp_n[None, :]) & j_ok[None, :]
                dq, dk, dv = _both_ways(q, k, v, do, delta, lse2, q_n, k_n, v_n, do_n, delta_n, lse2_n, allowed,
                                        dq, dk, dv, qk_scale, F32)

        write = m_ok & (seg_m != SUMMARY)
        dst = grad_base + m_safe[:, None] * D + offs_d[None, :]
        mask = write[:, None] & d_ok[None, :]
        tl.store(GradQ + dst, (dq * scale).to(GradQ.dtype.element_ty), mask=mask)
        tl.store(GradK + dst, (dk * scale).to(GradK.dtype.element_ty), mask=mask)
        tl.store(GradV + dst, dv.to(GradV.dtype.element_ty), mask=mask)


def segment_attention_backward(grad_out, q, k, v, out, lse, segment, group, seg_start, seg_end, group_index,
                               group_offsets, summary_index, summary_offsets, scale: float, is_causal: bool = False):
    """Launch the backward kernel: ``(dq, dk, dv)`` per the op contract (contiguous; dk and dv with k's heads).
    Every input may have its own strides, with unit stride along D.

    Grouped-query attention (``k`` with ``H / G`` heads): the kernel writes dk and dv per query head, in float32,
    and they are summed over each group of ``G`` heads here, in a fixed order (as flash-attention does); a loop
    over the group inside one program would hold the dk/dv accumulators across it and spill."""
    batch, heads, length, head_dim = q.shape
    group_size = heads // k.shape[1]
    grad_q = ops.new_output(q.shape, dtype=q.dtype, device=q.device)
    grad_shape, grad_dtype = (q.shape, q.dtype) if group_size == 1 else ((batch, heads, length, head_dim),
                                                                          torch.float32)
    grad_k, grad_v = (ops.new_output(grad_shape, dtype=grad_dtype, device=q.device) for _ in range(2))
    if q.numel() > 0:
        launch(_bwd, q, summary_index.shape[1],
               (q, k, v, out, grad_out, lse.contiguous(), grad_q, grad_k, grad_v, segment, group,
                seg_start, seg_end, group_index, group_offsets, summary_index_arg(summary_index), summary_offsets,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *out.stride()[:3]),
               dict(L=length, H=heads, KV_GROUP=group_size, NUM_GROUPS=group_offsets.shape[1] - 1,
                    MAX_SUMMARY=summary_index.shape[1], scale=float(scale), qk_scale=float(scale) * LOG2E.value,
                    D=head_dim, BLOCK_D=block_d(head_dim), CAUSAL=bool(is_causal),
                    SPLIT=split_backward(q.dtype, head_dim)))
    if group_size > 1:
        def fold(g):
            return g.view(batch, k.shape[1], group_size, length, head_dim).sum(2).to(k.dtype)
        grad_k, grad_v = fold(grad_k), fold(grad_v)
    return grad_q, grad_k, grad_v
