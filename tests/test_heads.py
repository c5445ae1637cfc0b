"""HUG and the linear probe, label subsets, macro AUROC."""

import json

import numpy as np
import pytest
import torch

from clear_hug.heads import HUG, LEAD_GROUPS, LinearProbe, build_head
from clear_hug.metrics import macro_auroc
from clear_hug.train import common
from clear_hug.train.finetune import FinetuneArgs, label_subset, train_head_on_features


@pytest.mark.parametrize("fusion", ["mean", "concat"])
def test_hug_matches_its_definition(fusion):
    torch.manual_seed(0)
    head = HUG(8, 5, hidden=6, fusion=fusion).double()
    s = torch.randn(4, 12, 8, dtype=torch.float64)
    groups = [s[:, list(idx)].mean(1) for idx in LEAD_GROUPS.values()]
    assert [len(v) for v in LEAD_GROUPS.values()] == [3, 3, 6]
    l1 = [head.level1[i](groups[i]) for i in range(3)]
    l2 = [head.level2[0](torch.cat([l1[0], l1[1]], -1)), head.level2[1](torch.cat([l1[0], l1[2]], -1)),
          head.level2[2](torch.cat([l1[1], l1[2]], -1))]
    l3 = head.level3(torch.cat(l2, -1))
    outs = l1 + l2 + [l3]
    fused = sum(outs) / 7 if fusion == "mean" else torch.cat(outs, -1)
    torch.testing.assert_close(head(s), head.classifier(fused))
    assert head.classifier.in_features == (6 if fusion == "mean" else 42)


def test_hug_sees_group_means_only():
    # Within a group, only the mean of the leads matters: swapping I and III, or moving signal between V1
    # and V6 while keeping their sum, leaves the output unchanged; moving it from a limb lead to V1 does not.
    torch.manual_seed(1)
    head = HUG(8, 3).double()
    s = torch.randn(2, 12, 8, dtype=torch.float64)
    base = head(s)
    swapped = s[:, [2, 1, 0, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    torch.testing.assert_close(head(swapped), base)
    moved = s.clone()
    moved[:, 6] += 1.0
    moved[:, 11] -= 1.0
    torch.testing.assert_close(head(moved), base)
    across = s.clone()
    across[:, 0] += 1.0
    across[:, 6] -= 1.0
    assert (head(across) - base).abs().max() > 1e-6


def test_linear_probe_and_factory():
    probe = LinearProbe(8, 3)
    s = torch.randn(2, 12, 8)
    torch.testing.assert_close(probe(s), probe.linear(s.mean(1)))
    assert isinstance(build_head("hug", 8, 3), HUG)
    with pytest.raises(ValueError):
        build_head("mlp", 8, 3)
    with pytest.raises(ValueError):
        HUG(8, 3, fusion="max")


def test_label_subset_is_seeded_and_covers_classes():
    rng = np.random.default_rng(0)
    labels = (rng.random((500, 6)) < np.array([0.5, 0.3, 0.1, 0.02, 0.01, 0.0])).astype(np.float32)
    a, b, c = label_subset(labels, 0.01, 0), label_subset(labels, 0.01, 0), label_subset(labels, 0.01, 1)
    assert len(a) == 5 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(np.unique(a)) == len(a)
    # every class that has a positive gets one (class 5 has none anywhere)
    assert (labels[a][:, :5].sum(0) > 0).all()
    assert len(label_subset(labels, 1.0, 0)) == 500
    assert len(label_subset(labels, 0.1, 3)) == 50
    with pytest.raises(ValueError):
        label_subset(labels, 0.0, 0)


def test_macro_auroc_excludes_single_label_classes():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])
    s = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.4], [0.8, 0.5, 0.1], [0.4, 0.2, 0.3]])
    r = macro_auroc(y, s)
    assert r == {"auroc": 1.0, "classes_scored": 1, "classes_excluded": 2}
    s[1, 0] = 0.95
    assert macro_auroc(y, s)["auroc"] == 0.5  # positives 0.9, 0.8 against negatives 0.95, 0.4
    assert np.isnan(macro_auroc(y[:, 1:], s[:, 1:])["auroc"])


def test_head_training_learns_a_separable_task():
    torch.manual_seed(0)
    n, e = 200, 8
    feats = torch.randn(n, 12, e)
    labels = torch.stack([(feats[:, 6:, 0].mean(1) > 0), (feats[:, :3, 1].mean(1) > 0)], 1).float()
    args = FinetuneArgs(head="hug", epochs=30, batch_size=32, lr=1e-2, warmup_epochs=2)
    head, result = train_head_on_features(feats[:150], labels[:150], feats[150:], labels[150:], args)
    assert result["val_auroc"] > 0.95 and result["n_train"] == 150
    assert 0 <= result["best_epoch"] < 30


def test_unscorable_validation_keeps_the_last_epoch_and_logs_valid_json(tmp_path):
    torch.manual_seed(0)
    feats, labels = torch.randn(40, 12, 8), (torch.rand(40, 2) < 0.5).float()
    val_labels = torch.zeros(10, 2)  # no positive anywhere: AUROC is undefined for every class
    args = FinetuneArgs(head="linear", epochs=3, batch_size=16, lr=1e-2, warmup_epochs=1)
    log = common.JsonlLogger(tmp_path / "log.jsonl")
    head, result = train_head_on_features(feats[:30], labels[:30], feats[30:], val_labels, args, log)
    assert result["selection"] == "last_epoch" and result["best_epoch"] == 2 and np.isnan(result["val_auroc"])
    torch.manual_seed(0)  # train_head_on_features seeds 0 before building the head: this is its initial state
    initial = build_head("linear", 8, 2)
    assert not torch.equal(head.linear.weight, initial.linear.weight)  # trained, not the untouched head
    lines = (tmp_path / "log.jsonl").read_text().splitlines()

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    assert [json.loads(line, parse_constant=strict)["val_auroc"] for line in lines] == [None, None, None]
    with pytest.raises(ValueError, match="val holds no records"):
        train_head_on_features(feats[:30], labels[:30], feats[:0], labels[:0], args)
