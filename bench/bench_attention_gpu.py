"""GPU benchmark of segment attention: the Triton kernels against what a user would otherwise run.

Side by side in one process, per shape: ``triton`` (this package), dense ``scaled_dot_product_attention`` with the
materialised mask, FlexAttention (compiled, block mask from the same layout), the reshape trick (heartbeats folded
into the batch; full conduction grids only) and, for pure block-diagonal layouts, FlashAttention varlen and xformers
``BlockDiagonalMask`` where those packages are installed. For each: median ms of the forward and of forward +
backward, TFLOP/s of the *needed* work (only the allowed query-key pairs), and the minimum bytes the op must move
as a share of the GPU's peak memory bandwidth. Prints a table and writes JSON.

    python bench/bench_attention_gpu.py [--dtype bfloat16] [--json bench/results/attention_gpu.json] [--quick]

Without a CUDA device it says so and exits with status 2 (nothing is measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from clear_kernels import SegmentLayout, segment_attention

# Peak DRAM bandwidth (GB/s) by device name, used when the driver does not report clock and bus width.
KNOWN_BANDWIDTH_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
                        "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300,
                        "RTX 4090": 1008, "A10": 600, "V100": 900, "T4": 320}


# ------------------------------------------------------------------------------------------------- shapes
@dataclass
class Shape:
    name: str
    batch: int
    heads: int
    head_dim: int
    make_layout: Callable[[int, str], SegmentLayout]
    # "conduction_full": every grid token present (the reshape trick applies); "block_diagonal": no summary
    # tokens, equal-length segments (FlashAttention varlen and xformers apply); "conduction": anything else.
    kind: str
    beats: int = 0
    leads: int = 12


def _conduction(beats: int, leads: int = 12, visible: Optional[int] = None):
    def make(batch: int, device: str) -> SegmentLayout:
        if visible is None:
            valid = torch.ones(batch, leads, beats, dtype=torch.bool, device=device)
            return SegmentLayout.conduction(valid)
        # A masked-autoencoder encoder: `visible` random grid tokens per record, the rest dropped.
        gen = torch.Generator().manual_seed(0)
        scores = torch.rand(batch, leads * beats, generator=gen)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(1, scores.argsort(1)[:, :visible], True)
        return SegmentLayout.conduction(keep.view(batch, leads, beats).to(device), compact=True)
    return make


def _block_diagonal(segments: int, length: int):
    def make(batch: int, device: str) -> SegmentLayout:
        return SegmentLayout.block_diagonal(torch.full((batch, segments), length, device=device))
    return make


def shapes(quick: bool) -> list[Shape]:
    out = [
        Shape("encoder B=64", 64, 8, 96, _conduction(15), "conduction_full", beats=15),
        Shape("encoder B=256", 256, 8, 96, _conduction(15), "conduction_full", beats=15),
        Shape("decoder B=64", 64, 16, 32, _conduction(15), "conduction_full", beats=15),
        Shape("pretrain encoder 12+35", 64, 8, 96, _conduction(15, visible=35), "conduction"),
        Shape("long records 150 beats", 8, 8, 96, _conduction(150), "conduction_full", beats=150),
        Shape("block diagonal 15x12 B=256", 256, 8, 96, _block_diagonal(15, 12), "block_diagonal"),
    ]
    sweep = (15, 150) if quick else (15, 30, 60, 150, 300, 600)
    out += [Shape(f"sweep {b} beats", 8, 8, 96, _conduction(b), "conduction_full", beats=b) for b in sweep]
    return out


# ------------------------------------------------------------------------------------------------ methods
def _dense_sdpa(layout: SegmentLayout):
    mask = layout.materialize()
    rows = mask.any(-1)
    safe = (mask | torch.diag_embed(~rows))[:, None]  # empty rows see themselves: finite, then zeroed

    def run(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)
        return out * rows[:, None, :, None]
    return run


def _flex(layout: SegmentLayout, heads: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg, grp = layout.segment, layout.group

    def mask_mod(b, h, q_idx, kv_idx):
        sq, sk = seg[b, q_idx], seg[b, kv_idx]
        same_group = grp[b, q_idx] == grp[b, kv_idx]
        real = (sq != -2) & (sk != -2)
        return real & (((sq >= 0) & (sq == sk)) | (same_group & ((sq == -1) | (sk == -1))))

    block_mask = create_block_mask(mask_mod, layout.batch_size, None, layout.seq_len, layout.seq_len,
                                   device=layout.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _reshape_trick(layout: SegmentLayout, shape: Shape):
    """Full conduction grid: beat segments folded into the batch (each sees its 12 tokens plus the own-lead
    summary key through a small fixed mask); summary rows folded per lead (own summary + that lead's beats)."""
    leads, beats = shape.leads, shape.beats
    own_summary = torch.eye(leads, dtype=torch.bool, device=layout.device)
    beat_mask = torch.cat([torch.ones(leads, leads, dtype=torch.bool, device=layout.device), own_summary], 1)

    def run(q, k, v):
        b, h, _, d = q.shape
        q_sum, k_sum, v_sum = (t[:, :, :leads] for t in (q, k, v))
        q_beat, k_beat, v_beat = (t[:, :, leads:].reshape(b, h, beats, leads, d) for t in (q, k, v))
        keys = torch.cat([k_beat, k_sum[:, :, None].expand(b, h, beats, leads, d)], 3)
        vals = torch.cat([v_beat, v_sum[:, :, None].expand(b, h, beats, leads, d)], 3)
        out_beat = F.scaled_dot_product_attention(q_beat, keys, vals, attn_mask=beat_mask)
        keys_s = torch.cat([k_sum[:, :, :, None], k_beat.transpose(2, 3)], 3)  # [b, h, leads, 1 + beats, d]
        vals_s = torch.cat([v_sum[:, :, :, None], v_beat.transpose(2, 3)], 3)
        out_sum = F.scaled_dot_product_attention(q_sum[:, :, :, None], keys_s, vals_s)
        return torch.cat([out_sum[:, :, :, 0], out_beat.reshape(b, h, beats * leads, d)], 2)
    return run


def _flash_varlen(layout: SegmentLayout, segments: int, seg_len: int):
    from flash_attn import flash_attn_varlen_func

    b = layout.batch_size
    cu = torch.arange(0, b * segments + 1, device=layout.device, dtype=torch.int32) * seg_len

    def run(q, k, v):
        bb, h, L, d = q.shape
        pack = lambda t: t.transpose(1, 2).reshape(bb * L, h, d)  # noqa: E731
        out = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, seg_len, seg_len)
        return out.view(bb, L, h, d).transpose(1, 2)
    return run


