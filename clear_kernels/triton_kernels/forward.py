"""Forward kernel (one launch): summary rows and segment/padding query tiles in one grid; then the launcher.

The grid is ``(MAX_SUMMARY + cdiv(L, BLOCK_M), H, B)``. Programs ``0 .. MAX_SUMMARY - 1`` of a (batch, head) are
summary rows (one summary query against every token of its group); they come first because they walk the
longest key lists (a whole lead), so the scheduler starts them before the short tiles. The rest are query tiles.

``CAUSAL``: inside a segment a query sees the keys at or before it; a query tile's key window then ends at its last
row, so key blocks above the diagonal are not visited (the diagonal block is masked).

Grouped-query attention: ``K`` and ``V`` have ``H / KV_GROUP`` heads; the program of query head ``h`` reads key/value
head ``h // KV_GROUP``, as SDPA's ``enable_gqa``. ``Q``, ``K`` and ``V`` each come with their own strides, so head
views of one projection (or of separate q and kv projections) need no copies.

Scores are kept in the log2 domain (``qk_scale = scale * log2(e)``) so the online softmax uses ``exp2``; the
saved logsumexp is converted back to the natural log the op contract asks for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import (
    LN2,
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
    tile_window,
)


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


@triton.jit
def _summary_row(Q, K, V, Out, Lse, Grp, GrpIdx, GrpOff, SumIdx, i, b, lse_base, out_base, q_base, k_base, v_base,
                 sql, skl, svl, sol, L, NUM_GROUPS, MAX_SUMMARY, qk_scale,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Summary slot ``i`` of batch row ``b``: its query attends every token of its group, walked in ``BLOCK_N``
    chunks of ``group_index`` with one query row (vector products: one row is below ``tl.dot``'s minimum)."""
    row_base = b.to(tl.int64) * L
    pos = tl.load(SumIdx + b * MAX_SUMMARY + i)
    g = tl.load(Grp + row_base + pos)
    g_lo = tl.load(GrpOff + b * (NUM_GROUPS + 1) + g)
    g_hi = tl.load(GrpOff + b * (NUM_GROUPS + 1) + g + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + q_base + pos * sql + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j0 in range(g_lo, g_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = offs_j < g_hi
        kpos = tl.load(GrpIdx + row_base + tl.where(j_ok, offs_j, 0), mask=j_ok, other=0)
        k = load_rows(K + k_base, kpos, j_ok, offs_d, d_ok, skl, True)
        v = load_rows(V + v_base, kpos, j_ok, offs_d, d_ok, svl, True)
        s = tl.where(j_ok, tl.sum(k * q[None, :], 1) * qk_scale, float("-inf"))
        # Every chunk holds at least one token of the group (the summary token itself), so the running max is
        # finite from the first chunk on.
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    tl.store(Out + out_base + pos * sol + offs_d, (acc / l_i).to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + lse_base + pos, (m_i + tl.log2(l_i)) * LN2)


@kernel(TILE_CONFIGS)
def _fwd(
    Q, K, V, Out, Lse, Seg, Grp, SegStart, SegEnd, GrpIdx, GrpOff, SumIdx, SumOff,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    L, H, KV_GROUP, NUM_GROUPS, MAX_SUMMARY, BUCKET, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``Q``, ``K``, ``V`` and ``Out`` have their own batch, head and row strides (unit stride along D for all);
    ``Lse`` is contiguous. ``K`` and ``V`` have ``H / KV_GROUP`` heads. ``BUCKET`` is only read by the autotuner
    (its key), never by the kernel."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b.to(tl.int64) * H + h
    hk = (h // KV_GROUP).to(tl.int64)
    q_base = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = b.to(tl.int64) * skb + hk * skh
    v_base = b.to(tl.int64) * svb + hk * svh
    out_base = b.to(tl.int64) * sob + h.to(tl.int64) * soh
    lse_base = bh * L
    if pid < MAX_SUMMARY:
        if pid < tl.load(SumOff + b * (NUM_GROUPS + 1) + NUM_GROUPS):
            _summary_row(Q, K, V, Out, Lse, Grp, GrpIdx, GrpOff, SumIdx, pid, b, lse_base, out_base, q_base, k_base,
                         v_base, sql, skl, svl, sol, L, NUM_GROUPS, MAX_SUMMARY, qk_scale, D, BLOCK_D, BLOCK_N)
    else:
        row_base = b.to(tl.int64) * L
        offs_m = (pid - MAX_SUMMARY) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        m_ok, m_safe, seg_q, grp_q, start_q, end_q = load_ids(Seg, Grp, SegStart, SegEnd, row_base, offs_m, L)
        lo, hi, sum_lo, sum_hi = tile_window(seg_q, grp_q, start_q, end_q, SumOff + b * (NUM_GROUPS + 1), L,
                                             NUM_GROUPS)
        if CAUSAL:
            hi = tl.minimum(hi, (pid - MAX_SUMMARY) * BLOCK_M + BLOCK_M)
        q_is_seg = seg_q >= 0
        q = load_rows(Q + q_base, m_safe, m_ok, offs_d, d_ok, sql, F32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys of the tile's own segments: one contiguous window.
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            n_safe = tl.where(n_ok, offs_n, 0)
            seg_k = tl.load(Seg + row_base + n_safe, mask=n_ok, other=PADDING)
            k = load_rows(K + k_base, n_safe, n_ok, offs_d, d_ok, skl, F32)
            v = load_rows(V + v_base, n_safe, n_ok, offs_d, d_ok, svl, F32)
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
            k = load_rows(K + k_base, pos, j_ok, offs_d, d_ok, skl, F32)
            v = load_rows(V + v_base, pos, j_ok, offs_d, d_ok, svl, F32)
            allowed = q_is_seg[:, None] & (grp_q[:, None] == grp_k[None, :]) & j_ok[None, :]
            m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, F32)

        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * LN2, 0.0)
        write = m_ok & (seg_q != SUMMARY)
        tl.store(Out + out_base + m_safe[:, None] * sol + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=write[:, None] & d_ok[None, :])
        tl.store(Lse + lse_base + m_safe, lse, mask=write)


def out_like(q: torch.Tensor) -> torch.Tensor:
    """The op's output for ``q``: ``[B, H, L, D]`` with the memory of ``[B, L, H, D]`` (like flash attention's)."""
    batch, heads, length, head_dim = q.shape
    return ops.new_output((batch, length, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)


def summary_index_arg(summary_index: torch.Tensor) -> torch.Tensor:
    """A non-empty tensor to pass for ``summary_index`` (an empty one may have no valid device address); with
    ``max_summary == 0`` the kernels never read it."""
    if summary_index.shape[1] > 0:
        return summary_index
    return torch.zeros(1, dtype=torch.int32, device=summary_index.device)


def segment_attention_forward(q, k, v, segment, group, seg_start, seg_end, group_index, group_offsets,
                              summary_index, summary_offsets, scale: float, is_causal: bool = False):
    """Launch the forward kernel: ``(out, lse)`` per the op contract. ``q``, ``k``, ``v`` may have any strides
    with unit stride along D (``common.unit_stride``); ``k`` and ``v`` may have fewer heads (a divisor of q's).
    ``out`` is the ``[B, H, L, D]`` view of a ``[B, L, H, D]`` tensor (``out_like``), so merging the heads after
    attention, as every multi-head module does, is free."""
    batch, heads, length, head_dim = q.shape
    out = out_like(q)
    lse = ops.new_output((batch, heads, length), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.zero_()
    launch(_fwd, q, summary_index.shape[1],
           (q, k, v, out, lse, segment, group, seg_start, seg_end, group_index, group_offsets,
            summary_index_arg(summary_index), summary_offsets, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3]),
           dict(L=length, H=heads, KV_GROUP=heads // k.shape[1], NUM_GROUPS=group_offsets.shape[1] - 1,
                MAX_SUMMARY=summary_index.shape[1],
                qk_scale=float(scale) * LOG2E.value, D=head_dim, BLOCK_D=block_d(head_dim), CAUSAL=bool(is_causal)))
    return out, lse
