"""Segment attention against the alternatives, side by side in one process, on CPU or GPU (SPEC §2.4).

    python bench/bench_attention.py                          # CPU, float32, every case, results into bench/results/
    python bench/bench_attention.py --quick                  # a smoke run: small batches, few repeats, short sweep
    python bench/bench_attention.py --device cuda --dtype bfloat16 --must-show --profile   # the GPU figures
    python bench/bench_attention.py --render bench/results/attention_cpu_float32.json      # rewrite the .md

One case list (``cases``), one set of implementations (``implementations``), one JSON schema and one Markdown
writer for both devices. Per case and implementation: the forward and the forward+backward time (GPU:
``triton.testing.do_bench`` median, plus a kernel-only column replayed from a CUDA graph; CPU:
``torch.utils.benchmark``), the ratio to dense SDPA, and the memory-traffic floor of the shape (the bytes of q, k,
v, out and, for forward+backward, of dO, dq, dk, dv, over the copy bandwidth measured on the same device).

Implementations:
  * ``segment[<backend>]``  clear_kernels.segment_attention with that backend (triton, cuda, cpu);
  * ``dense_sdpa``          F.scaled_dot_product_attention with the materialised [B, 1, L, L] bool mask;
  * ``flex[128]``, ``flex[<128]``  FlexAttention compiled (recompile limit raised, so a new shape never drops it
                            to the unfused eager path), block mask from the layout's ids with BLOCK_SIZE 128 and
                            the best smaller size; the block-mask build time is reported apart (``mask_ms``);
                            forward only on CPU, where FlexAttention has no backward;
  * ``reshape``             heartbeats folded into the batch ([B * beats, H, 12, D], plain SDPA); ignores the
                            summary tokens: a lower bound on work, not the same op;
  * ``varlen``              torch's varlen attention (or flash-attn's) where importable, over the segments only
                            (summary tokens as one-token sequences): also not the same op, except on packed
                            documents.

The "packed causal documents" cases time the commonest use of block-diagonal attention: one row of L = 2k, 8k or
16k tokens packed with documents of 20 to 2000 tokens, attending causally inside each document (``is_causal=True``;
SDPA, FlexAttention and varlen get the same document-causal rule).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clear_kernels import PADDING, SUMMARY, SegmentLayout, segment_attention  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LEADS = 12
# Implementations flagged as computing less than the op (they drop the summary tokens).
NOT_THE_SAME_OP = {"reshape": "segments only, summary tokens dropped",
                   "varlen": "segments only, summary tokens as one-token sequences"}


# ------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    batch: int
    heads: int
    head_dim: int
    beats: int
    visible: int | None = None  # pretraining encoder: this many random visible tokens per record, compact
    sweep: bool = False            # part of the beats-per-record sweep (for the plot)
    must_show: bool = False        # a shape the GPU aims of issue #12 are measured at
    packed_len: int | None = None  # packed documents instead of heartbeats: tokens per row (beats is then 0)
    causal: bool = False              # is_causal=True inside each segment (every implementation)
    kv_heads: int | None = None       # grouped-query attention: k and v with this many heads (None: heads)

    @property
    def heads_kv(self) -> int:
        return self.kv_heads or self.heads

    def layout(self, device: str) -> SegmentLayout:
        gen = torch.Generator().manual_seed(0)
        if self.packed_len is not None:
            return packed_documents(self.batch, self.packed_len, gen).to(device)
        if self.visible is None:
            valid = torch.ones(self.batch, LEADS, self.beats, dtype=torch.bool)
            return SegmentLayout.conduction(valid).to(device)
        scores = torch.rand(self.batch, LEADS * self.beats, generator=gen)
        keep = scores.argsort(dim=1)[:, : self.visible]
        valid = torch.zeros(self.batch, LEADS * self.beats, dtype=torch.bool).scatter_(1, keep, True)
        return SegmentLayout.conduction(valid.view(self.batch, LEADS, self.beats), compact=True).to(device)


DOC_LENGTHS = (20, 2000)  # packed documents: lengths drawn uniformly in this range (the last one cut to fit)


def packed_documents(batch: int, length: int, gen: torch.Generator) -> SegmentLayout:
    """Rows of ``length`` tokens filled with documents of random lengths in ``DOC_LENGTHS``."""
    lo, hi = DOC_LENGTHS
    rows = []
    for _ in range(batch):
        row, filled = [], 0
        while filled < length:
            n = min(int(torch.randint(lo, hi + 1, (1,), generator=gen)), length - filled)
            row.append(n)
            filled += n
        rows.append(row)
    width = max(map(len, rows))
    return SegmentLayout.block_diagonal([r + [0] * (width - len(r)) for r in rows], total_len=length)


def packed_cases(quick: bool) -> list[Case]:
    """Packed causal documents: one row, 4 heads of 64 (dense SDPA's L x L scores still fit at L = 8k); then the
    same with grouped-query heads (4 query heads reading 2 key/value heads, as in a small LLM)."""
    lengths = (2048,) if quick else (2048, 8192, 16384)
    gqa = 2048 if quick else 8192
    return ([Case(f"packed causal documents L={n // 1024}k", 1, 4, 64, 0, packed_len=n, causal=True)
             for n in lengths]
            + [Case(f"packed causal documents L={gqa // 1024}k, GQA 4:2", 1, 4, 64, 0, packed_len=gqa, causal=True,
                    kv_heads=2)])


def cases(device: str, quick: bool = False, tiny: bool = False) -> list[Case]:
    """The case list for a device: the CLEAR shapes, then the beats-per-record sweep. ``tiny`` (the GPU check's
    dry run under the Triton interpreter) shrinks everything to seconds."""
    if tiny:
        return [Case("encoder (CLEAR)", 1, 2, 96, 2, must_show=True),
                Case("long record (150 beats)", 1, 1, 96, 4, must_show=True)]
    gpu = device == "cuda"
    b = 8 if quick else (256 if gpu else 64)
    long_b = 2 if quick else 8
    out = [
        Case("encoder (CLEAR)", b, 8, 96, 15, must_show=True),
        Case("decoder (CLEAR)", b, 16, 32, 15),
        Case("pretrain encoder (12+35 tokens)", b, 8, 96, 15, visible=35),
        Case("long record (150 beats)", long_b, 8, 96, 150, must_show=True),
    ]
    out += packed_cases(quick)
    beats = (15, 60, 150) if quick else (15, 30, 60, 150, 300, 600)
    out += [Case(f"sweep {n} beats", long_b, 8, 96, n, sweep=True) for n in beats]
    return out


# ---------------------------------------------------------------------------------------- implementations
# Each maker returns (forward, reason, extra) where forward(q, k, v) -> out, or (None, why it cannot run, {}).
Made = tuple[Callable[..., torch.Tensor] | None, str | None, dict]
Maker = Callable[[Case, SegmentLayout, torch.Tensor], tuple]

DENSE_MAX_BYTES = 1 << 30  # dense SDPA's [B, H, L, L] scores beyond this are not worth the memory


def make_segment(backend: str) -> Maker:
    def make(case: Case, layout: SegmentLayout, q: torch.Tensor) -> Made:
        from clear_kernels import available_backends
        reason = available_backends(q).get(backend)
        if reason is not None:
            return None, f"unavailable: {reason}", {}
        gqa = case.heads_kv != case.heads
        return (lambda q, k, v: segment_attention(q, k, v, layout, is_causal=case.causal, enable_gqa=gqa,
                                                  backend=backend)), None, {}
    return make


def make_dense(case: Case, layout: SegmentLayout, q: torch.Tensor) -> Made:
    b, h, length, _ = q.shape
    if b * h * length * length * 4 > DENSE_MAX_BYTES:
        return None, f"skipped: L x L scores need {b * h * length * length * 4 / 2**30:.0f} GiB", {}
    mask = layout.materialize(case.causal)
    mask = (mask | torch.diag_embed(~mask.any(-1)))[:, None]  # padding rows see themselves: no NaN rows
    gqa = case.heads_kv != case.heads
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)), None, {}


def make_reshape(case: Case, layout: SegmentLayout, q: torch.Tensor) -> Made:
    if case.packed_len is not None:
        return None, "n/a: documents of unequal length", {}
    if case.visible is not None:
        return None, "n/a: beats of unequal length (masked tokens)", {}
    b, _, _, d = q.shape
    gqa = case.heads_kv != case.heads

    # [B, H, 12 + beats * 12, D] -> [B * beats, H, 12, D] (4-D: SDPA's fused kernels take it)
    def fold(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[1]
        return x[:, :, LEADS:].reshape(b, h, case.beats, LEADS, d).permute(0, 2, 1, 3, 4).reshape(-1, h, LEADS, d)

    return (lambda q, k, v: F.scaled_dot_product_attention(fold(q), fold(k), fold(v), enable_gqa=gqa)), None, {}


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
        return "torch", varlen_attn
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func
        return "flash_attn", flash_attn_varlen_func
    except ImportError:
        return None, None


def make_varlen(case: Case, layout: SegmentLayout, q: torch.Tensor) -> Made:
    if q.device.type != "cuda":
        return None, "n/a: CUDA only", {}
    source, fn = _varlen_fn()
    if fn is None:
        return None, "unavailable: neither torch.nn.attention.varlen nor flash_attn", {}
    seg = layout.segment.cpu()
    b, h, length, d = q.shape
    # Runs of one segment id are sequences; summary and padding tokens are one-token sequences.
    flat = seg.reshape(-1)
    new_run = torch.ones_like(flat, dtype=torch.bool)
    new_run[1:] = (flat[1:] != flat[:-1]) | (flat[1:] < 0)
    new_run[::length] = True
    starts = torch.nonzero(new_run).flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32).to(q.device)
    max_len = int((cu[1:] - cu[:-1]).max())

    # Causal documents: torch's varlen takes a (left, right) window, flash-attn a flag.
    causal = {} if not case.causal else ({"window_size": (-1, 0)} if source == "torch" else {"causal": True})

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Both take grouped-query k/v as they are: [T, H_kv, D] beside [T, H, D].
        pack = lambda t: t.transpose(1, 2).reshape(b * length, t.shape[1], d)  # noqa: E731
        out = fn(pack(q), pack(k), pack(v), cu, cu, max_len, max_len, **causal)  # the same positional order in both
        return out.view(b, length, h, d).transpose(1, 2)

    return run, None, {"varlen_source": source}


def _raise_recompile_limit(limit: int = 256) -> None:
    # One compiled FlexAttention serves every shape of the run; past dynamo's recompile limit (8) it would
    # silently run eagerly, i.e. unfused. The setting was renamed across torch versions.
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(limit, getattr(dynamo_config, name)))


_FLEX_COMPILED = None


def make_flex(block_size: int) -> Maker:
    def make(case: Case, layout: SegmentLayout, q: torch.Tensor) -> Made:
        global _FLEX_COMPILED
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:
            return None, f"unavailable: {exc}", {}
        seg, grp = layout.segment.to(torch.int64), layout.group.to(torch.int64)

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            sq, sk = seg[b, q_idx], seg[b, kv_idx]
            same_segment = (sq >= 0) & (sq == sk)
            if case.causal:  # FlexAttention's document-causal mask
                same_segment = same_segment & (kv_idx <= q_idx)
            summary_pair = (grp[b, q_idx] == grp[b, kv_idx]) & ((sq == SUMMARY) | (sk == SUMMARY))
            return (sq != PADDING) & (sk != PADDING) & (same_segment | summary_pair)

        try:
            if _FLEX_COMPILED is None:
                _raise_recompile_limit()
                _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
            _sync(q.device.type)
            start = time.perf_counter()
            block_mask = create_block_mask(mask_mod, layout.batch_size, None, layout.seq_len, layout.seq_len,
                                           device=str(q.device), BLOCK_SIZE=block_size)
            _sync(q.device.type)
            mask_ms = (time.perf_counter() - start) * 1e3
            # Kernel tiles no larger than the mask's blocks (forward: BLOCK_M/N; backward: BLOCK_M1/N1/M2/N2).
            tiles = {k: block_size for k in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}
            options = {} if block_size == 128 else {"kernel_options": tiles}
            gqa = {"enable_gqa": True} if case.heads_kv != case.heads else {}
            fn = lambda q, k, v: _FLEX_COMPILED(q, k, v, block_mask=block_mask, **options, **gqa)  # noqa: E731
            kv = q[:, :case.heads_kv]
            with torch.no_grad():
                fn(q, kv, kv)  # compile now, so a failure is reported here and not timed
        except Exception as exc:  # noqa: BLE001 - any failure is a result to report, not a crash
            return None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}", {}
        return fn, None, {"mask_ms": mask_ms, "block_size": block_size}
    return make


FLEX_SMALLER = (64, 32)  # the smaller block sizes tried for "flex[<128]" (the best one is kept)
FLEX_SMALLER_MUST_SHOW = (64,)  # the GPU check's time budget holds one more FlexAttention compile per shape


def implementations(device: str, backends: list[str], flex: bool = True,
                    flex_smaller: tuple = FLEX_SMALLER) -> dict[str, Maker]:
    impls: dict[str, Maker] = {f"segment[{name}]": make_segment(name) for name in backends}
    impls["dense_sdpa"] = make_dense
    if flex:
        impls["flex[128]"] = make_flex(128)
        for size in flex_smaller:
            impls[f"flex[{size}]"] = make_flex(size)
    impls["reshape"] = make_reshape
    if device == "cuda":
        impls["varlen"] = make_varlen
    return impls


def backward_unsupported(impl: str, device: str) -> str | None:
    if impl.startswith("flex") and device == "cpu":
        return "n/a: FlexAttention has no CPU backward"
    return None


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _do_bench(fn, warmup_ms: int, rep_ms: int, graph: bool = False) -> float:
    import triton.testing as tt
    if graph:
        return float(tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    return float(tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def measure_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median time of ``fn``: ``do_bench`` on GPU, ``torch.utils.benchmark`` on CPU (``repeats`` timed runs
    after one warm-up)."""
    if device == "cuda":
        return _do_bench(fn, warmup_ms=25, rep_ms=max(20, 10 * repeats))
    import torch.utils.benchmark as benchmark
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return statistics.median(timer.timeit(1).median for _ in range(repeats)) * 1e3


def graph_ms(fn: Callable[[], object], repeats: int) -> tuple[float | None, str | None]:
    """Kernel-only time: ``fn`` captured once in a CUDA graph and replayed, so no host work is counted; or None
    and the reason capture failed (host synchronisation in ``fn``, say), which goes into the row's note."""
    try:
        return _do_bench(fn, 0, max(20, 10 * repeats), graph=True), None
    except Exception as exc:  # noqa: BLE001 - reported in the note; the other columns stand
        torch.cuda.synchronize()
        return None, f"no CUDA graph: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def step_functions(forward: Callable, case: Case, device: str, dtype: torch.dtype,
                   seq_len: int) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """(forward-only step, forward+backward step) on fresh random inputs of the case's shape."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.heads, seq_len, case.head_dim)
    kv_shape = (case.batch, case.heads_kv, seq_len, case.head_dim)
    q, k, v = (torch.randn(s, generator=gen, device=device, dtype=dtype, requires_grad=True)
               for s in (shape, kv_shape, kv_shape))
    grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)

    def fwd() -> torch.Tensor:
        with torch.no_grad():  # detached too: FlexAttention on CPU refuses inputs that require grad
            return forward(q.detach(), k.detach(), v.detach())

    def fwd_bwd() -> None:
        out = forward(q, k, v)
        # The reshape trick returns the folded shape; any gradient of matching size times the same work.
        out.backward(grad.reshape(-1)[: out.numel()].view_as(out))
        q.grad = k.grad = v.grad = None

    return fwd, fwd_bwd


def copy_bandwidth_gbs(device: str, mib: int = 256) -> float:
    """Measured device copy bandwidth (read + write bytes per second), the basis of the traffic floor."""
    n = mib * 2**20 // 4
    x = torch.empty(n, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    ms = measure_ms(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() * 4 / (ms / 1e3) / 1e9


def traffic_floor_ms(case: Case, seq_len: int, elem: int, bandwidth_gbs: float) -> tuple[float, float]:
    """Least time to move the op's tensors once: q, k, v in and out out (forward); plus dO in and dq, dk, dv out
    with q, k, v, out read again (forward+backward: 12 tensor passes). k, v, dk and dv have the key/value heads."""
    per_head = case.batch * seq_len * case.head_dim * elem
    q_like, kv_like = case.heads * per_head, case.heads_kv * per_head
    forward = 2 * q_like + 2 * kv_like
    return forward / bandwidth_gbs / 1e6, (forward + 4 * q_like + 4 * kv_like) / bandwidth_gbs / 1e6


def run_case(case: Case, impls: dict[str, Maker], device: str, dtype: torch.dtype, repeats: int,
             bandwidth: float | None = None) -> list[dict]:
    layout = case.layout(device)
    probe = torch.empty(case.batch, case.heads, layout.seq_len, case.head_dim, device=device, dtype=dtype)
    floors = traffic_floor_ms(case, layout.seq_len, probe.element_size(), bandwidth) if bandwidth else (None, None)
    rows = []
    for impl, maker in impls.items():
        if case.sweep and impl.startswith("flex"):
            continue  # one compile per length: the sweep is about the scaling of the kernels
        forward, reason, extra = maker(case, layout, probe)
        entry = {"case": case.name, "impl": impl, "batch": case.batch, "heads": case.heads, "kv_heads": case.heads_kv,
                 "head_dim": case.head_dim, "beats": case.beats, "seq_len": layout.seq_len,
                 "density": float(layout.materialize(case.causal).float().mean()), "fwd_ms": None, "fwd_bwd_ms": None,
                 "fwd_graph_ms": None, "fwd_bwd_graph_ms": None, "floor_fwd_ms": floors[0],
                 "floor_fwd_bwd_ms": floors[1], "note": reason, **extra}
        base = impl.split("[")[0]
        if base in NOT_THE_SAME_OP and case.packed_len is None:  # on packed documents varlen is the same op
            entry["same_op"] = False
            entry["note"] = entry["note"] or NOT_THE_SAME_OP[base]
        if forward is not None:
            fwd, fwd_bwd = step_functions(forward, case, device, dtype, layout.seq_len)
            graph_notes = []
            try:
                entry["fwd_ms"] = measure_ms(fwd, device, repeats)
                if device == "cuda":
                    entry["fwd_graph_ms"], why = graph_ms(fwd, repeats)
                    graph_notes.append(why)
                no_bwd = backward_unsupported(impl, device)
                if no_bwd:
                    entry["note"] = no_bwd
                else:
                    entry["fwd_bwd_ms"] = measure_ms(fwd_bwd, device, repeats)
                    if device == "cuda":
                        entry["fwd_bwd_graph_ms"], why = graph_ms(fwd_bwd, repeats)
                        graph_notes.append(why)
            except Exception as exc:  # noqa: BLE001 - reported in the table; the other rows still run
                entry["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                if device == "cuda":
                    torch.cuda.empty_cache()
            reasons = sorted({why for why in graph_notes if why})
            if reasons:
                entry["note"] = "; ".join(([entry["note"]] if entry["note"] else []) + reasons)
        rows.append(entry)
        print(f"  {case.name:34s} {impl:18s} fwd {_fmt(entry['fwd_ms'])} fwd+bwd {_fmt(entry['fwd_bwd_ms'])}"
              f"{'  (' + entry['note'] + ')' if entry['note'] else ''}", flush=True)
    _keep_best_smaller_flex(rows)
    dense = next((r for r in rows if r["impl"] == "dense_sdpa"), None)
    for r in rows:
        for key in ("fwd_ms", "fwd_bwd_ms"):
            base = dense[key] if dense else None
            r[key.replace("_ms", "_x_dense")] = base / r[key] if base and r[key] else None
    return rows


def _keep_best_smaller_flex(rows: list[dict]) -> None:
    """Of the FlexAttention runs with BLOCK_SIZE below 128, keep the fastest as ``flex[<128]``."""
    smaller = [r for r in rows if r["impl"] in {f"flex[{s}]" for s in FLEX_SMALLER}]
    if not smaller:
        return
    key = "fwd_bwd_ms" if any(r["fwd_bwd_ms"] for r in smaller) else "fwd_ms"
    timed = [r for r in smaller if r[key] is not None]
    best = min(timed, key=lambda r: r[key]) if timed else smaller[0]
    for r in smaller:
        rows.remove(r)
    best["impl"] = "flex[<128]"
    rows.append(best)


# ------------------------------------------------------------------------------------- GPU detail tables
def profile_table(case: Case, impls: dict[str, Maker], names: list[str], dtype: torch.dtype) -> str:
    """Per-kernel CUDA times of one forward+backward of each named implementation (which SDPA kernel ran shows
    in the kernel names)."""
    from torch.profiler import ProfilerActivity, profile
    layout = case.layout("cuda")
    probe = torch.empty(case.batch, case.heads, layout.seq_len, case.head_dim, device="cuda", dtype=dtype)
    parts = []
    for name in names:
        if name not in impls:
            continue
        forward, reason, _ = impls[name](case, layout, probe)
        if forward is None:
            parts.append(f"### {name}\n\n{reason}\n")
            continue
        _, fwd_bwd = step_functions(forward, case, "cuda", dtype, layout.seq_len)
        fwd_bwd()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        table_text = "(the profiler reported no sortable device times)"
        for sort in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
            try:
                table_text = averages.table(sort_by=sort, row_limit=12, max_name_column_width=70)
                break
            except (KeyError, AttributeError, ValueError):
                continue
        parts.append(f"### {name}: {case.name}, 3 x forward+backward\n\n```\n{table_text}\n```\n")
    return "\n".join(parts)


def triton_configs() -> dict:
    """The configs the Triton autotuner chose in this process, per kernel and key (empty when pinned)."""
    try:
        from clear_kernels.triton_kernels import backward, forward
    except ImportError:
        return {}
    found = {}
    for name, fn in (("fwd", forward._fwd), ("bwd", backward._bwd)):
        for key, config in getattr(fn, "cache", {}).items():
            found[f"{name} {key}"] = str(config)
    return found


# --------------------------------------------------------------------------------------------- reporting
def _fmt(ms: float | None) -> str:
    return f"{ms:9.3f} ms" if ms is not None else "        --  "


def _num(x: float | None, spec: str) -> str:
    return format(x, spec) if x is not None else "--"


def table(rows: list[dict]) -> str:
    """The Markdown table of a run; the GPU-only columns (graph, floor) appear when the rows have them."""
    graph = any(r.get("fwd_bwd_graph_ms") for r in rows)
    floor = any(r.get("floor_fwd_bwd_ms") for r in rows)
    head = ["case", "impl", "L", "fwd ms", "x dense", "fwd+bwd ms", "x dense"]
    if graph:
        head += ["fwd graph ms", "fwd+bwd graph ms"]
    if floor:
        head += ["fwd+bwd floor ms", "x floor"]
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["case"], r["impl"], str(r["seq_len"]), _num(r["fwd_ms"], ".3f"),
                 _num(r.get("fwd_x_dense"), ".1f") + ("x" if r.get("fwd_x_dense") else ""),
                 _num(r["fwd_bwd_ms"], ".3f"),
                 _num(r.get("fwd_bwd_x_dense"), ".1f") + ("x" if r.get("fwd_bwd_x_dense") else "")]
        if graph:
            cells += [_num(r.get("fwd_graph_ms"), ".3f"), _num(r.get("fwd_bwd_graph_ms"), ".3f")]
        if floor:
            ratio = (r["fwd_bwd_ms"] / r["floor_fwd_bwd_ms"]
                     if r.get("fwd_bwd_ms") and r.get("floor_fwd_bwd_ms") else None)
            cells += [_num(r.get("floor_fwd_bwd_ms"), ".3f"), _num(ratio, ".1f")]
        note = r.get("note") or ""
        if r.get("mask_ms") is not None:
            note = (note + "; " if note else "") + f"block mask {r['mask_ms']:.1f} ms (BLOCK_SIZE {r['block_size']})"
        cells.append(note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(device: str) -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"cpu": model, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "git_commit": commit, "git_dirty": dirty, "device": device,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, impl in enumerate(sorted({r["impl"] for r in rows})):
        for key, style in (("fwd_ms", "--"), ("fwd_bwd_ms", "-")):
            pts = sorted((r["beats"], r[key]) for r in rows if r["impl"] == impl and r[key] is not None)
            if pts:  # one colour per implementation: dashed forward, solid forward+backward
                ax.plot(*zip(*pts), style, marker="o", color=f"C{n}",
                        label=f"{impl} {'fwd' if key == 'fwd_ms' else 'fwd+bwd'}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    beats = sorted({r["beats"] for r in rows})  # label the measured lengths, not powers of ten
    ax.set_xticks(beats, [str(b) for b in beats])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("beats per record (L = 12 + 12 x beats)")
    ax.set_ylabel("median time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_name(info: dict) -> str:
    """The processor a run was timed on: the CPU model, or the GPU for a CUDA run."""
    return info["cpu"] if info.get("device", "cpu") == "cpu" else info.get("gpu")


def markdown_report(payload: dict) -> str:
    """The tables of a run, headed by the machine and versions it ran on (bench/results/<stem>.md)."""
    info = payload["machine"]
    timing = ("triton.testing.do_bench median" if info.get("device") == "cuda"
              else f"median of {payload['repeats']} repeats")
    head = (f"{machine_name(info)}, {info['threads']} threads, torch {info['torch']}, triton {info['triton']}, "
            f"{payload['dtype']}, {timing}, commit {info['git_commit'][:10]}"
            f"{' (dirty)' if info.get('git_dirty') else ''}")
    if payload.get("copy_bandwidth_gbs"):
        head += f"; measured copy bandwidth {payload['copy_bandwidth_gbs']:.0f} GB/s (the floor's basis)"
    parts = [head, "", table(payload["results"] + payload.get("sweep", []))]
    if payload.get("triton_configs"):
        parts += ["", "## Triton configs chosen by the autotuner", ""]
        parts += [f"* `{key}`: {value}" for key, value in sorted(payload["triton_configs"].items())]
    if payload.get("profile"):
        parts += ["", "## Kernels (torch.profiler)", "", payload["profile"]]
    return "\n".join(parts) + "\n"


def summary_table(payload: dict) -> str:
    """The README's table of a run: one line per case, the op against each baseline (best FlexAttention block)."""
    rows = payload["results"]
    cases = list(dict.fromkeys(r["case"] for r in rows))

    def pick(case: str, prefix: str, key: str) -> float | None:
        times = [r[key] for r in rows if r["case"] == case and r["impl"].startswith(prefix) and r.get(key)]
        return min(times) if times else None

    ops = sorted({r["impl"] for r in rows if r["impl"].startswith("segment[")})
    head = ["case", "L", "op fwd ms", "dense fwd ms", "FlexAttention fwd ms", "op fwd+bwd ms", "dense fwd+bwd ms",
            "reshape fwd+bwd ms", "fwd+bwd vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for case in cases:
        seq_len = next(r["seq_len"] for r in rows if r["case"] == case)
        for op in ops:
            op_fb, dense_fb = pick(case, op, "fwd_bwd_ms"), pick(case, "dense_sdpa", "fwd_bwd_ms")
            ratio = f"{dense_fb / op_fb:.1f}x" if op_fb and dense_fb else "--"
            label = case if len(ops) == 1 else f"{case}, {op}"
            lines.append("| " + " | ".join([
                label, str(seq_len), _num(pick(case, op, "fwd_ms"), ".1f"),
                _num(pick(case, "dense_sdpa", "fwd_ms"), ".1f"),
                _num(pick(case, "flex", "fwd_ms"), ".1f"), _num(op_fb, ".1f"), _num(dense_fb, ".1f"),
                _num(pick(case, "reshape", "fwd_bwd_ms"), ".1f"), ratio]) + " |")
    info = payload["machine"]
    timing = "do_bench median" if info.get("device") == "cuda" else f"median of {payload['repeats']} repeats"
    load = info.get("load_average")
    return (f"{machine_name(info)}, {info['threads']} threads, torch {info['torch']}, {payload['dtype']}, {timing}, "
            f"{info.get('date', '')[:10]}, commit {info['git_commit'][:10]}"
            + (f", load average {load[0]:.1f} at the start" if load else "") + "\n\n" + "\n".join(lines))


def write_readme_block(json_path: Path, readme: Path) -> None:
    """Fill the README block named after the results file (``attention:<stem>``) with its summary table."""
    from clear_hug.report import replace_block

    json_path = Path(json_path)
    replace_block(readme, f"attention:{json_path.stem}", summary_table(json.loads(json_path.read_text())),
                  f"python bench/bench_attention.py --render {json_path.as_posix()} --readme {Path(readme).name}")


def render(json_path: Path) -> Path:
    """Rewrite the Markdown of a results file from its JSON (tables are never typed in)."""
    payload = json.loads(Path(json_path).read_text())
    md = Path(json_path).with_suffix(".md")
    md.write_text(markdown_report(payload))
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backends", nargs="+", default=None, help="segment_attention backends (default: cpu "
                        "on CPU, triton and cuda on GPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="small batches, 3 repeats, short sweep")
    parser.add_argument("--tiny", action="store_true", help="seconds-long shapes (the GPU check's dry run)")
    parser.add_argument("--must-show", action="store_true", help="only the shapes the issue's aims name, no sweep")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (its compile is slow)")
    parser.add_argument("--profile", action="store_true", help="GPU: per-kernel profiler table of the first case")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    parser.add_argument("--out", default=None, help="JSON/MD/PNG name stem")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the results go (default bench/results)")
    parser.add_argument("--render", default=None, help="only rewrite the .md of this results JSON")
    parser.add_argument("--readme", default=None, metavar="README",
                        help="with --render: also fill that file's block for this results file from the JSON")
    args = parser.parse_args(argv)
    if args.render:
        print(f"wrote {render(Path(args.render))}")
        if args.readme:
            write_readme_block(Path(args.render), Path(args.readme))
            print(f"filled the attention:{Path(args.render).stem} block of {args.readme}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_attention: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2

    device, dtype = args.device, getattr(torch, args.dtype)
    backends = args.backends or (["cpu"] if device == "cpu" else ["triton", "cuda"])
    repeats = args.repeats or (3 if args.quick or args.tiny else 9)
    impls = implementations(device, backends, flex=not args.no_flex,
                            flex_smaller=FLEX_SMALLER_MUST_SHOW if args.must_show else FLEX_SMALLER)
    info = machine_info(device)
    print(f"# {machine_name(info)} | {info['threads']} threads | torch {info['torch']} | triton {info['triton']} | "
          f"{args.dtype} | commit {info['git_commit'][:10]}{' (dirty)' if info['git_dirty'] else ''}", flush=True)
    bandwidth = copy_bandwidth_gbs(device, 16 if args.tiny else 256)

    keep = lambda case: ((args.only is None or args.only in case.name)  # noqa: E731
                         and (not args.must_show or case.must_show))
    all_cases = list(filter(keep, cases(device, args.quick, args.tiny)))
    default_stem = f"attention_{device}_{args.dtype}{'_quick' if args.quick else ''}{'_tiny' if args.tiny else ''}"
    stem = args.out or default_stem
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    sweep_rows: list[dict] = []
    payload = {"machine": info, "dtype": args.dtype, "repeats": repeats, "quick": args.quick,
               "copy_bandwidth_gbs": bandwidth, "results": rows, "sweep": sweep_rows, "complete": False}

    def save() -> None:
        # After every case: a run cut short by a timeout still leaves what it measured.
        payload["triton_configs"] = triton_configs()
        (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown_report(payload))

    for case in (c for c in all_cases if not c.sweep):
        rows += run_case(case, impls, device, dtype, repeats, bandwidth)
        save()
    if not (args.no_sweep or args.must_show):
        for case in (c for c in all_cases if c.sweep):
            sweep_rows += run_case(case, impls, device, dtype, repeats, bandwidth)
            save()
    if args.profile and device == "cuda" and all_cases:
        payload["profile"] = profile_table(all_cases[0], impls, [f"segment[{b}]" for b in backends] + ["dense_sdpa"],
                                           dtype)
    payload["complete"] = True
    save()
    print()
    print(table(rows + sweep_rows))
    if sweep_rows:
        plot(sweep_rows, out_dir / f"{stem}.png",
             f"B={sweep_rows[0]['batch']}, H=8, D=96, {args.dtype}, {info['threads']} threads, {machine_name(info)}")
    print(f"\nwrote {out_dir / stem}.json, .md" + (" and .png" if sweep_rows else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
