"""Checkpoints: nothing in a file runs on load, formats and kinds are checked, heads find their encoder after a move."""

import json
import pathlib
import random
import shutil

import numpy as np
import pytest
import torch
from model_fixtures import ListDataset, tiny_config, token_batch

from clear_hug import checkpoint
from clear_hug.checkpoint import CheckpointError, load_classifier, load_encoder, save_head
from clear_hug.cli import main
from clear_hug.heads import build_head
from clear_hug.model import CLEAR
from clear_hug.train.pretrain import PretrainArgs, pretrain


class _WritesMarker:
    """Unpickling this calls ``Path.write_text(marker, "ran")``: the stand-in for any code a crafted file runs."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "ran")


def _crafted(path, marker, kind):
    torch.save({"format": checkpoint.FORMAT, "kind": kind, "model": _WritesMarker(marker),
                "config": tiny_config().to_dict()}, path)
    return path


def _pretrained(tmp_path, name="pt", seed=3, epochs=1):
    args = PretrainArgs(epochs=epochs, batch_size=8, lr=1e-3, warmup_epochs=1, seed=seed,
                        out_dir=str(tmp_path / name), progress=False)
    pretrain(tiny_config(), ListDataset(8, seed=0), args)
    return tmp_path / name / "last.pt"


def _head_file(path, encoder, encoder_file, class_names=("a", "b", "c", "d")):
    torch.manual_seed(0)
    head = build_head("hug", encoder.cfg.enc_dim, len(class_names))
    save_head(path, head="hug", fusion="mean", head_state=head.state_dict(), class_names=class_names,
              encoder_config=encoder.cfg.to_dict(), encoder_state=encoder.state_dict(), encoder_file=encoder_file)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    assert main(["prepare", "--out", str(out), "--n-records", "30", "--workers", "1", "--no-progress"]) == 0
    return out


def test_crafted_checkpoint_runs_no_code_through_any_loader(tmp_path, cache):
    marker = tmp_path / "marker"
    evil_pt = _crafted(tmp_path / "evil_pretrain.pt", marker, "pretrain")
    evil_head = _crafted(tmp_path / "evil_head.pt", marker, "head")
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load_checkpoint(evil_pt, "pretrain")
    with pytest.raises(CheckpointError, match="refused"):
        load_encoder(evil_pt)
    with pytest.raises(CheckpointError, match="refused"):
        load_classifier(evil_head)
    # A clean head whose encoder file was swapped for a crafted one (evaluate loads that second file).
    good = _pretrained(tmp_path)
    head = _head_file(tmp_path / "head.pt", load_encoder(good), good)
    shutil.copy(evil_pt, good)
    with pytest.raises(CheckpointError, match="refused"):
        load_classifier(head)
    # pretrain resuming from a crafted last.pt
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(evil_pt, run / "last.pt")
    with pytest.raises(CheckpointError, match="refused"):
        pretrain(tiny_config(), ListDataset(8, seed=0),
                 PretrainArgs(epochs=1, batch_size=8, out_dir=str(run), progress=False))
    # The command line: finetune --checkpoint and evaluate refuse with exit status 2.
    assert main(["finetune", "--cache", str(cache), "--checkpoint", str(evil_pt), "--out", str(tmp_path / "ft"),
                 "--head", "linear", "--fractions", "1", "--epochs", "1", "--no-progress", "--device", "cpu"]) == 2
    assert main(["evaluate", "--cache", str(cache), str(evil_head), "--device", "cpu"]) == 2
    assert not marker.exists()


def test_format_kind_and_damage_are_clear_errors(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"format": 99, "kind": "pretrain"}, path)
    with pytest.raises(CheckpointError, match="format 99 is not supported"):
        checkpoint.load_checkpoint(path, "pretrain")
    torch.save({"model": {}}, path)  # an older or foreign file without a header
    with pytest.raises(CheckpointError, match="no 'format' field"):
        checkpoint.load_checkpoint(path, "pretrain")
    checkpoint.save_checkpoint(path, "head", {"x": torch.ones(2)})
    with pytest.raises(CheckpointError, match="a 'head' checkpoint, expected a 'pretrain'"):
        checkpoint.load_checkpoint(path, "pretrain")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(path, "head")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt", "head")
    with pytest.raises(ValueError, match="kind must be one of"):
        checkpoint.save_checkpoint(path, "optimizer", {})


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)
    checkpoint.save_checkpoint(tmp_path / "r.pt", "pretrain", {"rng": checkpoint.rng_state()})
    expected = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(checkpoint.load_checkpoint(tmp_path / "r.pt", "pretrain")["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_head_finds_its_encoder_after_the_folder_moves(tmp_path):
    root = tmp_path / "runs"
    enc_file = _pretrained(root)
    encoder = load_encoder(enc_file)
    _head_file(root / "heads" / "h.pt", encoder, enc_file)
    assert checkpoint.load_checkpoint(root / "heads" / "h.pt", "head")["encoder_file"] == "../pt/last.pt"
    tokens, valid, time_ids = token_batch(2)
    before = load_classifier(root / "heads" / "h.pt").eval()(tokens, valid, time_ids)
    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(root, moved)
    after = load_classifier(moved / "heads" / "h.pt").eval()(tokens, valid, time_ids)
    assert torch.equal(before, after)


def test_head_refuses_other_encoder_weights_and_other_classes(tmp_path):
    enc_file = _pretrained(tmp_path, "pt", seed=3)
    head = _head_file(tmp_path / "h.pt", load_encoder(enc_file), enc_file)
    assert isinstance(load_classifier(head, class_names=["a", "b", "c", "d"]).encoder, CLEAR)
    with pytest.raises(CheckpointError, match=r"predicts classes \['a', 'b', 'c', 'd'\].*\['b', 'a', 'c', 'd'\]"):
        load_classifier(head, class_names=["b", "a", "c", "d"])
    shutil.copy(_pretrained(tmp_path, "other", seed=4), enc_file)  # same path, other weights
    with pytest.raises(CheckpointError, match="not the ones the head was trained on"):
        load_classifier(head)
    enc_file.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_classifier(head)


def test_evaluate_refuses_a_cache_with_other_class_names(tmp_path, cache, capsys):
    assert main(["finetune", "--cache", str(cache), "--preset", "tiny", "--out", str(tmp_path / "ft"),
                 "--head", "linear", "--fractions", "1", "--epochs", "1", "--no-progress", "--device", "cpu"]) == 0
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["class_names"] = meta["class_names"][::-1]  # same count, other order: scores would silently misalign
    (other / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["evaluate", "--cache", str(other), str(tmp_path / "ft" / "linear_f1_s0.pt"), "--device", "cpu"]) == 2
    assert "predicts classes" in capsys.readouterr().err


def test_a_finetuned_encoder_travels_inside_the_head_file(tmp_path, cache, capsys):
    pt = _pretrained(tmp_path)
    assert main(["finetune", "--cache", str(cache), "--checkpoint", str(pt), "--out", str(tmp_path / "ft"),
                 "--head", "linear", "--fractions", "1", "--epochs", "1", "--finetune-encoder", "--no-progress",
                 "--device", "cpu"]) == 0
    head = tmp_path / "ft" / "linear_f1_s0.pt"
    state = checkpoint.load_checkpoint(head, "head")
    assert state["encoder_file"] is None and state["encoder_state"] is not None
    assert state["encoder_sha256"] != checkpoint.state_digest(load_encoder(pt).state_dict())  # it was trained
    pt.unlink()  # not needed any more
    capsys.readouterr()
    assert main(["evaluate", "--cache", str(cache), str(head), "--split", "train", "--device", "cpu"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out.splitlines()[-1])["auroc"] <= 1.0
