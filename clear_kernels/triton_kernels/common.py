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
``BLOCK_N`` chunks with gathered loads. The autotuner picks among 16/32/64 tiles, only among the configs the
compile report shows spill-free (``SPILL_FREE``), per head dim, dtype and size class;
``CLEAR_KERNELS_TRITON_AUTOTUNE=0`` pins one (``PINNED``).

Head dims that are not powers of two (40, 96) are padded to ``BLOCK_D`` inside the kernel: loads and stores carry
``offs_d < D`` masks; memory is never padded. Every pointer is formed from a clamped (in-range) index even where the
load is masked, so no out-of-bounds address is ever computed.

float32 inputs use ``tl.dot(..., input_precision="ieee")``: TF32 would lose about three decimal digits and the
parity tests compare against a float64 reference with tolerances from PyTorch's own float32 error. Under
``TRITON_INTERPRET=1`` every tile is cast to float32 before the dot, because the interpreter's bfloat16 dot returns
garbage (SPEC §2.3); the float32 result is then rounded once at the store, as on the GPU.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

# Read once: Triton itself reads the variable when it is first imported, so changing it later has no effect.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# ``CLEAR_KERNELS_TRITON_AUTOTUNE=0`` pins one spill-free config per kernel (``PINNED``) instead of autotuning:
# the tests use it, because autotuning compiles every config of every (head dim, dtype) the tests touch.
# Read at import, like TRITON_INTERPRET: the kernels are wrapped (or not) in the autotuner when defined.
AUTOTUNE_ENV = "CLEAR_KERNELS_TRITON_AUTOTUNE"
AUTOTUNE = not INTERPRET and os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"

# Globals read inside kernels must be constexpr objects (the compiler refuses plain Python globals; the
# interpreter does not check this).
SUMMARY = tl.constexpr(-1)
PADDING = tl.constexpr(-2)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Integer arguments that vary with the data, not the model: they must not become part of the compiled
# specialisation, or every new record length / batch would compile a new kernel. (Strides stay specialised:
# Triton only distinguishes "divisible by 16" and "equal to 1", so a stride that scales with L gives at most two
# variants, and the divisibility is what lets it vectorise the loads.)
DYNAMIC_INTS = ["L", "H", "NUM_GROUPS", "MAX_SUMMARY", "BUCKET"]
# ``KV_GROUP`` (query heads per key/value head) stays specialised: 1, the common case, compiles its own variant
# with the head loop unrolled away.

# The one config under the interpreter (autotuning there would only multiply the test time). Tests change it to
# run the other tile shapes.
INTERPRET_TILE = {"BLOCK_M": 16, "BLOCK_N": 16}

# Every config caps registers at 255 (``.maxnreg``): without it ptxas may halve a kernel's registers to fit two
# programs per SM and spill the rest (the compile report showed 128 registers and 16-24 B of stack per thread for
# the 8-warp configs at head dim 128-256 on sm_80); local-memory traffic costs more than that occupancy wins.
MAX_REGISTERS = 255


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         maxnreg=MAX_REGISTERS)


TILE_CONFIGS = [_config(16, 16, 4, 1), _config(16, 16, 8, 1), _config(32, 16, 4, 1), _config(32, 32, 4, 1),
                _config(32, 32, 8, 1), _config(64, 32, 8, 1), _config(64, 64, 8, 2)]


