"""``clear-hug predict`` and ``Classifier.predict_record`` on real records, against ``clear-hug evaluate``."""

import csv
import json
import pickle

import numpy as np
import pytest
import torch
from _ecgdata import need_ecg
from model_fixtures import tiny_config, token_batch

from clear_hug.cli import main
from clear_hug.data.readers import RecordReadError
from clear_hug.heads import EXPERTS, HUG, Classifier, LinearProbe, build_head
from clear_hug.model import CLEAR


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny HUG classifier trained on the real CinC records (CinC 2021 scored classes), its portable folder, and
    evaluate's report."""
    root = need_ecg("cinc2021")
    work = tmp_path_factory.mktemp("predict")
    cache, ft, rep = work / "cache", work / "ft", work / "rep"
    assert main(["prepare", "--source", "cinc", "--root", str(root), "--out", str(cache), "--workers", "1",
                 "--labels", "cinc2021", "--bandpass", "--no-progress"]) == 0  # predict must repeat the filter
    assert main(["finetune", "--cache", str(cache), "--preset", "tiny", "--out", str(ft), "--head", "hug",
                 "--fractions", "1", "--epochs", "2", "--no-progress", "--device", "cpu"]) == 0
    assert main(["evaluate", "--cache", str(cache), str(ft / "pretrained"), "--report", str(rep), "--n-boot", "20",
                 "--device", "cpu"]) == 0
    return root, work, ft / "pretrained", json.loads((rep / "pretrained" / "predictions.json").read_text())


def test_evaluate_writes_a_report(trained):
    _, work, _, evaluated = trained
    rep = work / "rep" / "pretrained"
    assert sorted(p.name for p in rep.iterdir()) == ["metrics.json", "pr.png", "predictions.csv", "predictions.json",
                                                     "report.md", "roc.png"]
    metrics = json.loads(rep.joinpath("metrics.json").read_text())  # strict JSON: NaN written as null
    names = evaluated["class_names"]
    assert [r["class"] for r in metrics["per_class"]] == names and metrics["split"] == "test"
    # The CinC 2021 scored classes: the challenge score is reported too.
    assert set(metrics["macro"]) == {"auroc", "auprc", "f1", "fbeta", "gbeta", "challenge"}
    assert "CRBBB|RBBB" in names and np.isfinite(metrics["macro"]["challenge"]) and metrics["macro"]["challenge"] <= 1
    report = rep.joinpath("report.md").read_text()
    assert "| macro AUROC |" in report and all(f"| {c.replace('|', chr(92) + '|')} |" in report for c in names)
    assert "| CRBBB\\|RBBB |" in report  # a merged class's "|" must not split the table's cells
    assert "![roc](roc.png)" in report and rep.joinpath("roc.png").stat().st_size > 10_000


def test_predict_matches_evaluate_on_real_records(trained, capsys, monkeypatch):
    root, work, model_dir, evaluated = trained
    ids = [r["record"] for r in evaluated["records"]]
    assert ids, "the cache's test split holds no record"
    bad = work / "bad"
    bad.mkdir()
    (bad / "broken.hea").write_text("broken 12 abc 5000\n")  # an unreadable sampling rate: a named skip
    out = work / "preds.csv"
    assert main(["predict", "--model", str(model_dir), *[str(root / i) for i in ids], str(bad / "broken.hea"),
                 "--out", str(out), "--plot", str(work / "plots"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipped broken:" in err and "sampling-rate" in err
    written = json.loads(out.with_suffix(".json").read_text())
    assert [s["record"] for s in written["skipped"]] == ["broken"]
    rows = {r["record"]: r for r in written["records"]}
    assert sorted(rows) == sorted(ids)
    names = evaluated["class_names"]
    for r in evaluated["records"]:
        got = [rows[r["record"]]["probabilities"][c] for c in names]
        np.testing.assert_allclose(got, [r["probabilities"][c] for c in names], rtol=1e-5, atol=1e-6)
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["record"] for t in table] == ids and list(table[0])[-len(names):] == names
    assert sorted(p.name for p in (work / "plots").iterdir()) == sorted(f"{i}.png" for i in ids)
    # The same from Python, loaded without pickle.
    monkeypatch.setattr(pickle, "Unpickler", None)
    model = Classifier.from_pretrained(model_dir)
    one = model.predict_record(root / f"{ids[0]}.hea")
    assert one["record"] == ids[0]
    np.testing.assert_allclose([one["probabilities"][c] for c in names],
                               [rows[ids[0]]["probabilities"][c] for c in names], rtol=1e-5, atol=1e-6)
    with pytest.raises(RecordReadError, match="sampling-rate"):
        model.predict_record(bad / "broken")


def test_predict_refuses_a_folder_without_records_and_a_model_without_preprocessing(trained, tmp_path, capsys):
    _, _, model_dir, _ = trained
    assert main(["predict", "--model", str(model_dir), str(tmp_path)]) == 2
    assert "no records found" in capsys.readouterr().err
    torch.manual_seed(0)
    bare = Classifier(CLEAR(tiny_config()), build_head("linear", 32, 2))
    bare.save_pretrained(tmp_path / "bare", ["A", "B"])  # no preprocessing recorded
    with pytest.raises(ValueError, match="does not say") as raised:
        Classifier.from_pretrained(tmp_path / "bare").predict_record(tmp_path / "x")
    assert not isinstance(raised.value, RecordReadError)  # the model's fault, not the record's
    with pytest.raises(ValueError, match="load it with"):
        bare.predict_record(tmp_path / "x")


@pytest.mark.parametrize("fusion", ["mean", "concat"])
def test_hug_contributions_add_up_to_the_logits(fusion):
    torch.manual_seed(0)
    feats = CLEAR(tiny_config()).eval().forward_features(*token_batch(3))
    hug = HUG(32, 4, fusion=fusion)
    shares = hug.expert_contributions(feats)
    assert shares.shape == (3, len(EXPERTS), 4)
    torch.testing.assert_close(shares.sum(1) + hug.classifier.bias, hug(feats))
    probe = LinearProbe(32, 4)
    torch.testing.assert_close(probe.lead_contributions(feats).sum(1) + probe.linear.bias, probe(feats))


def test_find_records_in_folders_ptbxl_roots_and_paths(tmp_path):
    from _ecgdata import write_ptbxl_fixture

    from clear_hug.predict import find_records

    root = write_ptbxl_fixture(tmp_path / "ptbxl")
    records, missing = find_records([root, tmp_path / "ptbxl" / "records100" / "00000" / "00002_lr.hea",
                                     tmp_path / "nothing.dat"])
    assert [r for r, _ in records] == ["1", "2", "3", "4", "5", "00002_lr"]
    assert records[0][1].endswith("records100/00000/00001_lr") and missing[0]["record"].endswith("nothing.dat")
    folder, _ = find_records([tmp_path / "ptbxl" / "records500"])
    assert [r for r, _ in folder] == [f"0000{i}_hr" for i in range(1, 6)]


def test_plot_command_zooms_into_a_long_record(tmp_path, capsys):
    mitdb = need_ecg("mitdb")
    out = tmp_path / "zoom.png"
    assert main(["plot", str(mitdb / "100"), "--start", "60", "--end", "70", "--max-beats", "all",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 20_000 and str(out) in capsys.readouterr().out
    assert main(["plot", str(mitdb / "100"), "--start", "70", "--end", "60", "--out", str(out)]) == 2
    assert "start/end must satisfy" in capsys.readouterr().err
