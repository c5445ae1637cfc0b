"""The CPU op's output cache: reused memory gives the same results, holds no stale rows, and obeys its limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from attention_cases import check_parity, conduction_layout

from clear_kernels import native, segment_attention

pytestmark = pytest.mark.skipif(not native.has_kernel("CPU"), reason=f"no CPU kernel: {native.EXTENSION_ERROR}")

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _big_case(seed: int = 0):
    """Inputs whose outputs are over the 1 MiB caching threshold (2 x 4 x 433 x 96 floats = 1.3 MB)."""
    layout = conduction_layout(seed, batch=2, beats=35)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, layout.seq_len, 96, generator=gen) for _ in range(3))
    assert q.numel() * 4 >= MIB
    return layout, q, k, v


def test_freed_outputs_are_reused_and_released():
    native.cpu_output_cache(release=True)
    layout, q, k, v = _big_case()
    out = segment_attention(q, k, v, layout, backend="cpu")
    first = out.data_ptr()
    assert native.cpu_output_cache()["live_bytes"] >= out.numel() * 4
    del out
    stats = native.cpu_output_cache()
    assert stats["free_blocks"] >= 1 and stats["free_bytes"] >= q.numel() * 4
    again = segment_attention(q, k, v, layout, backend="cpu")
    assert again.data_ptr() == first  # the same block came back
    del again
    assert native.cpu_output_cache(release=True) == {"free_bytes": 0, "free_blocks": 0,
                                                      "live_bytes": native.cpu_output_cache()["live_bytes"]}


def test_parity_on_cached_memory():
    # Large enough that out, dq, dk and dv all come from the cache; twice, so the second run writes into blocks
    # that the first one left behind (NaN-poisoned by the tests' environment before each kernel writes them).
    layout = conduction_layout(3, batch=2, beats=35)
    for seed in (0, 1):
        check_parity("cpu", layout, heads=4, head_dim=96, seed=seed)


def test_cached_outputs_behave_like_tensors():
    layout, q, k, v = _big_case(1)
    out = segment_attention(q, k, v, layout, backend="cpu")
    kept = out.as_strided((out.numel(),), (1,)).clone()  # the values in memory order (out is token-major)
    out.resize_(out.numel() * 2)  # storage from the cache stays resizable, the values stay
    assert torch.equal(out[: kept.numel()], kept)
    out.mul_(2)
    assert torch.equal(out[: kept.numel()], 2 * kept)


def _run(script: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", **env}
    full_env.pop("CLEAR_KERNELS_POISON_OUTPUTS", None)  # the point here is what reused memory holds
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_reused_blocks_leak_no_stale_rows():
    # Without poisoning, a row the kernel failed to write would keep what the block held before: fill one call's
    # outputs with 7, free them, run on other inputs (every row kind: summary, heartbeat, padding) and compare
    # with the reference.
    script = """
        import torch
        from clear_kernels import native, segment_attention
        from clear_kernels.reference import masked_attention
        from attention_cases import conduction_layout
        layout = conduction_layout(5, batch=2, beats=35)
        gen = torch.Generator().manual_seed(0)
        shape = (2, 4, layout.seq_len, 96)
        first = [torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3)]
        out = segment_attention(*first, layout, backend="cpu")
        stale = [out.detach()] + list(torch.autograd.grad(out, first, torch.randn(shape, generator=gen)))
        for t in stale:
            t.fill_(7.0)  # what an unwritten row of the next call would show
        del first, out, stale, t
        assert native.cpu_output_cache()["free_blocks"] >= 4, native.cpu_output_cache()
        q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).float().requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=gen)
        out = segment_attention(q, k, v, layout, backend="cpu")
        got = [out.detach()] + list(torch.autograd.grad(out, (q, k, v), grad))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = masked_attention(q64, k64, v64, layout.materialize(), 96 ** -0.5)[0]
        want = [ref.detach()] + list(torch.autograd.grad(ref, (q64, k64, v64), grad.double()))
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            err = (g.double() - w).abs().max().item()
            assert err < 1e-4, (name, err)
        print("ok")
    """
    result = _run(script)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_limit_zero_turns_the_cache_off_and_small_limits_evict():
    script = """
        import torch
        from clear_kernels import native, segment_attention
        from attention_cases import conduction_layout
        layout = conduction_layout(0, batch=2, beats=35)
        q, k, v = (torch.randn(2, 4, layout.seq_len, 96) for _ in range(3))
        outs = [segment_attention(q, k, v, layout, backend="cpu") for _ in range(3)]
        del outs
        print(native.cpu_output_cache()["free_bytes"])
    """
    off = _run(script, CLEAR_KERNELS_CPU_CACHE_MB="0")
    assert off.returncode == 0, off.stderr[-3000:]
    assert int(off.stdout.split()[-1]) == 0
    small = _run(script, CLEAR_KERNELS_CPU_CACHE_MB="4")  # three 2 MiB blocks freed, two fit
    assert small.returncode == 0, small.stderr[-3000:]
    assert int(small.stdout.split()[-1]) == 4 * (1 << 20)


USE_THE_CACHE = """
    import torch
    from clear_kernels import segment_attention
    from attention_cases import conduction_layout
    layout = conduction_layout(0, batch=2, beats=35)
    q = torch.randn(2, 4, layout.seq_len, 96)
    segment_attention(q, q, q, layout, backend="cpu")
"""


def test_bad_limit_is_a_clear_error():
    result = _run(USE_THE_CACHE, CLEAR_KERNELS_CPU_CACHE_MB="lots")
    assert result.returncode != 0
    assert "CLEAR_KERNELS_CPU_CACHE_MB must be a whole number of MiB" in result.stderr


@pytest.mark.parametrize("mib", [str(1 << 44), "99999999999999999999999"])
def test_limit_beyond_size_t_is_a_clear_error(mib):
    """2^44 MiB is 2^64 bytes: it used to wrap to 0 and silently turn the cache off."""
    result = _run(USE_THE_CACHE, CLEAR_KERNELS_CPU_CACHE_MB=mib)
    assert result.returncode != 0
    assert f"CLEAR_KERNELS_CPU_CACHE_MB={mib} is too large" in result.stderr, result.stderr[-3000:]
