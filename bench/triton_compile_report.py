"""Compile every Triton kernel for a GPU architecture without a GPU, and report registers, spills and shared
memory per kernel, dtype, head dim and tile config (the compiled-code review of the Triton backend).

Triton compiles to PTX and runs its bundled ``ptxas`` on any machine; only launching needs a device. The
interpreter (``TRITON_INTERPRET=1``) skips compilation, so this is also the check that catches what it cannot
(for example globals that are not constexpr). Run: ``python bench/triton_compile_report.py [--arch 90]``.

``--all-configs`` compiles every config the autotuner may try (the spill-free ones kept by ``tuned_configs``),
``--every-config`` every config of the list, marking which ones pruning keeps (how the budgets in
``common.SPILL_FREE`` were measured); by default the pinned config (``CLEAR_KERNELS_TRITON_AUTOTUNE=0``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

if os.environ.get("TRITON_INTERPRET") == "1":
    # Under the interpreter ``triton.jit`` returns interpreted functions, which cannot be compiled.
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from clear_kernels.triton_kernels import backward, common, forward  # noqa: E402

DATA_PTRS = {"Q", "K", "V", "Out", "GradOut", "GradQ", "GradK", "GradV"}
STAT_PTRS = {"Lse", "Delta"}
INT_ARGS = {"L", "H", "KV_GROUP", "NUM_GROUPS", "MAX_SUMMARY", "BUCKET", "sqb", "sqh", "sql", "skb", "skh", "skl",
            "svb", "svh", "svl", "sgb", "sgh", "sgl", "sob", "soh", "sol"}
CONSTEXPRS = {"D", "BLOCK_D", "F32", "CAUSAL", "SPLIT", "BLOCK_M", "BLOCK_N"}
FLOAT_ARGS = {"scale", "qk_scale"}
TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

KERNELS = {"fwd": forward._fwd, "bwd": backward._bwd}


def _signature(fn, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in DATA_PTRS:
            sig[name] = "*" + TRITON_DTYPE[dtype]
        elif name in STAT_PTRS:
            sig[name] = "*fp32"
        elif name in INT_ARGS:
            sig[name] = "i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name[0].isupper() and name not in CONSTEXPRS:
            sig[name] = "*i32"  # layout tensors
        else:
            sig[name] = "constexpr"
    return sig


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local bytes from ``cuobjdump --dump-resource-usage`` (register spills show up as a
    per-thread stack frame)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key.lower(): int(value) for key, value in found.items()}


def compile_one(name: str, dtype: str, head_dim: int, config: triton.Config, arch: int, causal: bool = False) -> dict:
    """One kernel, compiled as the launcher would launch it (the backward's walk chosen by ``split_backward``).
    The key/value group size is a runtime argument: one compiled kernel serves every grouping."""
    jitted = KERNELS[name]
    fn = jitted.fn if isinstance(jitted, triton.runtime.Autotuner) else jitted  # the JITFunction
    consts = {"D": head_dim, "BLOCK_D": common.block_d(head_dim), "F32": dtype == "float32", "CAUSAL": causal,
              **config.kwargs}
    if "SPLIT" in fn.arg_names:
        consts["SPLIT"] = common.split_backward(getattr(torch, dtype), head_dim)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "maxnreg": config.maxnreg}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, _signature(fn, dtype), consts), target=GPUTarget("cuda", arch, 32),
                              options=options)
    usage = _resource_usage(compiled.asm["cubin"])
    return {"kernel": name, "dtype": dtype, "head_dim": head_dim, "arch": arch, "causal": causal,
            "split": consts.get("SPLIT"),
            "config": {k: v for k, v in consts.items() if k.startswith("BLOCK_") and k != "BLOCK_D"},
            "kept_by_pruning": config in common.tuned_configs("_" + name, head_dim, getattr(torch, dtype)),
            "num_warps": options["num_warps"], "num_stages": options["num_stages"],
            "registers": usage.get("reg"), "stack_bytes": usage.get("stack"), "local_bytes": usage.get("local"),
            "shared_bytes": compiled.metadata.shared, "compile_s": round(time.perf_counter() - start, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capabilities as integers, comma-separated (80,90)")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--head-dims", default="32,96,256")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--causal", action="store_true", help="also compile the causal variant of each kernel")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all-configs", action="store_true", help="every autotune config the pruning keeps")
    which.add_argument("--every-config", action="store_true", help="every config of the list, kept or not")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    for arch in map(int, args.arch.split(",")):
        for name in args.kernels.split(","):
            for dtype in args.dtypes.split(","):
                for head_dim in map(int, args.head_dims.split(",")):
                    if args.every_config:
                        chosen = common.TILE_CONFIGS
                    elif args.all_configs:
                        chosen = common.tuned_configs("_" + name, head_dim, getattr(torch, dtype))
                    else:
                        chosen = [common.pinned("_" + name, getattr(torch, dtype))]
                    for config, causal in itertools.product(chosen, (False, True) if args.causal else (False,)):
                        row = compile_one(name, dtype, head_dim, config, arch, causal)
                        rows.append(row)
                        print(f"sm_{arch} {row['kernel']:4s}{' causal' if causal else ''} {dtype:9s} "
                              f"D={head_dim:<4d} {str(row['config']):32s} "
                              f"w={row['num_warps']} s={row['num_stages']} regs={row['registers']} "
                              f"stack={row['stack_bytes']}B smem={row['shared_bytes']}B "
                              f"{'kept' if row['kept_by_pruning'] else 'pruned'} ({row['compile_s']}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
