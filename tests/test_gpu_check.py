"""scripts/gpu_check.sh cannot rot: its dry run (the same steps and Python entry points on the CPU under the Triton
interpreter, tiny shapes, no build) runs here, and its summary is checked never to trust pytest's exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

STEPS = ["environment", "triton-smoke", "triton-tests", "triton-configs", "cuda-build", "cuda-available",
         "cuda-tests", "train-step-compile", "benchmark"]


@pytest.mark.slow
def test_dry_run_writes_a_passing_summary(tmp_path):
    pytest.importorskip("triton")
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    log = (tmp_path / "check.log").read_text() if (tmp_path / "check.log").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + log[-4000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    assert {"environment.txt", "build.log", "check.log", "summary.json", "summary.md",
            "attention_cpu_float32.json", "attention_cpu_float32.md"} <= set(files)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["result"] == "PASS"
    assert [s["step"] for s in summary["steps"]] == STEPS
    for step in summary["steps"]:
        if step["step"] in ("triton-tests", "triton-configs", "cuda-tests"):
            assert step["tests"] > 0 and step["skipped"] == 0, step
    bench = json.loads((tmp_path / "attention_cpu_float32.json").read_text())
    assert {r["impl"] for r in bench["results"]} >= {"segment[triton]", "dense_sdpa"}
    assert all(r["fwd_bwd_ms"] for r in bench["results"] if r["impl"] == "segment[triton]")


def _junit(path: Path, tests: int, failures: int = 0, skipped: int = 0) -> str:
    skip = '<skipped message="no gpu"/>'
    cases = "".join(f'<testcase classname="t" name="c{i}">{skip if i < skipped else ""}</testcase>'
                    for i in range(tests))
    path.write_text(f'<testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" errors="0" '
                    f'skipped="{skipped}">{cases}</testsuite></testsuites>')
    return str(path)


@pytest.mark.parametrize("rows, result", [
    ([("a", 0, "ok", 0)], "PASS"),
    ([("a", 0, "all_skipped", 0)], "FAIL"),      # exit 0, yet nothing was tested
    ([("a", 0, "missing", 0)], "FAIL"),          # pytest died before writing its report
    ([("a", 0, "none_ran", 0)], "FAIL"),         # nothing collected
    ([("a", 1, "failed", 0)], "FAIL"),
    ([("a", 0, "one_skip", 1)], "PASS"),         # a skip the step allows
    ([("a", 0, "ok", 0), ("b", 124, "-", 0)], "FAIL"),  # a step that timed out
])
def test_summary_never_trusts_the_exit_code(tmp_path, rows, result):
    reports = {"ok": _junit(tmp_path / "ok.xml", 3), "all_skipped": _junit(tmp_path / "s.xml", 3, skipped=3),
               "missing": str(tmp_path / "missing.xml"), "none_ran": _junit(tmp_path / "n.xml", 0),
               "failed": _junit(tmp_path / "f.xml", 3, failures=1),
               "one_skip": _junit(tmp_path / "o.xml", 3, skipped=1),
               "-": "-"}
    steps = tmp_path / "steps.tsv"
    steps.write_text("".join(f"{name}\t{rc}\t1\t{reports[junit]}\t{allowed}\n" for name, rc, junit, allowed in rows))
    status = gpu_check.summarize(steps, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["result"] == result
    assert status == (0 if result == "PASS" else 1)
