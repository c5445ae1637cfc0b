"""scripts/finetune_vs_frozen.py (docs/clear_hug.md, "What it gives"): a tiny run of every arm, so the script that
produced the committed figures cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "finetune_vs_frozen.py"


def test_every_arm_runs_on_the_same_labels(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_vs_frozen", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "run"), "--n-records", "60", "--epochs", "1", "--head-epochs", "2",
                        "--seeds", "0", "--fractions", "0.5", "--threads", "1", "--preset", "tiny"]) == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    runs = result["runs"]
    assert {(r["encoder"], r["mode"]) for r in runs} == set(module.ARMS) and len(runs) == len(module.ARMS)
    # Every arm trains its head on the same labelled subset, and reports finite scores.
    assert len({r["n_train"] for r in runs}) == 1
    for r in runs:
        for metric in ("auroc", "auprc", "val_auroc"):
            assert math.isfinite(r[metric]) and 0.0 <= r[metric] <= 1.0, r
    assert set(result["summary"]) == {f"{e}/{m}/0.5" for e, m in module.ARMS}
