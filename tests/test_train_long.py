"""Training on long, ragged records: variable-length pretraining under a token budget, the per-beat head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clear_hug.config import get_config
from clear_hug.data.cache import TokenDataset, build_cache, long_synthetic_source
from clear_hug.data.sampler import LengthBucketSampler
from clear_hug.heads import BeatClassifier, BeatHead
from clear_hug.metrics import episode_scores, episodes_from_beats
from clear_hug.model import CLEAR
from clear_hug.train.beats import (
    BeatHeadArgs,
    BeatRecords,
    beat_auroc,
    extract_beat_features,
    predict_beats,
    train_beat_head,
)
from clear_hug.train.pretrain import PretrainArgs, pretrain


@pytest.fixture(scope="module")
def long_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "cache"
    src = long_synthetic_source(10, seed=3, min_minutes=0.5, max_minutes=1.5)
    meta = build_cache(src, out, max_beats=None, shard_size=5, progress=False)
    assert meta["n_records"] == 10 and meta["beats_dropped"] == 0 and meta["beat_class_names"] == ["AFIB", "ECTOPIC"]
    return out


def test_long_cache_labels_follow_the_generator(long_cache):
    ds = TokenDataset(long_cache, split=None)
    assert ds.lengths.min() >= 25 and ds.lengths.max() > 1.5 * ds.lengths.min()  # ragged: 30-90 s records
    from clear_hug.data.synthetic.long import generate_long_record

    for i in range(len(ds)):
        item = ds[i]
        _, r, eps, types = generate_long_record(3, i, min_minutes=0.5, max_minutes=1.5)
        assert item["tokens"].shape[1] == len(r)  # every beat (the source uses the true R peaks)
        # AF beats are the generator's AF-conducted beats, ectopic beats its ventricular ones.
        np.testing.assert_array_equal(item["beat_labels"][:, 0].numpy(), (types == 1).astype(np.float32))
        np.testing.assert_array_equal(item["beat_labels"][:, 1].numpy(), (types == 2).astype(np.float32))
        assert item["labels"].tolist() == [float((types == 1).any()), float((types == 2).any())]


def test_pretraining_on_variable_length_batches(long_cache, tmp_path):
    ds = TokenDataset(long_cache, split=None)
    budget = 12 * 200
    args = PretrainArgs(epochs=1, max_tokens=budget, lr=1e-3, warmup_epochs=0, progress=False,
                        out_dir=str(tmp_path / "run"), device="cpu")
    history = pretrain(get_config("tiny"), ds, args)
    batches = list(LengthBucketSampler(ds.lengths, budget, seed=0))
    assert len(history["steps"]) == len(batches) < len(ds)  # several records share a batch
    assert all(np.isfinite(history["steps"]))
    assert any(len(b) > 1 for b in batches) and any(len(b) == 1 for b in batches)


def test_beat_head_learns_a_per_beat_rule_and_stays_local():
    g = torch.Generator().manual_seed(0)

    def records(n):
        feats, valid, labels = [], [], []
        for _ in range(n):
            m = int(torch.randint(20, 300, (1,), generator=g))
            x = torch.randn(m, 16, generator=g)
            feats.append(x)
            valid.append(torch.ones(m, dtype=torch.bool))
            labels.append(torch.stack([(x[:, 0] > 0).float(), (x[:, 1] > 0.5).float()], -1))
        return BeatRecords(feats, valid, labels, torch.zeros(n, 12, 16), torch.zeros(n, 2))

    train, val = records(30), records(10)
    head, result = train_beat_head(train, val, BeatHeadArgs(epochs=15, lr=1e-2, context=3))
    assert beat_auroc(val, predict_beats(head, val))["auroc"] > 0.95 and result["val_auroc"] > 0.95
    # Beat j sees only beats j-1..j+1 (context 3): changing beat 100 leaves beats 0..98 as they were.
    x = torch.randn(1, 200, 16)
    v = torch.ones(1, 200, dtype=torch.bool)
    y = x.clone()
    y[0, 100] += 5
    with torch.no_grad():
        a, b = head(x, v), head(y, v)
    assert torch.equal(a[0, :99], b[0, :99]) and not torch.equal(a[0, 99:102], b[0, 99:102])


def test_beat_features_of_a_ragged_cache_and_end_to_end_head(long_cache):
    ds = TokenDataset(long_cache, split=None)
    torch.manual_seed(0)
    encoder = CLEAR(get_config("tiny"))
    data = extract_beat_features(encoder, ds, max_tokens=12 * 300)
    assert [len(f) for f in data.feats] == ds.lengths.tolist() and data.summary.shape == (len(ds), 12, 32)
    # The same record alone gives the same features (padding in a batch changes nothing).
    alone = extract_beat_features(encoder, torch.utils.data.Subset(ds, [3]), max_tokens=10 ** 6)
    torch.testing.assert_close(alone.feats[0], data.feats[3], rtol=1e-4, atol=1e-5)
    model = BeatClassifier(encoder, BeatHead(32, 2))
    item = ds[0]
    out = model(item["tokens"][None], item["valid"][None], item["time"][None])
    assert out.shape == (1, item["tokens"].shape[1], 2)


def test_episode_scores():
    true = np.array([0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0], bool)
    pred = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    assert episodes_from_beats(true) == [(1, 4), (7, 9)]
    s = episode_scores(true, pred)
    assert s == {"true_episodes": 2, "detected": 1, "pred_episodes": 2, "correct": 1}
    assert episode_scores(true, pred, min_beats=2)["pred_episodes"] == 1


def test_beat_head_bad_inputs_raise():
    head = BeatHead(16, 2, context=5)
    with pytest.raises(ValueError, match="beats must be"):
        head(torch.zeros(2, 10, 16), torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="grid must be"):
        BeatHead.pool_leads(torch.zeros(2, 12, 10, 16), torch.ones(2, 12, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="context"):
        BeatHead(16, 2, context=4)
