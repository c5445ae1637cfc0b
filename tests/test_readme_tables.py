"""The README's result tables of the ECG jobs are generated from committed results files, never typed in:
regenerating each block into a copy of the README must leave it unchanged."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from clear_hug import ablate, demo, demo_long
from clear_hug.report import rewrite_from_results

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("job, results, command", [
    (demo, "docs/demo/results.json", "clear-hug demo"),
    (demo_long, "docs/demo_long/results.json", "clear-hug demo --long"),
    (ablate, "docs/ablation/results.json", "clear-hug ablate"),
])
def test_readme_block_is_the_committed_results(job, results, command, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    assert f"<!-- {job.README_BLOCK}:begin -->" in readme
    copy = tmp_path / "README.md"
    copy.write_text(readme)
    monkeypatch.chdir(ROOT)  # the block's note names the results file relative to the repository
    rewrite_from_results(argparse.Namespace(readme=str(copy), readme_from=results), job.README_BLOCK,
                         job.readme_text, command)
    assert copy.read_text() == readme
    json.loads((ROOT / results).read_text(), parse_constant=lambda c: pytest.fail(f"{results} holds {c}"))
