"""The length-bucketing sampler: every item once per epoch, batches under the token budget, little padding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_hug.data.sampler import LengthBucketSampler


def _lengths(n=500, seed=0):
    rng = np.random.default_rng(seed)
    # Strips of ~12 beats mixed with Holter excerpts of up to 2000 beats.
    return np.concatenate([rng.integers(8, 16, n // 2), rng.integers(50, 2000, n - n // 2)])


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 400), min_size=1, max_size=80), budget=st.integers(12, 6000),
       seed=st.integers(0, 5), pool=st.integers(1, 100))
def test_each_item_once_and_under_budget(lengths, budget, seed, pool):
    s = LengthBucketSampler(lengths, budget, seed=seed, pool=pool)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    lens = np.asarray(lengths)
    for b in batches:
        over = len(b) * max(int(lens[b].max()), 1) * 12 > budget
        assert not over or len(b) == 1  # only a record too long on its own exceeds the budget, alone
    assert len(s) == len(batches)


def test_bucketing_cuts_padding_and_reshuffles_each_epoch():
    lengths = _lengths()
    s = LengthBucketSampler(lengths, 12 * 4000, seed=1, pool=256)
    real, padded = s.padded_tokens()
    assert real / padded > 0.85
    # A plain random order with the same batch count pads far more.
    rng = np.random.default_rng(0)
    order = rng.permutation(len(lengths))
    chunks = np.array_split(order, len(s))
    random_padded = sum(int(lengths[c].max()) * len(c) * 12 for c in chunks)
    assert padded < 0.6 * random_padded
    first = list(s)
    assert list(s) == first  # a pure function of (seed, epoch)
    s.set_epoch(1)
    assert list(s) != first
    short = [b for b in first if lengths[b].max() < 16]
    assert max(len(b) for b in short) > 100 and max(len(b) for b in first if lengths[b].max() > 1000) <= 4


def test_ranks_split_the_batches_evenly():
    lengths = _lengths(101)
    per_rank = [list(LengthBucketSampler(lengths, 12 * 3000, seed=2, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(len(lengths)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="lengths"):
        LengthBucketSampler([], 100)
    with pytest.raises(ValueError, match="lengths"):
        LengthBucketSampler([3, -1], 100)
    with pytest.raises(ValueError, match="max_tokens"):
        LengthBucketSampler([3], 0)
    with pytest.raises(ValueError, match="rank"):
        LengthBucketSampler([3], 100, num_replicas=2, rank=2)
