"""The Python steps of scripts/gpu_check.sh (one home: the shell script only sequences them and times them out).

    python scripts/gpu_check.py smoke [--dry-run]        Triton parity at the CLEAR encoder layout, bf16 and fp32
    python scripts/gpu_check.py train-step [--dry-run]   torch.compile(fullgraph=True) of CLEAR training steps
    python scripts/gpu_check.py native [--dry-run]       the native extension's cuda (dry run: cpu) backend loads
    python scripts/gpu_check.py summarize STEPS OUT      the pass/fail/skip summary; exit 1 unless all is well

``--dry-run`` runs the same code on the CPU under the Triton interpreter with tiny shapes (the shell script sets
TRITON_INTERPRET=1 before Python starts, as Triton reads it at import).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def smoke(dry_run: bool) -> int:
    """Forward and backward of the Triton backend against the float64 reference at the CLEAR encoder layout
    (12 leads x 15 beats + 12 summary tokens, 8 heads of 96), in bfloat16 and float32."""
    import torch
    from attention_cases import check_parity, conduction_layout

    import clear_kernels
    from clear_kernels.triton_kernels import common

    device = "cpu" if dry_run else "cuda"
    probe = torch.empty(1, 1, 1, 96, device=device)
    reason = clear_kernels.available_backends(probe).get("triton")
    if reason is not None:
        print(f"smoke: the triton backend cannot run on {device}: {reason}")
        return 1
    pinned = {f"{kernel} {dtype}": common.launch_config(kernel, dtype) for kernel in ("_fwd", "_bwd")
              for dtype in (torch.bfloat16, torch.float32)}
    print(f"smoke: autotune={'on' if common.AUTOTUNE else 'off'}, pinned {pinned}", flush=True)
    layout = (conduction_layout(0, batch=1, leads=3, beats=2, p_valid=1.0) if dry_run
              else conduction_layout(0, batch=8, leads=12, beats=15, p_valid=1.0))
    heads = 1 if dry_run else 8
    for dtype in (torch.bfloat16, torch.float32):
        start = time.perf_counter()
        check_parity("triton", layout, heads=heads, head_dim=96, dtype=dtype, device=device)
        print(f"smoke: {dtype} forward and backward match the float64 reference "
              f"(B={layout.batch_size}, H={heads}, L={layout.seq_len}, D=96; {time.perf_counter() - start:.1f} s "
              "with compiling)", flush=True)
    return 0


def train_step(dry_run: bool) -> int:
    """Training steps of CLEAR's encoder under torch.compile(fullgraph=True): bf16 autocast, forward, backward,
    AdamW, with the op as the attention (the triton backend on a GPU), checked against the same steps run eagerly.

    The compiled region is the block stack on a given layout. ``CLEAR.forward`` as a whole cannot be one graph:
    it builds its compact layouts from the mask, and their length is data (``int(...max())``), which fullgraph
    refuses by design. Layouts are built once per batch anyway, outside the layers."""
    import copy

    import torch

    from clear_hug.config import get_config
    from clear_hug.masking import random_mask
    from clear_hug.model import CLEAR, _Attend
    from clear_kernels import SegmentLayout, dispatch

    device = torch.device("cpu" if dry_run else "cuda")
    preset = "tiny" if dry_run else "base"
    batch, beats = (2, 3) if dry_run else (64, 15)
    torch.manual_seed(0)
    model = CLEAR(get_config(preset, attn_impl="sparse", dropout=0.0)).to(device)
    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(batch, 12, beats, dtype=torch.bool)
    visible = (valid & ~random_mask(valid, 0.8, gen)).to(device)
    layout = SegmentLayout.conduction(visible, compact=True)  # eager: its length is data
    x = torch.randn(batch, layout.seq_len, model.cfg.enc_dim, generator=gen).to(device)
    backend = dispatch.select("auto", torch.empty(1, 1, 1, 32, device=device)).name

    def loss_fn(blocks: torch.nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        attend = _Attend(layout, "sparse")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            for block in blocks:
                x = block(x, attend)
            return x.float().square().mean()

    runs = {}
    # Two of base's twelve blocks: the shapes of the real model (width 768, 8 heads of 96) at a sixth of the
    # compile time (dynamo unrolls the stack).
    for mode in ("eager", "compiled"):
        blocks = copy.deepcopy(model.encoder[:2])
        opt = torch.optim.AdamW(blocks.parameters(), lr=5e-4)
        fn = loss_fn
        if mode == "compiled":
            torch._dynamo.reset()
            fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if dry_run else "inductor")
        losses = []
        for i in range(3):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = fn(blocks, x)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            losses.append(float(loss.detach()))
            print(f"train-step: {mode} {preset} encoder (L={layout.seq_len}, B={batch}) step {i}: loss "
                  f"{losses[-1]:.5f} ({time.perf_counter() - start:.2f} s; attention backend {backend!r})",
                  flush=True)
        runs[mode] = losses
    eager, compiled = runs["eager"], runs["compiled"]
    if not all(abs(a - b) <= 2e-2 * max(1.0, abs(a)) for a, b in zip(eager, compiled)):
        print(f"train-step: compiled losses {compiled} differ from eager {eager}")
        return 1
    if not dry_run and backend != "triton":
        print(f"train-step: the attention ran on {backend!r}, not 'triton'")
        return 1
    return 0


def native_available(dry_run: bool) -> int:
    """Whether the native extension's GPU backend (``cuda``; ``cpu`` in a dry run) loaded and can run."""
    import torch

    import clear_kernels

    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False")
        return 1
    reason = clear_kernels.available_backends(torch.empty(1, 1, 1, 64, device=device)).get(device)
    print(f"the {device!r} backend: {'available' if reason is None else f'NOT available: {reason}'}")
    return 0 if reason is None else 1


