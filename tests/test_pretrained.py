"""Portable weights: save_pretrained / from_pretrained folders (safetensors + config.json) round-trip bitwise."""

import json
import pickle

import pytest
import torch
from model_fixtures import tiny_config, token_batch

from clear_hug.checkpoint import CheckpointError, from_pretrained, load_pretrained_config
from clear_hug.heads import Classifier, build_head
from clear_hug.model import CLEAR


def _no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("head", ["hug", "linear"])
def test_classifier_round_trip_is_bitwise_and_pickle_free(tmp_path, monkeypatch, head):
    torch.manual_seed(0)
    model = Classifier(CLEAR(tiny_config()), build_head(head, 32, 3, "concat" if head == "hug" else "mean")).eval()
    batch = token_batch(3)
    expected = model(*batch)
    model.save_pretrained(tmp_path / "m", ["AFIB", "NORM", "STTC"], {"fs": 100, "bandpass": False})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["class_names"] == ["AFIB", "NORM", "STTC"] and config["preprocessing"]["fs"] == 100
    _no_pickle(monkeypatch)
    loaded = Classifier.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded(*batch), expected)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(1)
    enc = CLEAR(tiny_config(attn_impl="dense")).eval()
    batch = token_batch(2)
    enc.save_pretrained(tmp_path / "e")
    loaded = CLEAR.from_pretrained(tmp_path / "e").eval()
    assert loaded.cfg == enc.cfg
    assert torch.equal(loaded.forward_features(*batch), enc.forward_features(*batch))
    with pytest.raises(CheckpointError, match="holds a 'clear' model, expected a 'classifier'"):
        Classifier.from_pretrained(tmp_path / "e")
    with pytest.raises(ValueError, match="class_names must name the classifier's 2 classes"):
        Classifier(enc, build_head("linear", 32, 2)).save_pretrained(tmp_path / "c", ["one"])
    config = load_pretrained_config(tmp_path / "e")
    (tmp_path / "e" / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "enc_dim": 64,
                                                                                  "enc_ffn": 64}}))
    with pytest.raises(CheckpointError, match="do not fit the model"):
        from_pretrained(tmp_path / "e")
    (tmp_path / "e" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    (tmp_path / "e" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        from_pretrained(tmp_path / "e")
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path / "nothing")
