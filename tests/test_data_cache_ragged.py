"""The ragged token cache: records of any length, windows, per-beat labels, dropped beats, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _ecgdata import toy_ecg

from clear_hug.data.annotations import Episode
from clear_hug.data.cache import ArraySource, TokenDataset, build_cache, load_meta, pad_collate
from clear_hug.data.tokenize import tokenize_beats

FS = 250
BEATS = [8, 40, 150, 23, 75, 5]  # records of 5 s to about 2 minutes


def ragged_source(beats=BEATS, name="rag", with_episodes=True):
    """Toy records of different lengths; record k has an "AF" episode over its middle third."""
    signals, episodes = [], []
    for k, n in enumerate(beats):
        rng = np.random.default_rng(k)
        x, r = toy_ecg(FS, rng.uniform(0.6, 1.0, n - 1), seed=k)
        signals.append(x)
        dur = x.shape[1] / FS
        episodes.append([Episode(dur / 3, 2 * dur / 3, "AF")])
    splits = np.zeros(len(beats), np.int8)
    extra = dict(episodes=episodes, beat_class_names=["AF"]) if with_episodes else {}
    labels = np.ones((len(beats), 1), np.float32)
    return ArraySource(signals, FS, labels, ["x"], splits, name=name, **extra)


def test_every_beat_kept_and_items_match_direct_tokenising(tmp_path):
    src = ragged_source()
    meta = build_cache(src, tmp_path / "c", max_beats=None, shard_size=4, progress=False)
    ds = TokenDataset(tmp_path / "c", split=None)
    direct = [tokenize_beats(s, FS, max_beats=None) for s in src.signals]
    assert ds.lengths.tolist() == [len(d.rpeaks) for d in direct] and meta["beats_dropped"] == 0
    assert meta["beats_total"] == sum(len(d.rpeaks) for d in direct)
    assert abs(ds.lengths[2] - 150) <= 1  # the 2-minute record: all its beats, no cap
    for i, d in enumerate(direct):
        item = ds[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), d.tokens)
        np.testing.assert_array_equal(item["valid"].numpy(), d.valid)
        np.testing.assert_array_equal(item["time"].numpy(), d.time)
        # Per-beat labels: beats whose R peak is in the middle third; the record label is "any beat".
        dur = src.signals[i].shape[1] / FS
        t = d.rpeaks / 100.0
        want = ((t >= dur / 3) & (t < 2 * dur / 3)).astype(np.float32)
        np.testing.assert_array_equal(item["beat_labels"][:, 0].numpy(), want)
        assert item["labels"].tolist() == [float(want.any())]
    assert meta["class_names"] == ["AF"] and meta["beat_class_names"] == ["AF"]
    batch = pad_collate([ds[0], ds[2], ds[5]])
    width = int(ds.lengths[[0, 2, 5]].max())
    assert batch["tokens"].shape == (3, 12, width, 96) and batch["beat_labels"].shape == (3, width, 1)
    assert batch["valid"][0, :, ds.lengths[0]:].sum() == 0 and batch["valid"][1].all()


def test_a_cap_counts_the_beats_it_drops(tmp_path, caplog):
    src = ragged_source(with_episodes=False)
    full = [len(tokenize_beats(s, FS, max_beats=None).rpeaks) for s in src.signals]
    with caplog.at_level("WARNING"):
        meta = build_cache(src, tmp_path / "c", max_beats=15, shard_size=4, progress=False)
    assert meta["beats_dropped"] == sum(max(0, n - 15) for n in full) > 0
    assert meta["items_capped"] == sum(n > 15 for n in full)
    assert "left out" in caplog.text and str(meta["beats_dropped"]) in caplog.text
    ds = TokenDataset(tmp_path / "c", split=None)
    assert all(ds[i]["tokens"].shape == (12, 15, 96) for i in range(len(ds)))  # padded to the cap
    assert ds[5]["valid"][0].sum() == full[5] < 15  # a short record: the rest is padding


def test_windows_with_a_stride_and_a_gap_without_beats(tmp_path):
    """A 90 s record cut into 20 s windows every 10 s; its 30 s flat gap yields windows with no beat (left out and
    counted) and windows with a few beats (padding, not an error)."""
    x, _ = toy_ecg(FS, np.full(110, 0.8), seed=3)
    x = x[:, : 90 * FS].copy()
    x[:, 40 * FS: 70 * FS] = 0.0
    src = ArraySource([x], FS, np.ones((1, 1), np.float32), ["x"], np.zeros(1, np.int8), name="win")
    meta = build_cache(src, tmp_path / "c", max_beats=None, window_s=20, stride_s=10, progress=False)
    whole = tokenize_beats(x, FS, max_beats=None)
    ds = TokenDataset(tmp_path / "c", split=None)
    starts = [float(ds.record_id(i).split("@")[1][:-1]) for i in range(len(ds))]
    r_s = whole.rpeaks / 100.0
    expected = [s for s in range(0, 71, 10) if ((r_s >= s) & (r_s < s + 20)).any()]
    assert starts == expected and meta["windows_without_beats"] == 8 - len(expected) >= 1
    for i, s in enumerate(starts):
        inside = np.flatnonzero((r_s >= s) & (r_s < s + 20))
        item = ds[i]
        assert ds.lengths[i] == len(inside)
        np.testing.assert_array_equal(item["tokens"].numpy(), whole.tokens[:, inside])
        assert item["time"][item["valid"]].max() <= 19  # seconds from the window's start
    assert min(ds.lengths) < max(ds.lengths)  # a window at the gap's edge is just shorter


def test_bad_options_raise(tmp_path):
    src = ragged_source(with_episodes=False)
    with pytest.raises(ValueError, match="max_beats"):
        build_cache(src, tmp_path / "a", max_beats=0, progress=False)
    with pytest.raises(TypeError, match="max_beats"):
        build_cache(src, tmp_path / "b", max_beats=2.5, progress=False)
    with pytest.raises(ValueError, match="window_s"):
        build_cache(src, tmp_path / "c", window_s=-1, progress=False)
    with pytest.raises(ValueError, match="stride_s needs window_s"):
        build_cache(src, tmp_path / "d", stride_s=5, progress=False)
    with pytest.raises(ValueError, match="empty dataset"):
        build_cache(ArraySource([], FS, np.zeros((0, 1)), ["x"], np.zeros(0, np.int8)), tmp_path / "e",
                    progress=False)
    with pytest.raises(ValueError, match="episodes"):
        ArraySource(src.signals, FS, None, ["x"], src.splits, beat_class_names=["AF"])


class SlowSource(ArraySource):
    """Each shard takes a while to hand out, so a run can be killed between shards."""

    def payload(self, indices):
        time.sleep(0.4)
        return super().payload(indices)


_CHILD = """
import sys
sys.path[:0] = {paths!r}
from test_data_cache_ragged import ragged_source, SlowSource
from clear_hug.data.cache import build_cache
src = ragged_source()
slow = SlowSource(src.signals, src.fs, None, src.class_names, src.splits, name="rag", episodes=src.episodes,
                  beat_class_names=["AF"])