def _xformers(layout: SegmentLayout, segments: int, seg_len: int):
    from xformers.ops import fmha

    bias = fmha.BlockDiagonalMask.from_seqlens([seg_len] * (layout.batch_size * segments))

    def run(q, k, v):
        bb, h, L, d = q.shape
        pack = lambda t: t.transpose(1, 2).reshape(1, bb * L, h, d)  # noqa: E731
        out = fmha.memory_efficient_attention(pack(q), pack(k), pack(v), attn_bias=bias)
        return out.view(bb, L, h, d).transpose(1, 2)
    return run


def methods_for(shape: Shape, layout: SegmentLayout) -> dict[str, Callable[[], Callable]]:
    """Builders (run lazily, so a missing package or a failing setup only loses that column)."""
    found = {
        "triton": lambda: (lambda q, k, v: segment_attention(q, k, v, layout, backend="triton")),
        "sdpa_dense": lambda: _dense_sdpa(layout),
        "flex": lambda: _flex(layout, shape.heads),
    }
    if shape.kind == "conduction_full":
        found["reshape"] = lambda: _reshape_trick(layout, shape)
    if shape.kind == "block_diagonal":
        segments, seg_len = 15, 12
        found["reshape"] = lambda: (lambda q, k, v: F.scaled_dot_product_attention(
            *(t.reshape(t.shape[0], t.shape[1], segments, seg_len, t.shape[3]) for t in (q, k, v))
        ).reshape(q.shape))
        found["flash_varlen"] = lambda: _flash_varlen(layout, segments, seg_len)
        found["xformers"] = lambda: _xformers(layout, segments, seg_len)
    return found


# ----------------------------------------------------------------------------------------------- measuring
def _median_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def peak_bandwidth_gbps(override: Optional[float]) -> tuple[float, str]:
    if override:
        return override, "command line"
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "driver (double data rate x bus width)"
    for key, value in KNOWN_BANDWIDTH_GBPS.items():
        if key in props.name:
            return float(value), f"table entry '{key}'"
    return float("nan"), "unknown (pass --peak-gbps)"


def needed_work(layout: SegmentLayout, heads: int, head_dim: int, elem: int) -> dict:
    """FLOPs of the allowed pairs only, and the least bytes the op must read and write."""
    pairs = int(layout.materialize().sum()) * heads
    fwd_flops = 4.0 * pairs * head_dim  # q.k and p.v, a multiply and an add each
    rows = layout.batch_size * heads * layout.seq_len
    tensor = rows * head_dim * elem
    fwd_bytes = 4 * tensor + 4 * rows  # q, k, v in; out and lse out
    bwd_bytes = 8 * tensor + 3 * 4 * rows  # q, k, v, out, dout in; dq, dk, dv out; lse in, delta out and in
    density = pairs / (heads * layout.batch_size * layout.seq_len ** 2)
    return {"pairs": pairs, "density": density, "fwd_flops": fwd_flops, "fwd_bwd_flops": 3.5 * fwd_flops,
            "fwd_bytes": fwd_bytes, "fwd_bwd_bytes": fwd_bytes + bwd_bytes}


