"""Segment attention against the dense baselines, side by side in one process (SPEC §2.4).

    python bench/bench_attention.py                 # CPU, float32, every case, results into bench/results/
    python bench/bench_attention.py --quick         # a smoke run: small batches, few repeats, short sweep
    python bench/bench_attention.py --device cuda --backends triton cuda   # the GPU backends reuse this file

Besides CLEAR's shapes, the "packed causal documents" cases time the commonest use of block-diagonal attention:
one row of L = 2k, 8k or 16k tokens packed with documents of 20 to 2000 tokens, attending causally inside each
document (``is_causal=True``; SDPA and FlexAttention get the same document-causal mask).

For each case it times the forward and the forward+backward (median of repeats after warm-up) of:
  * ``segment[<backend>]``  clear_kernels.segment_attention with that backend;
  * ``dense_sdpa``          F.scaled_dot_product_attention with the materialised [B, 1, L, L] bool mask;
  * ``flex``                FlexAttention compiled with torch.compile, block mask from the layout's ids
                            (forward only on CPU, where FlexAttention has no backward);
  * ``reshape``             heartbeats folded into the batch: beat j's leads as one [leads, D] sequence, plain SDPA;
                            it ignores the summary tokens, so it is a lower bound on work, not the same op;
  * ``torch_varlen`` and ``flash_varlen`` (packed documents on CUDA only): torch.nn.attention.varlen.varlen_attn
                            and flash_attn_varlen_func on the documents packed as [T, H, D] (the repacking from
                            [B, H, L, D] is timed with them).
It prints a table with the ratio of each time to dense SDPA's, and writes JSON (machine, versions, commit) and a
PNG of time against beats per record into bench/results/.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clear_kernels import PADDING, SUMMARY, SegmentLayout, segment_attention  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LEADS = 12


# ------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    batch: int
    heads: int
    head_dim: int
    beats: int
    visible: Optional[int] = None  # pretraining encoder: this many random visible tokens per record, compact
    sweep: bool = False            # part of the beats-per-record sweep (for the plot)
    packed_len: Optional[int] = None  # packed documents instead of heartbeats: tokens per row (beats is then 0)
    causal: bool = False              # is_causal=True inside each segment (every implementation)

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


def main_cases(quick: bool) -> list[Case]:
    b = 8 if quick else 64
    return [
        Case("encoder (CLEAR)", b, 8, 96, 15),
        Case("decoder (CLEAR)", b, 16, 32, 15),
        Case("pretrain encoder (12+35 tokens)", b, 8, 96, 15, visible=35),
        Case("long record (150 beats)", 2 if quick else 8, 8, 96, 150),
    ] + packed_cases(quick)


def packed_cases(quick: bool) -> list[Case]:
    """Packed causal documents: one row, 4 heads of 64 (dense SDPA's L x L scores still fit at L = 8k)."""
    lengths = (2048,) if quick else (2048, 8192, 16384)
    return [Case(f"packed causal documents L={n // 1024}k", 1, 4, 64, 0, packed_len=n, causal=True)
            for n in lengths]


def sweep_cases(quick: bool) -> list[Case]:
    beats = (15, 60, 150) if quick else (15, 30, 60, 150, 300, 600)
    return [Case(f"sweep {n} beats", 2 if quick else 8, 8, 96, n, sweep=True) for n in beats]


# ---------------------------------------------------------------------------------------- implementations
# Each maker returns (forward, reason) where forward(q, k, v) -> out, or (None, why it cannot run).
Maker = Callable[[Case, SegmentLayout, torch.Tensor], tuple[Optional[Callable], Optional[str]]]

DENSE_MAX_BYTES = 1 << 30  # dense SDPA's [B, H, L, L] scores beyond this are not worth the memory


def make_segment(backend: str) -> Maker:
    def make(case, layout, q):
        return (lambda q, k, v: segment_attention(q, k, v, layout, is_causal=case.causal, backend=backend)), None
    return make


def make_dense(case, layout, q):
    b, h, length, _ = q.shape
    if b * h * length * length * 4 > DENSE_MAX_BYTES:
        return None, f"skipped: L x L scores need {b * h * length * length * 4 / 2**30:.0f} GiB"
    mask = layout.materialize(case.causal)
    mask = (mask | torch.diag_embed(~mask.any(-1)))[:, None]  # padding rows see themselves: no NaN rows
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), None


def make_reshape(case, layout, q):
    if case.packed_len is not None:
        return None, "n/a: documents of unequal length"
    if case.visible is not None:
        return None, "n/a: beats of unequal length (masked tokens)"
    b, h, _, d = q.shape

    def fold(x):  # [B, H, 12 + beats * 12, D] -> [B * beats, H, 12, D], summary tokens dropped
        return x[:, :, LEADS:].reshape(b, h, case.beats, LEADS, d).permute(0, 2, 1, 3, 4).reshape(-1, h, LEADS, d)

    return (lambda q, k, v: F.scaled_dot_product_attention(fold(q), fold(k), fold(v))), None


