"""End-to-end speed: one CLEAR training step (forward, backward, AdamW) with attn_impl "sparse" against "dense".

At the paper's token counts: 10 s strips, 15 beats x 12 leads = 180 heartbeat tokens + 12 summary tokens; the
encoder sees the 20% visible tokens (L = 12 + 36 = 48), the decoder all of them (L = 192). The "sparse" model calls
clear_kernels.segment_attention (whichever backend "auto" picks here, recorded in the JSON); "dense" runs
scaled_dot_product_attention on the materialised mask. Median of --repeats timed steps after --warmup steps.

    python bench/bench_train_step.py --presets base small --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from clear_hug.config import get_config
from clear_hug.masking import random_mask
from clear_hug.model import CLEAR, count_parameters
from clear_hug.train.common import make_optimizer
from clear_kernels import dispatch


def make_batch(batch: int, beats: int, device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, 12, beats, 96, generator=g)
    valid = torch.ones(batch, 12, beats, dtype=torch.bool)
    time_ids = (torch.arange(beats) * 10 // beats).expand(batch, 12, beats).contiguous()
    mask = random_mask(valid, 0.8, g)
    return [t.to(device) for t in (tokens, valid, time_ids, mask)]


def time_step(preset: str, impl: str, batch, device, warmup: int, repeats: int, amp: bool) -> dict:
    torch.manual_seed(0)
    model = CLEAR(get_config(preset, attn_impl=impl)).to(device)
    opt = make_optimizer(model.parameters(), 5e-4, 0.05, (0.9, 0.98))
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(*batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "params": count_parameters(model),
            "loss": float(loss.detach())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["base", "small"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--beats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train_step_<device>.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = make_batch(args.batch_size, args.beats, device)
    probe = torch.empty(1, 1, 1, 96, device=device)
    backend = dispatch.select("auto", probe).name
    results = []
    for preset in args.presets:
        row = {"preset": preset}
        for impl in ("sparse", "dense"):
            row[impl] = time_step(preset, impl, batch, device, args.warmup, args.repeats, args.amp)
        row["sparse_over_dense"] = row["sparse"]["median_s"] / row["dense"]["median_s"]
        results.append(row)
        print(f"{preset:>6}: sparse ({backend}) {row['sparse']['median_s'] * 1e3:8.1f} ms | dense (SDPA + mask) "
              f"{row['dense']['median_s'] * 1e3:8.1f} ms | sparse/dense {row['sparse_over_dense']:.2f}", flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"train_step_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        load = list(__import__("os").getloadavg())
    except OSError:
        load = None
    out.write_text(json.dumps({
        "sparse_backend": backend, "device": str(device), "batch_size": args.batch_size, "beats": args.beats,
        "encoder_len": 12 + round(0.2 * 12 * args.beats), "decoder_len": 12 + 12 * args.beats, "amp": args.amp,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "cpu_load_1min_at_end": load, "results": results,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
