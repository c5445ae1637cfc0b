"""A short side-by-side run of segment_attention against dense masked SDPA at the CLEAR encoder shape.

    python bench/quick_compare.py [--batch 64] [--repeats 5]

Prints median forward and forward+backward times and the speed-up over dense attention on the materialised
mask. The full benchmark (every baseline, shapes, plots) is bench/bench_attention.py.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import clear_kernels
from clear_kernels import SegmentLayout, segment_attention


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy initialisation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=96)
    parser.add_argument("--beats", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    layout = SegmentLayout.conduction(torch.ones(args.batch, 12, args.beats, dtype=torch.bool))
    shape = (args.batch, args.heads, layout.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    mask = layout.materialize()[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backend = clear_kernels.dispatch.select("auto", q).name

    def op():
        return segment_attention(q, k, v, layout)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def fwd_bwd(fn):
        def run():
            fn().sum().backward()
        return run

    rows = []
    for name, fn in ((f"segment_attention ({backend})", op), ("dense SDPA + bool mask", dense)):
        with torch.no_grad():
            fwd = median_ms(fn, args.repeats)
        rows.append((name, fwd, median_ms(fwd_bwd(fn), args.repeats)))

    with torch.no_grad():
        err = float((op() - dense()).abs().max())
    print(f"CLEAR encoder shape B={args.batch} H={args.heads} L={layout.seq_len} D={args.head_dim}, float32, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}; needed share of L x L pairs: {float(layout.density()[0]):.1%}")
    print(f"{'implementation':<34}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd x':>8}{'fwd+bwd x':>11}")
    dense_fwd, dense_all = rows[-1][1], rows[-1][2]
    for name, fwd, both in rows:
        print(f"{name:<34}{fwd:>10.2f}{both:>12.2f}{dense_fwd / fwd:>8.2f}{dense_all / both:>11.2f}")
    print(f"max |segment_attention - dense| = {err:.2e}")


if __name__ == "__main__":
    main()
