"""End-to-end speed on long records: one CLEAR training step (forward, backward, AdamW) against record length.

For each preset and each record length (beats per lead), a batch sized by a token budget (``--max-tokens``
padded heartbeat tokens; a record longer than the budget runs alone) is trained with ``attn_impl`` "sparse"
(clear_kernels.segment_attention, whichever backend "auto" picks, recorded), "dense" (SDPA on the materialised
conduction mask) and "full" (SDPA, no mask: the paper's dense ablation). The encoder sees 12 summary tokens plus
the 20% visible tokens; the decoder every token (L = 12 + 12 x beats). Each configuration runs in a fresh
process, so its peak memory (max RSS on CPU, max allocated on CUDA) is its own. Dense and full are skipped where
their L x L attention would not fit under ``--dense-max-gb``. Median of ``--repeats`` timed steps after
``--warmup``. Timings are measurements, never assertions.

Each step is timed twice: wall clock, and the CPU time of the process (all its threads). On a shared machine the
wall clock of a 1-thread run also counts the time other processes held the core, which moved from one
configuration to the next by 2x (load 3 to 6 on 2 cores); CPU time does not, so compare configurations (dense /
sparse, ms per beat across lengths) on the CPU columns there. On CUDA only the wall clock means anything.

    python bench/bench_train_step.py                        # the sweep, JSON + table + plot in bench/results/
    python bench/bench_train_step.py --readme               # also rewrite the README table from the JSON
    python bench/bench_train_step.py --readme-only          # only rewrite the README table from the JSON
    python bench/bench_train_step.py --amp --readme         # the same under bf16 autocast (its own JSON and table)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: clear_hug is imported inside the functions that use it
    from multiprocessing.queues import Queue

    from clear_hug.config import CLEARConfig

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"
BLOCK = "train_step_table"
BLOCK_AMP = "train_step_amp_table"  # the same sweep under bf16 autocast
IMPLS = ("sparse", "dense", "full")


def batch_size_for(beats: int, max_tokens: int) -> int:
    return max(1, max_tokens // (12 * beats))


def dense_gb(preset_cfg: CLEARConfig, batch: int, beats: int) -> float:
    """Memory of the decoder's dense attention at its longest (probabilities, their gradient and the mask):
    what decides whether "dense" / "full" can run at all."""
    length = 12 + 12 * beats
    return batch * length * length * (3 * 4 * preset_cfg.dec_heads + 1) / 2 ** 30


def results_name(device_type: str, amp: bool) -> str:
    """The results' file stem: ``train_step_<device>``, with ``_amp`` for a bf16 autocast run."""
    return f"train_step_{device_type}{'_amp' if amp else ''}"


