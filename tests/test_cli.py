"""The clear-hug command on tiny settings: prepare -> pretrain -> finetune -> evaluate (in process)."""

import argparse
import json
import shutil
from dataclasses import fields

import pytest
import torch

from clear_hug.checkpoint import load_checkpoint, load_classifier, load_pretrained_config
from clear_hug.cli import main
from clear_hug.cli_args import flag_spec
from clear_hug.heads import Classifier
from clear_hug.model import CLEAR


def _strict(constant):
    raise ValueError(f"{constant} is not JSON")  # json.loads would otherwise accept NaN and -Infinity


def _json_lines(text):
    return [json.loads(line, parse_constant=_strict) for line in text.splitlines() if line.startswith("{")]


def _jsonl(path):
    lines = path.read_text().splitlines()
    assert lines and all(line.startswith("{") for line in lines)
    return _json_lines("\n".join(lines))


def test_cli_end_to_end(tmp_path, capsys):
    work = tmp_path / "work"
    cache, pt, ft = work / "cache", work / "pt", work / "ft"
    assert main(["prepare", "--out", str(cache), "--n-records", "40", "--workers", "1", "--no-progress"]) == 0
    assert (cache / "meta.json").exists()
    assert main(["pretrain", "--cache", str(cache), "--out", str(pt), "--preset", "tiny", "--epochs", "2",
                 "--stop-after-epochs", "1", "--batch-size", "16", "--no-progress", "--device", "cpu"]) == 0
    first = _json_lines(capsys.readouterr().out)[-1]
    assert first["epoch"] == 0 and not (pt / "pretrained").exists()  # written when the schedule is done
    # A second invocation resumes from last.pt and finishes the schedule.
    assert main(["pretrain", "--cache", str(cache), "--out", str(pt), "--preset", "tiny", "--epochs", "2",
                 "--batch-size", "16", "--no-progress", "--device", "cpu"]) == 0
    second = _json_lines(capsys.readouterr().out)[-1]
    assert second["epoch"] == 1 and second["train_loss"] > 0
    assert len(_jsonl(pt / "metrics.jsonl")) == 2
    # Resuming with more epochs would change the learning-rate schedule: refused unless asked for.
    longer = ["pretrain", "--cache", str(cache), "--out", str(pt), "--preset", "tiny", "--epochs", "3",
              "--batch-size", "16", "--no-progress", "--device", "cpu"]
    assert main(longer) == 2
    assert "epochs 2 -> 3" in capsys.readouterr().err
    assert main(longer + ["--extend-schedule"]) == 0
    assert _json_lines(capsys.readouterr().out)[-1]["epoch"] == 2
    assert [r["epoch"] for r in _jsonl(pt / "metrics.jsonl")] == [0, 1, 2]
    encoder = CLEAR.from_pretrained(pt / "pretrained")
    last = load_checkpoint(pt / "last.pt", "pretrain")["model"]
    assert all(torch.equal(v, last[k]) for k, v in encoder.state_dict().items())
    assert main(["finetune", "--cache", str(cache), "--checkpoint", str(pt / "last.pt"), "--out", str(ft),
                 "--head", "both", "--fractions", "0.5", "1", "--epochs", "2", "--no-progress",
                 "--device", "cpu"]) == 0
    results = _json_lines(capsys.readouterr().out)
    assert {(r["head"], r["fraction"]) for r in results} == {("hug", 0.5), ("hug", 1.0), ("linear", 0.5),
                                                             ("linear", 1.0)}
    assert all(r["n_train"] >= 1 for r in results)
    assert len(_jsonl(ft / "results.jsonl")) == 4 and len(_jsonl(ft / "hug_f1_s0.jsonl")) == 2
    # The best head (by validation AUROC) as a portable classifier folder.
    best = max(results, key=lambda r: r["val_auroc"])
    portable = Classifier.from_pretrained(ft / "pretrained")
    head = load_classifier(best["checkpoint"])
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in portable.state_dict().items())
    assert load_pretrained_config(ft / "pretrained")["class_names"] == json.loads((cache / "meta.json").read_text())[
        "class_names"]
    # The run folders move together (another disk, another machine): heads still find their encoder.
    moved = tmp_path / "moved"
    shutil.move(work, moved)
    heads = [str(moved / "ft" / "hug_f1_s0.pt"), str(moved / "ft" / "linear_f0.5_s0.pt")]
    assert main(["evaluate", "--cache", str(moved / "cache"), *heads, "--split", "val",
                 "--out", str(tmp_path / "ev.jsonl"), "--device", "cpu"]) == 0
    evals = _json_lines(capsys.readouterr().out)
    assert len(evals) == 2 and all(e["split"] == "val" for e in evals)
    assert all(e["classes_scored"] >= 1 and 0.0 <= e["auroc"] <= 1.0 for e in evals)
    assert _jsonl(tmp_path / "ev.jsonl") == evals


