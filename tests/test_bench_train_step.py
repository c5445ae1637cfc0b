"""The train-step benchmark's harness (not its timings): batch sizing, dense skipping, one real run, the README."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from clear_hug.config import get_config

# Imported by name from bench/ (on sys.path, which spawned children inherit), so its worker function pickles.
sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
bench = importlib.import_module("bench_train_step")


def test_batch_from_token_budget_and_dense_memory():
    assert [bench.batch_size_for(b, 7200) for b in (15, 60, 150, 600, 1800)] == [40, 10, 4, 1, 1]
    base = get_config("base")
    # Decoder L = 12 + 12 x 1800 = 21612: ~83 GB of dense attention for one record, far beyond the default limit.
    assert bench.dense_gb(base, 1, 1800) > 50 > bench.dense_gb(base, 4, 150)


def test_one_configuration_runs_in_its_own_process(tmp_path, monkeypatch):
    r = bench.run_config("tiny", "sparse", 15, 2, "cpu", 0, 1, 1, False, timeout_s=300)
    assert r["median_s"] > 0 and r["peak_gb"] > 0 and r["tokens_per_s"] > 0
    assert r["cpu_median_s"] > 0 and len(r["cpu_times_s"]) == len(r["times_s"]) == 1
    data = {"sparse_backend": "cpu", "device": "cpu", "device_type": "cpu", "max_tokens": 360, "amp": False,
            "threads": 1, "torch": "x", "machine": "x86_64", "warmup": 0, "repeats": 1, "cpu_load_1min": [1.0, 2.0],
            "results": [{"preset": "tiny", "beats": 15, "batch": 2, "sparse": r,
                         "dense": {"skipped": "needs ~9 GB"}, "full": {"skipped": "needs ~9 GB"}}]}
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- {bench.BLOCK}:begin -->\nold table\n<!-- {bench.BLOCK}:end -->\nrest\n")
    monkeypatch.setattr(bench, "README", readme)
    bench.write_readme(data)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    row = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(row) == 1 and "skipped" in row[0] and f"{r['median_s'] * 1e3:.0f}" in row[0]
    assert f"| {r['cpu_median_s'] * 1e3:.0f} / n/a / n/a |" in row[0]  # the CPU-time columns
    # A bf16 autocast run fills its own table and leaves the float32 one alone.
    readme.write_text(text + f"<!-- {bench.BLOCK_AMP}:begin -->\n<!-- {bench.BLOCK_AMP}:end -->\n")
    bench.write_readme({**data, "amp": True, "cpu_model": "Some CPU"})
    amp_text = readme.read_text()
    assert amp_text.startswith(text)
    amp_block = amp_text[len(text):]
    assert "train_step_cpu_amp.json" in amp_block and "bf16 autocast" in amp_block and "Some CPU" in amp_block
    assert "float32" in text and "bf16" not in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="block"):
        bench.write_readme(data)
    json.dumps(data)  # what the benchmark writes must be plain JSON


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16_autocast"])
def test_readme_tables_are_the_committed_results(amp, tmp_path, monkeypatch):
    """Regenerating each README table from its committed JSON changes nothing: the tables are never typed in."""
    results = bench.RESULTS / f"{bench.results_name('cpu', amp)}.json"
    readme = bench.README.read_text()
    copy = tmp_path / "README.md"
    copy.write_text(readme)
    monkeypatch.setattr(bench, "README", copy)
    bench.write_readme(json.loads(results.read_text()))
    assert copy.read_text() == readme