def _shape(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


# The configs (BLOCK_M, BLOCK_N, num_warps, num_stages) each kernel compiles without register spills, per
# operand kind (float32 or half), measured by compiling every config of TILE_CONFIGS for sm_90 and sm_80 at
# D = 96 (padded 128), causal and not, with ``bench/triton_compile_report.py --every-config --causal``
# (bench/results/triton_compile_every_d96.json). float32 runs its dots as exact FMAs (no tensor cores), which takes
# far more registers; the backward holds the tile's q, dO and three gradient accumulators (and k, v) beside the
# chunk's rows, so only its smallest tiles over 8 warps stay in registers.
# tests/test_triton_kernel.py::test_kernels_compile_without_spills compiles every kept config again.
SPILL_FREE = {
    ("_fwd", False): {(16, 16, 4, 1), (16, 16, 8, 1), (32, 16, 4, 1), (32, 32, 8, 1)},
    ("_fwd", True): {(16, 16, 4, 1), (16, 16, 8, 1)},
    ("_bwd", False): {(16, 16, 8, 1)},
    ("_bwd", True): {(16, 16, 8, 1)},
}
SPILL_FREE_MAX_BLOCK_D = 128
# With autotuning off: one config per kernel and operand kind, spill-free at every head dim the backend takes
# (32 to 256 in half precision, to 128 in float32; bench/results/triton_compile_pinned.json).
PINNED = {("_fwd", False): (16, 16, 8, 1), ("_fwd", True): (16, 16, 8, 1), ("_bwd", False): (16, 16, 8, 1),
          ("_bwd", True): (16, 16, 8, 1)}


# Tests set this to run one backward variant on every input (None: ``split_backward`` decides).
FORCE_SPLIT: bool | None = None


def split_backward(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the backward walks each tile's window twice (dq, then dk/dv) instead of once for both. The fused
    walk holds eleven ``[BLOCK, BLOCK_D]`` tiles at once; float32 tiles (exact FMA dots, no tensor cores) and head
    dims past 128 do not fit in registers that way (the compile report showed 48 B of spills per thread for
    float32 at D=96 on sm_80 and 128 B for bfloat16 at D=256); the split walk holds fewer and reads the window
    the second time from cache."""
    if FORCE_SPLIT is not None:
        return FORCE_SPLIT
    return dtype == torch.float32 or block_d(head_dim) > 128


def pinned(kernel_name: str, dtype: torch.dtype) -> triton.Config:
    """The config a kernel runs with autotuning off (and past the head dims the autotuner's list was measured at)."""
    shape = PINNED[(kernel_name, dtype == torch.float32)]
    return next(c for c in TILE_CONFIGS if _shape(c) == shape)


def tuned_configs(kernel_name: str, head_dim: int, dtype: torch.dtype) -> list:
    """The configs the autotuner may try for a kernel at this head dim and dtype: the spill-free ones (past the
    measured head dims, only the pinned config). Never empty."""
    if block_d(head_dim) > SPILL_FREE_MAX_BLOCK_D:
        return [pinned(kernel_name, dtype)]
    allowed = SPILL_FREE[(kernel_name, dtype == torch.float32)]
    return [c for c in TILE_CONFIGS if _shape(c) in allowed] or [pinned(kernel_name, dtype)]


def _pruner(kernel_name: str):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("D", named_args.get("D"))
        q = named_args.get("Q", kwargs.get("Q"))
        return tuned_configs(kernel_name, int(head_dim), q.dtype)
    return prune


def size_bucket(rows: int) -> int:
    """A coarse class of the problem size (``B * H * L`` query rows) for the autotune key: tiny warm-up calls and
    real batches tune apart, while a new record length inside a class reuses the choice."""
    return sum(rows >= limit for limit in (1 << 15, 1 << 18, 1 << 21))


# Autotune results cached on disk (Triton's cache directory), so every process of a run and every later run
# reuses the first one's choice. The keyword exists from Triton 3.3 on; older versions tune per process.
_CACHE_KW = ({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {})


def kernel(
    configs: list[triton.Config],
) -> Callable[[Callable[..., None]], triton.runtime.JITFunction | triton.runtime.Autotuner]:
    """``triton.jit`` with the data-dependent ints unspecialised; autotuned on head dim and size bucket (and the
    dtypes of the tensor arguments, which Triton's autotuner adds to every key) among the spill-free configs,
    unless autotuning is off or the kernel is interpreted."""

    def wrap(fn: Callable[..., None]) -> triton.runtime.JITFunction | triton.runtime.Autotuner:
        jitted = triton.jit(fn, do_not_specialize=[n for n in DYNAMIC_INTS if n in fn.__code__.co_varnames])
        if not AUTOTUNE:
            return jitted
        return triton.autotune(configs=configs, key=["D", "BUCKET"],
                               prune_configs_by={"early_config_prune": _pruner(fn.__name__)}, **_CACHE_KW)(jitted)

    return wrap


def config_kwargs(config: triton.Config) -> dict:
    """A config as launch keyword arguments (bypassing the autotuner)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
            "maxnreg": config.maxnreg}


def launch_config(kernel_name: str, dtype: torch.dtype) -> dict:
    """Launch keyword arguments that fix the config: the interpreter's tiles, the pinned config, or nothing
    (the autotuner chooses)."""
    if INTERPRET:
        return dict(INTERPRET_TILE)
    if not AUTOTUNE:
        return config_kwargs(pinned(kernel_name, dtype))
    return {}


def uses_f32_dot(dtype: torch.dtype) -> bool:
    return INTERPRET or dtype == torch.float32


# Grid limits of CUDA: x up to 2**31 - 1 programs, y and z up to 65535. Offsets inside one (batch, head) slice
# are computed in int32 by the kernels.
MAX_GRID_X, MAX_GRID_YZ, MAX_SLICE_OFFSET = 2**31 - 1, 65535, 2**31 - 1


def check_limits(q: torch.Tensor, max_summary: int, *strided: torch.Tensor) -> None:
    """Raise a clear ``ValueError`` for inputs the launch grid or the kernels' int32 offsets cannot cover."""
    batch, heads, length, head_dim = q.shape
    if batch > MAX_GRID_YZ or heads > MAX_GRID_YZ:
        raise ValueError(f"the triton backend runs at most {MAX_GRID_YZ} batch elements and {MAX_GRID_YZ} heads "
                         f"per call, got B={batch}, H={heads}; split the batch")
    if max_summary + triton.cdiv(length, 16) > MAX_GRID_X:
        raise ValueError(f"sequence length {length} with {max_summary} summary tokens exceeds the launch grid")
    for t in (q, *strided):
        reach = (length - 1) * t.stride(2) + head_dim
        if max(reach, length * head_dim) > MAX_SLICE_OFFSET:
            raise ValueError(f"one (batch, head) slice of length {length} spans {reach} elements: the triton "
                             f"backend addresses at most {MAX_SLICE_OFFSET} per slice")


_FORCED: dict = {}


@contextlib.contextmanager
def forced_configs(configs: dict) -> Iterator[None]:
    """Run the given kernels (``{kernel: triton.Config}``) in exactly these configs, bypassing the autotuner:
    how the tests run every config the autotuner may pick."""
    _FORCED.update(configs)
    try:
        yield
    finally:
        for fn in configs:
            _FORCED.pop(fn, None)


def launch(fn: triton.runtime.JITFunction | triton.runtime.Autotuner, q: torch.Tensor, max_summary: int, args: tuple,
           consts: dict) -> None:
    """Launch a tile kernel on the grid ``(max_summary + cdiv(L, BLOCK_M), H, B)`` with ``q``'s device current
    (Triton launches on the current device, whatever the tensors' device)."""
    batch, heads, length, _ = q.shape
    check_limits(q, max_summary, *(a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4))
    consts = dict(consts, F32=uses_f32_dot(q.dtype), BUCKET=size_bucket(batch * heads * length))
    grid = lambda meta: (max_summary + triton.cdiv(length, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    jitted = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    config = launch_config(jitted.__name__, q.dtype)
    if fn in _FORCED:
        forced = _FORCED[fn]
        config = dict(forced.kwargs) if INTERPRET else config_kwargs(forced)
        fn = jitted
    guard = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        fn[grid](*args, **consts, **config)


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernels take a q, k, v, output or gradient: any batch, head and row strides (views of a
    projection pass as they are, no copy), but unit stride along D."""
    return t if t.stride(-1) == 1 else t.contiguous()


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
def load_rows(Base, rows, row_ok, offs_d, d_ok, stride, F32: tl.constexpr):
    """A ``[len(rows), BLOCK_D]`` tile of an ``[L, D]`` matrix whose rows are ``stride`` elements apart; ``rows``
    must already be clamped in range."""
    t = tl.load(Base + rows[:, None] * stride + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if F32:
        t = t.to(tl.float32)
    return t
