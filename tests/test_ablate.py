"""``clear-hug ablate`` on tiny settings: every encoder x head x seed run, the summary, the plot, the README block."""

import json

import numpy as np
import pytest

from clear_hug.ablate import ENCODERS, HEADS, README_BLOCK
from clear_hug.checkpoint import load_encoder
from clear_hug.cli import main


def test_ablate_smoke_and_readme_block(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--out", str(out), "--n-records", "60", "--preset", "tiny", "--epochs", "1",
                 "--head-epochs", "2", "--seeds", "0", "1", "--threads", "1", "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert len(result["runs"]) == len(ENCODERS) * len(HEADS) * 2
    for enc in ENCODERS:
        for head in HEADS:
            s = result["summary"][f"{enc}/{head}"]
            vals = [r["auroc"] for r in result["runs"] if (r["encoder"], r["head"]) == (enc, head)]
            assert s["auroc"]["values"] == vals and s["auroc"]["mean"] == pytest.approx(np.mean(vals))
            assert 0.0 <= s["auprc"]["mean"] <= 1.0
    # The two pretrained encoders really differ in attention (the ablation is not one run twice).
    assert [load_encoder(out / f"pretrain_{a}_s0" / "last.pt").cfg.attn_impl for a in ("sparse", "full")] == [
        "sparse", "full"]
    assert (out / "ablation.png").stat().st_size > 10_000
    assert "| CLEAR, full attention | HUG |" in capsys.readouterr().out
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n<!-- {README_BLOCK}:begin -->\nold\n<!-- {README_BLOCK}:end -->\nafter\n")
    assert main(["ablate", "--readme-from", str(out / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and result["table"] in text and text.startswith("before") and "after" in text