build_cache(slow, {out!r}, max_beats=None, shard_size=1, progress=False)
"""


def test_resume_after_a_kill(tmp_path):
    """Kill a build (SIGKILL, between shards), then rerun: finished shards are kept, the rest done, and the cache
    equals one built in a single run."""
    out = tmp_path / "killed"
    here = Path(__file__).parent
    paths = [str(here), str(here.parent)]
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(paths=paths, out=str(out))],
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})
    deadline = time.monotonic() + 120
    while len(list((out / "shards").glob("shard_*.npz"))) < 2:
        assert child.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline, "no shard written in 2 minutes"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = sorted((out / "shards").glob("shard_*.npz"))
    assert 2 <= len(done) < len(BEATS) and not (out / "meta.json").exists()
    with pytest.raises(FileNotFoundError):
        TokenDataset(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}
    src = ragged_source()
    meta = build_cache(src, out, max_beats=None, shard_size=1, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in done} == mtimes  # finished shards not redone
    ref = build_cache(src, tmp_path / "ref", max_beats=None, shard_size=1, progress=False)
    assert meta["beats_total"] == ref["beats_total"] and meta["n_records"] == len(BEATS)
    for name in ("tokens", "valid", "time", "beat_labels", "offsets", "labels", "record_ids"):
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), np.load(tmp_path / "ref" / f"{name}.npy"))
    assert load_meta(out)["format"] == 3
    assert torch.equal(TokenDataset(out, None)[2]["tokens"], TokenDataset(tmp_path / "ref", None)[2]["tokens"])


def test_prepare_two_lead_holter_excerpts_with_annotation_labels(tmp_path, capsys):
    """The 18 CPSC 2021 excerpts (leads I and II only; the other ten flagged missing) through `clear-hug prepare`
    with every beat kept and per-beat AF labels from their .atr rhythm episodes."""
    from _ecgdata import need_ecg

    from clear_hug.data import prepare
    from clear_hug.data.annotations import episode_labels, read_annotations

    folder = need_ecg("cpsc2021")
    out = tmp_path / "cpsc"
    rc = prepare.main(["--source", "cinc", "--root", str(folder), "--out", str(out), "--max-beats", "all",
                       "--annotations", "atr", "--beat-classes", "AFIB", "--workers", "1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    meta = load_meta(out)
    assert meta["n_records"] == 18 and meta["beats_dropped"] == 0 and "0 beats dropped" in printed
    ds = TokenDataset(out, split=None)
    total_af = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["valid"][[0, 1]].any() and not item["valid"][2:].any()  # I and II present, rest missing
        ann = read_annotations(folder / ds.record_id(i))
        want = episode_labels(_rpeak_seconds(folder / ds.record_id(i)), ann.episodes, ["AFIB"])[:, 0]
        np.testing.assert_array_equal(item["beat_labels"][:, 0].numpy(), want)
        assert item["labels"].tolist() == [float(want.any())] and item["tokens"].shape[1] == len(want)
        total_af += int(want.sum())
    assert total_af > 1000 and meta["class_counts"]["AFIB"] >= 5


def _rpeak_seconds(base):
    from clear_hug.data.readers import read_record

    signal, fs, meta = read_record(base)
    return tokenize_beats(signal, fs, max_beats=None, missing_leads=meta["missing_leads"]).rpeaks / 100.0