_FLEX_COMPILED = None


def make_flex(case, layout, q):
    global _FLEX_COMPILED
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return None, f"unavailable: {exc}"
    seg, grp = layout.segment.to(torch.int64), layout.group.to(torch.int64)

    def mask_mod(b, h, q_idx, kv_idx):
        sq, sk = seg[b, q_idx], seg[b, kv_idx]
        same_segment = (sq >= 0) & (sq == sk)
        if case.causal:  # FlexAttention's document-causal mask
            same_segment = same_segment & (kv_idx <= q_idx)
        summary_pair = (grp[b, q_idx] == grp[b, kv_idx]) & ((sq == SUMMARY) | (sk == SUMMARY))
        return (sq != PADDING) & (sk != PADDING) & (same_segment | summary_pair)

    try:
        block_mask = create_block_mask(mask_mod, layout.batch_size, None, layout.seq_len, layout.seq_len,
                                       device=str(q.device))
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        fn = lambda q, k, v: _FLEX_COMPILED(q, k, v, block_mask=block_mask)  # noqa: E731
        with torch.no_grad():
            fn(q, q, q)  # compile now, so a failure is reported here and not timed
    except Exception as exc:  # noqa: BLE001 - any failure is a result to report, not a crash
        return None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return fn, None


def _varlen_inputs(layout: SegmentLayout):
    """``cu_seqlens`` over the rows of a packed layout laid end to end, the longest document, and a function that
    packs ``[B, H, L, D]`` into ``[B * L, H, D]``."""
    seg = layout.segment.reshape(-1)
    pos = torch.arange(layout.seq_len, device=seg.device).repeat(layout.batch_size)
    starts = torch.nonzero((seg >= 0) & (layout.seg_start.reshape(-1) == pos)).flatten()
    cu = torch.cat([starts, starts.new_tensor([seg.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return cu, max_len, lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _make_varlen(kind: str) -> Maker:
    def make(case, layout, q):
        if q.device.type != "cuda":
            return None, "n/a: CUDA only"
        try:
            if kind == "torch":
                from torch.nn.attention.varlen import varlen_attn as attn
            else:
                from flash_attn import flash_attn_varlen_func as attn
        except ImportError as exc:
            return None, f"unavailable: {exc}"
        cu, max_len, pack = _varlen_inputs(layout)
        shape = q.shape

        def unpack(out):
            return out.view(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2)

        if kind == "torch":
            window = (-1, 0) if case.causal else (-1, -1)
            fn = lambda q, k, v: unpack(attn(pack(q), pack(k), pack(v), cu, cu, max_len, max_len,  # noqa: E731
                                             window_size=window))
        else:
            fn = lambda q, k, v: unpack(attn(pack(q), pack(k), pack(v), cu, cu, max_len, max_len,  # noqa: E731
                                             causal=case.causal))
        try:
            with torch.no_grad():
                fn(q, q, q)
        except Exception as exc:  # noqa: BLE001 - any failure is a result to report, not a crash
            return None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return fn, None
    return make


# Baselines that only apply to packed documents (rows of the other cases are not printed for them).
PACKED_ONLY = ("torch_varlen", "flash_varlen")


def implementations(device: str, backends: list[str]) -> dict[str, Maker]:
    impls: dict[str, Maker] = {f"segment[{name}]": make_segment(name) for name in backends}
    impls.update({"dense_sdpa": make_dense, "flex": make_flex, "reshape": make_reshape,
                  "torch_varlen": _make_varlen("torch"), "flash_varlen": _make_varlen("flash")})
    return impls


def backward_unsupported(impl: str, device: str) -> Optional[str]:
    if impl == "flex" and device == "cpu":
        return "n/a: FlexAttention has no CPU backward"
    return None


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def step_functions(forward: Callable, case: Case, device: str, dtype: torch.dtype, seq_len: int):
    """(forward-only step, forward+backward step) on fresh random inputs of the case's shape."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.heads, seq_len, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():  # detached too: FlexAttention on CPU refuses inputs that require grad
            return forward(q.detach(), k.detach(), v.detach())

    def fwd_bwd():
        out = forward(q, k, v)
        # The reshape trick returns the folded shape; any gradient of matching size times the same work.
        out.backward(grad.reshape(-1)[: out.numel()].view_as(out))
        q.grad = k.grad = v.grad = None

    return fwd, fwd_bwd


def run_case(case: Case, impls: dict[str, Maker], device: str, dtype: torch.dtype, repeats: int) -> list[dict]:
    layout = case.layout(device)
    probe = torch.empty(case.batch, case.heads, layout.seq_len, case.head_dim, device=device, dtype=dtype)
    rows = []
    for impl, maker in impls.items():
        if case.sweep and impl == "flex":
            continue  # one compile per length: the sweep is about the scaling of the kernels
        if impl in PACKED_ONLY and case.packed_len is None:
            continue
        forward, reason = maker(case, layout, probe)
        entry = {"case": case.name, "impl": impl, "batch": case.batch, "heads": case.heads,
                 "head_dim": case.head_dim, "beats": case.beats, "seq_len": layout.seq_len,
                 "density": float(layout.density().mean()), "fwd_ms": None, "fwd_bwd_ms": None, "note": reason}
        if forward is not None:
            fwd, fwd_bwd = step_functions(forward, case, device, dtype, layout.seq_len)
            try:
                entry["fwd_ms"] = median_ms(fwd, device, repeats)
                no_bwd = backward_unsupported(impl, device)
                if no_bwd:
                    entry["note"] = no_bwd
                else:
                    entry["fwd_bwd_ms"] = median_ms(fwd_bwd, device, repeats)
            except Exception as exc:  # noqa: BLE001 - reported in the table; the other rows still run
                entry["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(entry)
        print(f"  {case.name:34s} {impl:18s} fwd {_fmt(entry['fwd_ms'])} fwd+bwd {_fmt(entry['fwd_bwd_ms'])}"
              f"{'  (' + entry['note'] + ')' if entry['note'] else ''}", flush=True)
    dense = next((r for r in rows if r["impl"] == "dense_sdpa"), None)
    for r in rows:
        for key in ("fwd_ms", "fwd_bwd_ms"):
            base = dense[key] if dense else None
            r[key.replace("_ms", "_x_dense")] = base / r[key] if base and r[key] else None
    return rows


# --------------------------------------------------------------------------------------------- reporting
def _fmt(ms: Optional[float]) -> str:
    return f"{ms:9.2f} ms" if ms is not None else "        --  "


def _ratio(x: Optional[float]) -> str:
    return f"{x:6.1f}x" if x is not None else "    --"


def table(rows: list[dict]) -> str:
    head = (f"| {'case':34s} | {'impl':16s} | {'L':>5s} | {'fwd ms':>9s} | {'x dense':>7s} | {'fwd+bwd ms':>10s} "
            f"| {'x dense':>7s} | note")
    lines = [head, "|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|---"]
    for r in rows:
        lines.append(
            f"| {r['case']:34s} | {r['impl']:16s} | {r['seq_len']:5d} | {_fmt(r['fwd_ms'])[:9]} | "
            f"{_ratio(r['fwd_x_dense']):>7s} | {_fmt(r['fwd_bwd_ms'])[:10]:>10s} | {_ratio(r['fwd_bwd_x_dense']):>7s} | "
            f"{r['note'] or ''}")
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
        info["gpu"] = torch.cuda.get_device_name()
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
    """The table of a run, headed by the machine and versions it ran on (bench/results/<stem>.md)."""
    info = payload["machine"]
    head = (f"{machine_name(info)}, {info['threads']} threads, torch {info['torch']}, triton {info['triton']}, "
            f"{payload['dtype']}, median of {payload['repeats']} repeats, commit {info['git_commit'][:10]}"
            f"{' (dirty)' if info.get('git_dirty') else ''}")
    return head + "\n\n" + table(payload["results"] + payload["sweep"]) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backends", nargs="+", default=None, help="segment_attention backends (default: cpu "
                        "on CPU, triton and cuda on GPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="small batches, 3 repeats, short sweep")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    parser.add_argument("--out", default=None, help="JSON/PNG name stem in bench/results/")
    args = parser.parse_args(argv)

    device, dtype = args.device, getattr(torch, args.dtype)
    backends = args.backends or (["cpu"] if device == "cpu" else ["triton", "cuda"])
    repeats = args.repeats or (3 if args.quick else 9)
    impls = implementations(device, backends)
    info = machine_info(device)
    print(f"# {info['cpu']} | {info['threads']} threads | torch {info['torch']} | triton {info['triton']} | "
          f"{args.dtype} | commit {info['git_commit'][:10]}{' (dirty)' if info['git_dirty'] else ''}", flush=True)

    rows: list[dict] = []
    keep = lambda case: args.only is None or args.only in case.name  # noqa: E731
    for case in filter(keep, main_cases(args.quick)):
        rows += run_case(case, impls, device, dtype, repeats)
    sweep_rows: list[dict] = []
    if not args.no_sweep:
        for case in filter(keep, sweep_cases(args.quick)):
            sweep_rows += run_case(case, impls, device, dtype, repeats)

    print()
    print(table(rows + sweep_rows))
    stem = args.out or f"attention_{device}_{args.dtype}{'_quick' if args.quick else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "dtype": args.dtype, "repeats": repeats, "quick": args.quick,
               "results": rows, "sweep": sweep_rows}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown_report(payload))
    if sweep_rows:
        plot(sweep_rows, RESULTS / f"{stem}.png",
             f"B=8, H=8, D=96, {args.dtype}, {info['threads']} threads, {machine_name(info)}")
    print(f"\nwrote {RESULTS / stem}.json, .md" + (" and .png" if sweep_rows else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