def bench_shape(shape: Shape, dtype: torch.dtype, args, peak_gbps: float) -> list[dict]:
    layout = shape.make_layout(shape.batch, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    dims = (shape.batch, shape.heads, layout.seq_len, shape.head_dim)
    q, k, v, dout = (torch.randn(dims, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    work = needed_work(layout, shape.heads, shape.head_dim, q.element_size())
    rows_real = (layout.segment != -2)[:, None, :, None]
    reference = None
    results = []
    for method, build in methods_for(shape, layout).items():
        row = {"shape": shape.name, "method": method, "B": shape.batch, "H": shape.heads, "D": shape.head_dim,
               "L": layout.seq_len, "dtype": str(dtype).replace("torch.", ""), **work}
        try:
            run = build()
            with torch.no_grad():
                out = run(q, k, v)
            if reference is None:
                reference = out.float() * rows_real
            row["max_abs_diff_vs_triton"] = float((out.float() * rows_real - reference).abs().max())

            def fwd_bwd():
                for t in leaves:
                    t.grad = None
                run(*leaves).backward(dout)

            with torch.no_grad():
                row["fwd_ms"] = _median_ms(lambda: run(q, k, v), args.warmup, args.reps)
            row["fwd_bwd_ms"] = _median_ms(fwd_bwd, args.warmup, args.reps)
            for part in ("fwd", "fwd_bwd"):
                seconds = row[f"{part}_ms"] / 1e3
                row[f"{part}_tflops"] = work[f"{part}_flops"] / seconds / 1e12
                row[f"{part}_bandwidth_share"] = work[f"{part}_bytes"] / seconds / 1e9 / peak_gbps
        except ImportError as exc:
            row["skipped"] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # an OOM or a compile failure loses one cell, not the run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            torch.cuda.empty_cache()
        results.append(row)
        print(_format_row(row), flush=True)
    dense = next((r for r in results if r["method"] == "sdpa_dense" and "fwd_bwd_ms" in r), None)
    for r in results:
        if dense and "fwd_bwd_ms" in r:
            r["fwd_speedup_vs_dense"] = dense["fwd_ms"] / r["fwd_ms"]
            r["fwd_bwd_speedup_vs_dense"] = dense["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return results


def _format_row(r: dict) -> str:
    head = f"{r['shape']:28s} L={r['L']:<5d} {r['method']:13s}"
    if "fwd_bwd_ms" not in r:
        return f"{head} {r.get('skipped') or r.get('error')}"
    return (f"{head} fwd {r['fwd_ms']:8.3f} ms  fwd+bwd {r['fwd_bwd_ms']:8.3f} ms  "
            f"{r['fwd_bwd_tflops']:6.2f} TFLOP/s needed  {100 * r['fwd_bwd_bandwidth_share']:5.1f}% of peak BW  "
            f"diff {r['max_abs_diff_vs_triton']:.1e}")


def table(rows: list[dict]) -> str:
    lines = ["| shape | L | method | fwd ms | fwd+bwd ms | x dense (fwd+bwd) | TFLOP/s needed | % peak BW |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "fwd_bwd_ms" not in r:
            lines.append(f"| {r['shape']} | {r['L']} | {r['method']} | {r.get('skipped') or r.get('error')} "
                         "| | | | |")
            continue
        speed = r.get("fwd_bwd_speedup_vs_dense")
        lines.append(f"| {r['shape']} | {r['L']} | {r['method']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{'' if speed is None else f'{speed:.2f}x'} | {r['fwd_bwd_tflops']:.2f} | "
                     f"{100 * r['fwd_bwd_bandwidth_share']:.1f} |")
    return "\n".join(lines)


def _environment(peak: float, peak_source: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    import triton
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "peak_bandwidth_gbps": peak, "peak_bandwidth_source": peak_source, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "python": platform.python_version(),
            "host": platform.node(), "git_commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmark of segment attention (Triton vs baselines)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", default=os.path.join("bench", "results", "attention_gpu.json"))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--peak-gbps", type=float, help="peak memory bandwidth, if the driver does not say")
    parser.add_argument("--quick", action="store_true", help="two sweep points instead of six")
    parser.add_argument("--only", help="run the shapes whose name contains this text")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention_gpu: no CUDA device is available (torch.cuda.is_available() is False), so there is "
              "nothing to measure; run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch.",
              file=sys.stderr)
        return 2
    from clear_kernels import available_backends
    reason = available_backends(torch.empty(1, 1, 1, 32, device="cuda")).get("triton")
    if reason is not None:
        print(f"bench_attention_gpu: the triton backend cannot run here: {reason}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    peak, peak_source = peak_bandwidth_gbps(args.peak_gbps)
    env = _environment(peak, peak_source)
    print(f"{env['gpu']} (sm {env['capability']}), peak bandwidth {peak:.0f} GB/s ({peak_source}); "
          f"torch {env['torch']}, triton {env['triton']}, {args.dtype}", flush=True)
    rows = []
    for shape in shapes(args.quick):
        if args.only and args.only not in shape.name:
            continue
        rows += bench_shape(shape, dtype, args, peak)
        torch.cuda.empty_cache()
    print()
    print(table(rows))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "dtype": args.dtype, "rows": rows}, f, indent=1,
                      default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