def cpu_model() -> str | None:
    """The CPU's model name (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def _run_one(preset: str, impl: str, beats: int, batch: int, device: str, warmup: int, repeats: int,
             threads: int, amp: bool, queue: Queue) -> None:
    """Child process: time one configuration and report its peak memory."""
    import resource

    import torch

    from clear_hug.config import get_config
    from clear_hug.masking import random_mask
    from clear_hug.model import CLEAR, count_parameters
    from clear_hug.train.common import make_optimizer, setup_cpu_process

    setup_cpu_process(threads)  # as the training commands do: threads, and freed memory kept for the next step
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, 12, beats, 96, generator=g)
    valid = torch.ones(batch, 12, beats, dtype=torch.bool)
    time_ids = (torch.arange(beats) * 4 // 5).expand(batch, 12, beats).contiguous()  # ~75 bpm
    mask = random_mask(valid, 0.8, g)
    inputs = [t.to(dev) for t in (tokens, valid, time_ids, mask)]
    torch.manual_seed(0)
    model = CLEAR(get_config(preset, attn_impl=impl)).to(dev)
    opt = make_optimizer(model.parameters(), 5e-4, 0.05, (0.9, 0.98))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # GiB (ru_maxrss is in KiB)
    times, cpu_times = [], []
    for i in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(*inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    med, cpu_med = statistics.median(times), statistics.median(cpu_times)
    queue.put({"median_s": med, "times_s": times, "tokens_per_s": batch * 12 * beats / med,
               "ms_per_beat": 1e3 * med / (batch * beats), "cpu_median_s": cpu_med, "cpu_times_s": cpu_times,
               "cpu_ms_per_beat": 1e3 * cpu_med / (batch * beats), "load_1min": _load(),
               "peak_gb": peak, "rss_before_gb": base_rss,
               "params": count_parameters(model), "loss": float(loss.detach())})


def run_config(*args: str | int | bool, timeout_s: float) -> dict:
    ctx = mp.get_context("spawn")  # a fresh process: clean peak memory, no forked OpenMP state
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_one, args=(*args, queue))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"skipped": f"ran past the {timeout_s:.0f} s limit"}
    if proc.exitcode != 0:
        return {"skipped": f"failed (exit code {proc.exitcode}; out of memory?)"}
    return queue.get(timeout=10)


def format_table(data: dict) -> str:
    # CPU-time columns only for results that have them (older JSON files have wall clock only).
    cpu = any("cpu_median_s" in row.get(impl, {}) for row in data["results"] for impl in IMPLS)
    lines = ["| preset | beats | batch | sparse ms | dense ms | full ms | dense / sparse | sparse tokens/s | "
             "sparse ms per beat | " + ("CPU ms sparse / dense / full | dense / sparse (CPU) | "
                                        "sparse CPU ms per beat | " if cpu else "") + "peak GB sparse / dense |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if cpu else "") + "---|"]

    def ms(r: dict, key: str = "median_s") -> str:
        return f"{r[key] * 1e3:.0f}" if key in r else ("skipped" if key == "median_s" else "n/a")

    def ratio(d: dict, s: dict, key: str) -> str:
        return f"{d[key] / s[key]:.2f}x" if key in d and key in s else "n/a"

    for row in data["results"]:
        s, d, f = row["sparse"], row.get("dense", {}), row.get("full", {})
        peak_d = f"{d['peak_gb']:.1f}" if "peak_gb" in d else "n/a"
        cpu_cells = (f"{ms(s, 'cpu_median_s')} / {ms(d, 'cpu_median_s')} / {ms(f, 'cpu_median_s')} | "
                     f"{ratio(d, s, 'cpu_median_s')} | {s.get('cpu_ms_per_beat', float('nan')):.2f} | ") if cpu else ""
        lines.append(f"| {row['preset']} | {row['beats']} | {row['batch']} | {ms(s)} | {ms(d)} | {ms(f)} | "
                     f"{ratio(d, s, 'median_s')} | {s.get('tokens_per_s', float('nan')):,.0f} | "
                     f"{s.get('ms_per_beat', float('nan')):.2f} | {cpu_cells}{s.get('peak_gb', float('nan')):.1f} / "
                     f"{peak_d} |")
    return "\n".join(lines)


def conditions(data: dict) -> str:
    load = data.get("cpu_load_1min")
    model = f"{data['cpu_model']}, " if data.get("cpu_model") else ""
    precision = "bf16 autocast" if data.get("amp") else "float32"
    return (f"{data['device']} ({model}{data['machine']}), {precision}, {data['threads']} threads, torch "
            f"{data['torch']}, sparse backend "
            f"`{data['sparse_backend']}`, token budget {data['max_tokens']} per batch, median of {data['repeats']} "
            f"steps after {data['warmup']} warm-up"
            + (f", 1-minute load average {load[0]:.1f} to {load[1]:.1f} during the run" if load else ""))


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for preset, style in (("small", "-"), ("base", "--")):
        rows = [r for r in data["results"] if r["preset"] == preset]
        for impl, color in zip(IMPLS, ("tab:blue", "tab:red", "tab:gray")):
            pts = [(r["beats"], r[impl]) for r in rows if "median_s" in r.get(impl, {})]
            if not pts:
                continue
            axes[0].plot([b for b, _ in pts], [x["median_s"] for _, x in pts], style, color=color, marker="o",
                         label=f"{preset} {impl}")
            axes[1].plot([b for b, _ in pts], [x["ms_per_beat"] for _, x in pts], style, color=color, marker="o",
                         label=f"{preset} {impl}")
    for ax, ylabel in zip(axes, ("step time (s)", "ms per beat (step time / beats in the batch)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("beats per record")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("CLEAR training step against record length (batch from a token budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_readme(data: dict) -> None:
    """Rewrite the README's table of this run's precision (float32, or bf16 autocast) from ``data``."""
    from clear_hug.report import replace_block

    amp = bool(data.get("amp"))
    command = "python bench/bench_train_step.py --readme-only" + (" --amp" if amp else "")
    try:
        replace_block(README, BLOCK_AMP if amp else BLOCK,
                      f"From `bench/results/{results_name(data['device_type'], amp)}.json`: "
                      f"{conditions(data)}:\n\n{format_table(data)}", command)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["small", "base"])
    p.add_argument("--beats", type=int, nargs="+", default=[15, 60, 150, 600, 1800])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--max-tokens", type=int, default=12 * 600, help="padded heartbeat tokens per batch")
    p.add_argument("--dense-max-gb", type=float, default=6.0, help="skip dense/full above this attention memory")
    p.add_argument("--timeout-s", type=float, default=900, help="per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0: up to 2, fewer when other processes keep cores busy (OpenMP threads "
                        "spin-wait, so 2 threads on a busy 2-core machine run several times slower than 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (on CPUs with AMX, bf16 matrix units)")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/train_step_<device>[_amp].json)")
    p.add_argument("--readme", action="store_true", help="rewrite the README table from the new JSON")
    p.add_argument("--readme-only", action="store_true",
                   help="rewrite the README table (of --amp's precision) from the existing JSON")
    args = p.parse_args()
    device_type = torch.device(args.device).type
    if not args.threads:
        from clear_hug.train.common import idle_threads

        args.threads = idle_threads(2)
    out = Path(args.out or RESULTS / f"{results_name(device_type, args.amp)}.json")
    if args.readme_only:
        write_readme(json.loads(out.read_text()))
        print(f"README table rewritten from {out}")
        return
    from clear_hug.config import get_config
    from clear_kernels import dispatch

    probe = torch.empty(1, 1, 1, 96, device=args.device)
    backend = dispatch.select("auto", probe).name
    results, loads = [], []
    for preset in args.presets:
        cfg = get_config(preset)
        for beats in args.beats:
            batch = batch_size_for(beats, args.max_tokens)
            row = {"preset": preset, "beats": beats, "batch": batch,
                   "dense_attention_gb": dense_gb(cfg, batch, beats)}
            for impl in args.impls:
                if impl != "sparse" and row["dense_attention_gb"] > args.dense_max_gb:
                    row[impl] = {"skipped": f"needs ~{row['dense_attention_gb']:.0f} GB for L x L attention "
                                            f"(limit {args.dense_max_gb:g})"}
                else:
                    row[impl] = run_config(preset, impl, beats, batch, args.device, args.warmup, args.repeats,
                                           args.threads, args.amp, timeout_s=args.timeout_s)
                r = row[impl]
                msg = (f"{r['median_s'] * 1e3:9.1f} ms, {r['tokens_per_s']:9,.0f} tok/s, peak {r['peak_gb']:.2f} GB"
                       if "median_s" in r else r["skipped"])
                print(f"{preset:>5} {beats:>5} beats x{batch:<3} {impl:>6}: {msg}", flush=True)
            try:
                loads.append(os.getloadavg()[0])
            except OSError:
                pass
            results.append(row)
    data = {"sparse_backend": backend, "device": str(args.device), "device_type": device_type,
            "max_tokens": args.max_tokens, "amp": args.amp, "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor(), "cpu_model": cpu_model(),
            "warmup": args.warmup,
            "repeats": args.repeats, "cpu_load_1min": [min(loads), max(loads)] if loads else None,
            "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(f"{conditions(data)}\n\n{format_table(data)}\n")
    plot(data, out.with_suffix(".png"))
    print(format_table(data))
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    if args.readme:
        write_readme(data)
        print("README table rewritten")


if __name__ == "__main__":
    main()
