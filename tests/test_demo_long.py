"""`clear-hug demo --long` end to end at a toy size: it runs, writes its table, plots and JSON, and checks CPSC."""

from __future__ import annotations

import json

import numpy as np

from clear_hug.cli import main


def test_demo_long_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--long", "--out", str(out), "--n-records", "24", "--min-minutes", "0.5", "--max-minutes",
               "1", "--preset", "tiny", "--epochs", "1", "--head-epochs", "2", "--threads", "1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "beat AUROC AF" in printed and "0 dropped" in printed
    result = json.loads((out / "results.json").read_text())
    assert set(result["results"]) == {"clear", "random"}
    for r in result["results"].values():
        assert len(r["beat_auroc_per_class"]) == 2 and 0.05 <= r["threshold_af"] <= 0.95
        ep = r["episodes"]
        assert ep["detected"] <= ep["true_episodes"] and ep["correct"] <= ep["pred_episodes"]
    assert (out / "beat_predictions.png").stat().st_size > 10_000 and (out / "pretrain_loss.png").exists()
    cpsc = result["cpsc2021"]
    if "records" in cpsc:  # the real excerpts are present: every one checked against its annotations
        assert len(cpsc["records"]) + len(cpsc["skipped"]) == 18 and cpsc["af_beats"] > 1000
        assert np.isfinite(cpsc["beat_auroc"])
    else:
        assert "no CPSC 2021 records" in cpsc["skipped"]

    # The README block is generated from results.json.
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- demo_long_table:begin -->\nold\n<!-- demo_long_table:end -->\nb\n")
    assert main(["demo", "--long", "--readme-from", str(out / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and result["table"] in text and text.endswith("b\n")
