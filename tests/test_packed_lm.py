"""examples/packed_lm.py runs a few steps, and segment attention trains like SDPA on the materialised mask."""

import importlib.util
from pathlib import Path

import pytest

import clear_kernels

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "packed_lm.py"


@pytest.mark.skipif(clear_kernels.available_backends()["cpu"] is not None, reason="the native extension is not built")
def test_packed_lm_example_runs_and_matches_sdpa(capsys):
    spec = importlib.util.spec_from_file_location("packed_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "4", "--batch", "2", "--seq-len", "256", "--dim", "64", "--layers", "1"])
    printed = capsys.readouterr().out
    assert "largest loss difference" in printed and "ratio" in printed
    assert len(result["segment_loss"]) == 4
    # Same weights and batches: the curves agree to float32 noise (a few ulps per step, amplified by AdamW).
    assert result["max_loss_diff"] < 1e-3 * max(result["sdpa_loss"])
    # Training does something: the loss falls from its first step (byte-level start near ln 256 = 5.5).
    assert result["segment_loss"][-1] < result["segment_loss"][0]