def test_cli_random_encoder_and_errors(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["prepare", "--out", str(cache), "--n-records", "30", "--workers", "1", "--no-progress"]) == 0
    assert main(["finetune", "--cache", str(cache), "--preset", "tiny", "--out", str(tmp_path / "ft"),
                 "--head", "linear", "--fractions", "1", "--epochs", "1", "--no-progress", "--device", "cpu"]) == 0
    assert main(["evaluate", "--cache", str(cache), str(tmp_path / "ft" / "linear_f1_s0.pt"),
                 "--device", "cpu"]) == 0
    assert main(["nonsense"]) == 2
    with pytest.raises(SystemExit):
        main(["pretrain", "--cache", str(cache)])  # --out is required


def test_run_flags_come_from_the_run_dataclasses():
    from clear_hug.cli import FINETUNE_FLAGS, PRETRAIN_FLAGS, finetune_parser, pretrain_parser
    from clear_hug.train.finetune import FinetuneArgs
    from clear_hug.train.pretrain import PretrainArgs

    for parser, cls, flags in ((pretrain_parser(), PretrainArgs, PRETRAIN_FLAGS),
                               (finetune_parser(), FinetuneArgs, FINETUNE_FLAGS)):
        args = parser.parse_args(["--cache", "c", "--out", "o"])
        assert {k: getattr(args, k) for k in flags} == {k: getattr(cls(), k) for k in flags}
    args = pretrain_parser().parse_args(["--cache", "c", "--out", "o", "--lr", "0.25", "--max-tokens", "960",
                                         "--extend-schedule"])
    assert (args.lr, args.max_tokens, args.extend_schedule) == (0.25, 960, True)
    with pytest.raises(SystemExit):
        finetune_parser().parse_args(["--cache", "c", "--out", "o", "--fusion", "max"])


def _flag_problems(parser, classes, not_settings):
    """What is wrong with ``parser``'s flags: one that no field of ``classes`` holds (hand-written), or whose
    default, type or choices differ from its field's (the first class that has the field is its home)."""
    home = {}
    for cls in reversed(classes):
        home.update({f.name: cls for f in fields(cls)})
    dests = {a.dest for a in parser._actions}
    problems = [f"{name}: listed as no setting, but {parser.prog} has no such flag" for name in not_settings - dests]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in not_settings:
            continue
        flag = "/".join(action.option_strings)
        if action.dest not in home:
            problems.append(f"{flag}: hand-written, no field of {[c.__name__ for c in classes]}")
            continue
        spec = flag_spec(home[action.dest], action.dest)
        got = (action.default, action.type, action.choices)
        want = (spec["default"], spec.get("type"), spec.get("choices"))
        if got != want:
            problems.append(f"{flag}: default, type, choices {got}; {home[action.dest].__name__}'s {want}")
    return problems


def test_every_flag_default_is_its_dataclass_field_default():
    from clear_hug import ablate, demo, demo_long
    from clear_hug.cli import evaluate_parser, finetune_parser, predict_parser, pretrain_parser
    from clear_hug.config import ModelChoice
    from clear_hug.evaluation import EvaluateArgs
    from clear_hug.train.common import RunSettings
    from clear_hug.train.finetune import FinetuneArgs, FinetuneSweep
    from clear_hug.train.pretrain import PretrainArgs

    # Each parser, the dataclasses its flags come from, and its flags that are no setting of a run: required
    # inputs, output paths (no default worth keeping in step), the README pair of report.py, demo's --long switch.
    readme = {"readme_from", "readme"}
    parsers = [
        (pretrain_parser(), (RunSettings, ModelChoice, PretrainArgs), {"cache", "out"}),
        (finetune_parser(), (RunSettings, ModelChoice, FinetuneSweep, FinetuneArgs), {"cache", "out"}),
        (evaluate_parser(), (RunSettings, EvaluateArgs), {"cache", "heads", "out", "report"}),
        (predict_parser(), (RunSettings,), {"model", "inputs", "out", "plot"}),
        (demo.build_parser(), (demo.DemoArgs,), readme | {"long"}),
        (demo_long.build_parser(), (demo_long.DemoLongArgs,), readme),
        (ablate.build_parser(), (ablate.AblateArgs,), readme),
    ]
    for parser, classes, not_settings in parsers:
        assert _flag_problems(parser, classes, not_settings) == [], parser.prog
    # The check catches a hand-written flag, and a default that drifted from its field.
    p = pretrain_parser()
    p.add_argument("--warmup-steps", type=int, default=3)
    assert _flag_problems(p, (RunSettings, ModelChoice, PretrainArgs), {"cache", "out"}) == [
        "--warmup-steps: hand-written, no field of ['RunSettings', 'ModelChoice', 'PretrainArgs']"]
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1)
    assert len(_flag_problems(p, (RunSettings,), set())) == 1
