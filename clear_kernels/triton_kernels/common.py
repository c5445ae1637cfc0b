"""Pieces shared by the forward and backward Triton kernels: tile windows, the dot, tuning, launch helpers.

Tile choice (short segments). A query tile is ``BLOCK_M`` contiguous positions. Because every segment is one
contiguous run, the keys a tile needs from its segments form one window ``[min seg_start, max seg_end)``: the tile
itself plus at most one partial segment hanging over each edge. With CLEAR heartbeats of at most 12 tokens that
window holds at most ``BLOCK_M + 2 * (12 - 1)`` keys: 38 for ``BLOCK_M = 16`` (three 16-key tiles, 768 scores for
at most 16 * 12 = 192 needed ones) and 54 for ``BLOCK_M = 32`` (two 32-key tiles, 2048 scores for at most 384).
Dense attention at L = 1812 would compute 1812 scores per query row instead of 48-64, so the waste inside a window
is small next to what is skipped, and 16/32-wide tiles are the smallest shapes ``tl.dot`` accepts. Long segments
(records of thousands of tokens) simply give longer windows walked by the same loop. The summary keys of a tile are
the summary tokens of the groups its segment tokens belong to: a contiguous slice of ``summary_index`` walked in
``BLOCK_N`` chunks with gathered loads. The autotuner picks among 16/32/64 tiles per head dim and dtype.

Head dims that are not powers of two (40, 96) are padded to ``BLOCK_D`` inside the kernel: loads and stores carry
``offs_d < D`` masks; memory is never padded. Every pointer is formed from a clamped (in-range) index even where the
load is masked, so no out-of-bounds address is ever computed.

float32 inputs use ``tl.dot(..., input_precision="ieee")``: TF32 would lose about three decimal digits and the
parity tests compare against a float64 reference with tolerances from PyTorch's own float32 error. Under
``TRITON_INTERPRET=1`` every tile is cast to float32 before the dot, because the interpreter's bfloat16 dot returns
garbage (SPEC §2.3); the float32 result is then rounded once at the store, as on the GPU.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Read once: Triton itself reads the variable when it is first imported, so changing it later has no effect.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Globals read inside kernels must be constexpr objects (the compiler refuses plain Python globals; the
# interpreter does not check this).
SUMMARY = tl.constexpr(-1)
PADDING = tl.constexpr(-2)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Integer arguments that vary with the data, not the model: they must not become part of the compiled
# specialisation, or every new record length / batch would compile a new kernel.
DYNAMIC_INTS = ["L", "H", "NUM_GROUPS", "MAX_SUMMARY"]

# One fixed configuration under the interpreter (autotuning there would only multiply the test time).
INTERPRET_TILE = {"BLOCK_M": 16, "BLOCK_N": 16}
INTERPRET_ROW = {"BLOCK_N": 16}

TILE_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]
ROW_CONFIGS = [
    triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=1),
]


# Largest operand tile a config may load, in bytes (rows x padded head dim x element size). Compiling every
# config for sm_90 (bench/triton_compile_report.py) shows that past 16 KiB the backward's float32 accumulators no
# longer fit in registers: ptxas falls back to kilobytes of stack per thread (e.g. float32, D=96, 64x32 tiles).
MAX_TILE_BYTES = 64 * 128 * 2


def _prune_for_head_dim(configs, named_args, **kwargs):
    head_dim = kwargs.get("D", named_args.get("D"))
    if head_dim is None:
        return configs
    q = named_args.get("Q", kwargs.get("Q"))
    elem = q.element_size() if hasattr(q, "element_size") else 2
    width = block_d(int(head_dim)) * elem
    fits = [c for c in configs if max(c.kwargs.get("BLOCK_M", 16), c.kwargs["BLOCK_N"]) * width <= MAX_TILE_BYTES]
    return fits or configs[:1]


def kernel(configs):
    """``triton.jit`` with the data-dependent ints unspecialised, autotuned on the head dim (and, implicitly,
    the dtypes of the tensor arguments, which Triton's autotuner adds to every key) except under the
    interpreter."""

    def wrap(fn):
        jitted = triton.jit(fn, do_not_specialize=[n for n in DYNAMIC_INTS if n in fn.__code__.co_varnames])
        if INTERPRET:
            return jitted
        return triton.autotune(configs=configs, key=["D"],
                               prune_configs_by={"early_config_prune": _prune_for_head_dim})(jitted)

    return wrap


def fixed(config: dict) -> dict:
    """Launch keyword arguments: the fixed tiles under the interpreter, nothing (autotuned) otherwise."""
    return dict(config) if INTERPRET else {}


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def dot(a, b, F32: tl.constexpr):
    # float32 tiles: exact products (see the module docstring); half tiles: tensor cores, float32 accumulation.
    if F32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def load_ids(Seg, Grp, Start, End, row_base, offs, L):
    """Ids and run bounds of positions ``offs`` of one batch row; positions past ``L`` read as padding."""
    ok = offs < L
    safe = tl.where(ok, offs, 0)
    seg = tl.load(Seg + row_base + safe, mask=ok, other=PADDING)
    grp = tl.load(Grp + row_base + safe, mask=ok, other=0)
    start = tl.load(Start + row_base + safe, mask=ok, other=0)
    end = tl.load(End + row_base + safe, mask=ok, other=0)
    return ok, safe, seg, grp, start, end


@triton.jit
def tile_window(seg, grp, start, end, SumOff, L, NUM_GROUPS):
    """What a tile of tokens interacts with, by the symmetric rule: the position window ``[lo, hi)`` covering
    the runs of its segment tokens, and the slice ``[sum_lo, sum_hi)`` of ``summary_index`` holding the summary
    tokens of their groups (``SumOff`` points at the batch row of ``summary_offsets``). Tiles without segment
    tokens get empty ranges."""
    is_seg = seg >= 0
    any_seg = tl.max(is_seg.to(tl.int32), 0) > 0
    lo = tl.min(tl.where(is_seg, start, L), 0)
    hi = tl.max(tl.where(is_seg, end, 0), 0)
    lo = tl.where(any_seg, lo, 0)
    hi = tl.where(any_seg, hi, 0)
    g_lo = tl.min(tl.where(is_seg, grp, NUM_GROUPS), 0)
    g_hi = tl.max(tl.where(is_seg, grp + 1, 0), 0)
    sum_lo = tl.load(SumOff + tl.where(any_seg, g_lo, 0))
    sum_hi = tl.load(SumOff + tl.where(any_seg, g_hi, 0))
    return lo, hi, sum_lo, sum_hi


@triton.jit
def kv_head(bh, H, H_KV):
    """The (batch * kv head) index that query head ``bh`` (= batch * H + head) reads: grouped-query attention
    maps query head h to kv head h // (H // H_KV), as SDPA's enable_gqa."""
    return (bh // H) * H_KV + (bh % H) // (H // H_KV)


@triton.jit
def load_rows(Base, rows, row_ok, offs_d, d_ok, D: tl.constexpr, F32: tl.constexpr):
    """A ``[len(rows), BLOCK_D]`` tile of a ``[L, D]`` matrix; ``rows`` must already be clamped in range."""
    t = tl.load(Base + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if F32:
        t = t.to(tl.float32)
    return t
