"""The benchmark harness's bookkeeping (bench/bench_attention.py): the Markdown writer renders the committed
results, the traffic floor and the FlexAttention block-size choice. Timings themselves are never asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_attention as ba  # noqa: E402


def test_markdown_renders_the_committed_cpu_results(tmp_path):
    source = ROOT / "bench" / "results" / "attention_cpu_float32.json"
    copy = tmp_path / source.name
    copy.write_text(source.read_text())
    md = ba.render(copy).read_text()
    payload = json.loads(source.read_text())
    assert md.startswith(payload["machine"]["cpu"])
    rows = payload["results"] + payload["sweep"]
    table_lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(table_lines) == len(rows)
    for line, row in zip(table_lines, rows):
        assert line.startswith(f"| {row['case']} | {row['impl']} | {row['seq_len']} |")
        if row["fwd_bwd_ms"] is not None:
            assert f"{row['fwd_bwd_ms']:.3f}" in line


def test_traffic_floor_counts_twelve_tensor_passes():
    case = ba.Case("encoder", batch=2, heads=3, head_dim=4, beats=1)
    fwd, fwd_bwd = ba.traffic_floor_ms(case, seq_len=5, elem=2, bandwidth_gbs=1.0)
    tensor_bytes = 2 * 3 * 5 * 4 * 2
    assert fwd == 4 * tensor_bytes / 1e6 and fwd_bwd == 12 * tensor_bytes / 1e6


def test_traffic_floor_counts_key_value_heads_apart():
    case = ba.Case("gqa", batch=2, heads=4, head_dim=4, beats=1, kv_heads=1)
    fwd, fwd_bwd = ba.traffic_floor_ms(case, seq_len=5, elem=2, bandwidth_gbs=1.0)
    per_head = 2 * 5 * 4 * 2
    # forward: q, out (4 heads) and k, v (1 head); backward adds q, out, dO, dq and k, v, dk, dv.
    assert fwd == (2 * 4 + 2 * 1) * per_head / 1e6 and fwd_bwd == (6 * 4 + 6 * 1) * per_head / 1e6


def test_grouped_query_case_runs_the_same_op_in_every_implementation():
    """The packed GQA case: the op and dense SDPA (enable_gqa) get k/v with the key/value heads and agree; the
    rows record them."""
    import torch

    case = ba.Case("packed causal GQA", 1, 4, 16, 0, packed_len=96, causal=True, kv_heads=2)
    layout = case.layout("cpu")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, layout.seq_len, 16, generator=gen)
    k, v = (torch.randn(1, 2, layout.seq_len, 16, generator=gen) for _ in range(2))
    outs = {}
    for name, maker in (("segment", ba.make_segment("reference")), ("dense", ba.make_dense)):
        forward, reason, _ = maker(case, layout, q)
        assert reason is None, reason
        outs[name] = forward(q, k, v)
    rows = layout.materialize(True).any(-1)[:, None, :, None]
    torch.testing.assert_close(outs["segment"] * rows, outs["dense"] * rows, atol=1e-5, rtol=1e-5)
    timed = ba.run_case(case, {"segment[reference]": ba.make_segment("reference"), "dense_sdpa": ba.make_dense},
                        "cpu", torch.float32, repeats=1)
    assert all(r["kv_heads"] == 2 and r["fwd_bwd_ms"] for r in timed), timed


def test_the_fastest_smaller_flex_block_is_kept():
    rows = [{"impl": "flex[128]", "fwd_ms": 3.0, "fwd_bwd_ms": 9.0},
            {"impl": "flex[64]", "fwd_ms": 2.0, "fwd_bwd_ms": 8.0},
            {"impl": "flex[32]", "fwd_ms": 1.0, "fwd_bwd_ms": 7.0, "block_size": 32}]
    ba._keep_best_smaller_flex(rows)
    assert [r["impl"] for r in rows] == ["flex[128]", "flex[<128]"]
    assert rows[1]["block_size"] == 32


def test_readme_attention_tables_are_generated_from_the_committed_results(tmp_path, monkeypatch):
    # Every README table of an attention benchmark is the summary of a committed results file, never typed in:
    # regenerating each block into a copy of the README must leave it unchanged.
    readme = (ROOT / "README.md").read_text()
    stems = [line.split("attention:", 1)[1].split(":begin")[0] for line in readme.splitlines()
             if line.startswith("<!-- attention:") and line.endswith(":begin -->")]
    assert stems, "the README has no generated attention table"
    copy = tmp_path / "README.md"
    copy.write_text(readme)
    monkeypatch.chdir(ROOT)  # the block's note names the results file relative to the repository
    for stem in stems:
        ba.write_readme_block(Path("bench") / "results" / f"{stem}.json", copy)
    assert copy.read_text() == readme
    for stem in stems:
        payload = json.loads((ROOT / "bench" / "results" / f"{stem}.json").read_text())
        segment_rows = [r for r in payload["results"] if r["impl"].startswith("segment[") and r["fwd_bwd_ms"]]
        assert any(f"{r['fwd_bwd_ms']:.1f}" in readme for r in segment_rows)