def _junit_counts(path: Path) -> dict:
    """Counts from a pytest JUnit XML file (every <testsuite> in it)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    skipped = []
    for case in root.iter("testcase"):
        node = case.find("skipped")
        if node is not None:
            skipped.append(f"{case.get('classname')}::{case.get('name')}: {node.get('message', '')[:200]}")
    counts["skipped_tests"] = skipped
    return counts


def summarize(steps_file: Path, out_dir: Path) -> int:
    """Read the step table the shell script wrote (name, exit code, seconds, JUnit file or '-', allowed skips) and
    write summary.json and summary.md. A step passes when its exit code is 0 and, for a pytest step, its JUnit
    file exists, shows at least one test, no failure or error, and no more skips than allowed: pytest's exit code
    alone is never trusted (it is 0 when everything skips)."""
    steps = []
    for line in steps_file.read_text().splitlines():
        if not line.strip():
            continue
        name, rc, seconds, junit, allowed = (line.split("\t") + ["-", "0"])[:5]
        step = {"step": name, "exit_code": int(rc), "seconds": int(seconds)}
        ok = int(rc) == 0
        if junit != "-":
            path = Path(junit)
            if not path.exists():
                step["problem"] = "no JUnit report (pytest did not run to the end)"
                ok = False
            else:
                counts = _junit_counts(path)
                step.update(counts)
                if counts["tests"] == 0:
                    step["problem"] = "no tests ran"
                    ok = False
                elif counts["failures"] or counts["errors"]:
                    ok = False
                elif counts["skipped"] > int(allowed):
                    step["problem"] = f"{counts['skipped']} skipped, at most {allowed} expected"
                    ok = False
        if int(rc) == 124 or int(rc) == 137:
            step["problem"] = "timed out"
        step["status"] = "pass" if ok else "FAIL"
        steps.append(step)
    passed = bool(steps) and all(s["status"] == "pass" for s in steps)
    total = {key: sum(s.get(key, 0) for s in steps) for key in ("tests", "passed", "failures", "errors", "skipped")}
    summary = {"result": "PASS" if passed else "FAIL", "total_seconds": sum(s["seconds"] for s in steps),
               "tests": total, "steps": steps}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# GPU check: {summary['result']} ({summary['total_seconds']} s)", "",
             f"tests: {total['passed']} passed, {total['failures']} failed, {total['errors']} errors, "
             f"{total['skipped']} skipped", "",
             "| step | status | exit | s | passed | failed | errors | skipped | problem |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['step']} | {s['status']} | {s['exit_code']} | {s['seconds']} | {s.get('passed', '')} | "
                     f"{s.get('failures', '')} | {s.get('errors', '')} | {s.get('skipped', '')} | "
                     f"{s.get('problem', '')} |")
    for s in steps:
        for skipped in s.get("skipped_tests", []):
            lines.append(f"- skipped in {s['step']}: {skipped}")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("smoke", "train-step", "native"):
        sub.add_parser(name).add_argument("--dry-run", action="store_true")
    summary = sub.add_parser("summarize")
    summary.add_argument("steps", type=Path)
    summary.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "smoke":
        return smoke(args.dry_run)
    if args.command == "train-step":
        return train_step(args.dry_run)
    if args.command == "native":
        return native_available(args.dry_run)
    return summarize(args.steps, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
