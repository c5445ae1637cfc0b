"""Every config the Triton autotuner may pick, run once against the float64 reference at CLEAR's head dim (96) in
bfloat16 and float32; and, on a GPU, the autotuner itself (its key holds a size bucket).

On a GPU each config is compiled and run (this is the step of scripts/gpu_check.sh that autotuning would otherwise
hide: a config the autotuner never picks in a test still has to be right). Without one, the same configs run
under the Triton interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the Triton backend is unavailable")

from attention_cases import check_parity, conduction_layout  # noqa: E402

import clear_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _usable():
    if DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (set by conftest)")
    reason = clear_kernels.available_backends().get("triton")
    if reason is not None:
        pytest.skip(f"the triton backend is unavailable: {reason}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel", ["_fwd", "_bwd"])
def test_every_tuned_config_at_head_dim_96(kernel, dtype):
    _usable()
    from clear_kernels.triton_kernels import backward, common, forward
    fn = {"_fwd": forward._fwd, "_bwd": backward._bwd}[kernel]
    configs = common.tuned_configs(kernel, 96, dtype)
    assert configs, "pruning must leave at least one config"
    # On a GPU the CLEAR encoder shape; under the interpreter a few beats (every program still runs once).
    layout = (conduction_layout(0, batch=2, leads=12, beats=15) if DEVICE == "cuda"
              else conduction_layout(0, batch=1, leads=3, beats=3))
    for config in configs:
        with common.forced_configs({fn: config}):
            try:
                check_parity("triton", layout, heads=2, head_dim=96, dtype=dtype, device=DEVICE, seed=1,
                             backward=kernel == "_bwd")
            except AssertionError as exc:
                raise AssertionError(f"config {config}: {exc}") from exc


@pytest.mark.gpu
def test_gpu_autotuner_keys_on_size_bucket():
    """Autotuning on: a tiny call and a real batch tune apart (different size buckets), results stay right."""
    _usable()
    from clear_kernels.triton_kernels import backward, common, forward
    if not common.AUTOTUNE:
        pytest.skip(f"{common.AUTOTUNE_ENV}=0: the kernels run pinned")
    buckets = set()
    for batch in (1, 64):
        layout = conduction_layout(batch, batch=batch, leads=12, beats=15)
        check_parity("triton", layout, heads=8, head_dim=96, dtype=torch.bfloat16, device="cuda", seed=batch)
        buckets.add(common.size_bucket(batch * 8 * layout.seq_len))
    assert len(buckets) == 2
    for fn in (forward._fwd, backward._bwd):
        tuned = {key[1] for key in fn.cache}  # the key is (D, BUCKET, dtypes...)
        assert buckets <= tuned, (fn.cache, buckets)
