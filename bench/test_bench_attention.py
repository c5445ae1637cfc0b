"""The cases of bench_attention.py under pytest-benchmark, so runs can be stored and compared:

    pytest bench --benchmark-only                          # quick shapes (the --quick batch sizes)
    CLEAR_BENCH_FULL=1 pytest bench --benchmark-only --benchmark-autosave   # the full shapes of the issue

Lives in bench/, outside the test suite (``pytest tests``); every test here uses the ``benchmark`` fixture, so
``--benchmark-only`` runs all of them and ``--benchmark-skip`` none.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import bench_attention as ba
import pytest
import torch

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

FULL = os.environ.get("CLEAR_BENCH_FULL", "") == "1"
DEVICE = os.environ.get("CLEAR_BENCH_DEVICE", "cpu")
BACKENDS = os.environ.get("CLEAR_BENCH_BACKENDS", "cpu" if DEVICE == "cpu" else "triton,cuda").split(",")
CASES = {case.name: case for case in ba.cases(DEVICE, quick=not FULL) if not case.sweep}
IMPLS = ba.implementations(DEVICE, BACKENDS)

if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("CLEAR_BENCH_DEVICE=cuda but no CUDA device", allow_module_level=True)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_attention(benchmark: BenchmarkFixture, case_name: str, impl: str, mode: str) -> None:
    case = CASES[case_name]
    layout = case.layout(DEVICE)
    probe = torch.empty(case.batch, case.heads, layout.seq_len, case.head_dim, device=DEVICE)
    forward, reason, _ = IMPLS[impl](case, layout, probe)
    if forward is None:
        pytest.skip(reason)
    if mode == "fwd_bwd" and ba.backward_unsupported(impl, DEVICE):
        pytest.skip(ba.backward_unsupported(impl, DEVICE))
    fwd, fwd_bwd = ba.step_functions(forward, case, DEVICE, torch.float32, layout.seq_len)
    step = fwd if mode == "fwd" else fwd_bwd

    def timed():
        step()
        ba._sync(DEVICE)

    benchmark.extra_info.update(seq_len=layout.seq_len, batch=case.batch, heads=case.heads, head_dim=case.head_dim)
    benchmark.pedantic(timed, rounds=3 if not FULL else 7, warmup_rounds=1)
