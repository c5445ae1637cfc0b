import glob
import os
import shutil

import numpy as np
import pytest
import torch
from _ecgdata import need_ecg, toy_ecg, write_ptbxl_fixture

from clear_hug.data import prepare
from clear_hug.data.cache import ArraySource, TokenDataset, build_cache, load_meta
from clear_hug.data.tokenize import tokenize_beats

N = 10
FLAT = 4  # the record with no beats


def _fake_source():
    rng = np.random.default_rng(0)
    signals, labels = [], []
    for i in range(N):
        x, _ = toy_ecg(250, rng.uniform(0.55, 1.1, 11), n_leads=12, seed=i)
        x = x[:, :2500] if x.shape[1] >= 2500 else np.pad(x, ((0, 0), (0, 2500 - x.shape[1])))
        signals.append(x)
        labels.append([i % 2, i % 3 == 0, 1])
    signals[FLAT] = np.zeros_like(signals[FLAT])
    splits = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    return ArraySource(np.stack(signals), 250, np.array(labels, np.float32), ["a", "b", "c"], splits, name="fake")


def test_build_and_roundtrip(tmp_path):
    src = _fake_source()
    meta = build_cache(src, tmp_path / "c", max_beats=15, shard_size=3, progress=False)
    assert meta["n_total"] == N and meta["n_records"] == N - 1 and meta["n_skipped"] == 1
    assert meta["skipped_by_kind"] == {"no_beats": 1} and meta["skipped"][0]["record"] == src.record_ids[FLAT]
    assert meta["split_counts"] == {"train": 5, "val": 2, "test": 2}
    assert meta["class_counts"] == {"a": 5, "b": 4, "c": 9} and meta["class_names"] == ["a", "b", "c"]
    tokens = np.load(tmp_path / "c" / "tokens.npy", mmap_mode="r")  # ragged: beat rows of all records
    offsets = np.load(tmp_path / "c" / "offsets.npy")
    assert isinstance(tokens, np.memmap) and tokens.shape == (offsets[-1], 12, 96) and len(offsets) == N
    assert meta["beats_total"] == offsets[-1] and meta["beats_dropped"] == 0  # ~11 beats per 10 s, under 15
    ids = np.load(tmp_path / "c" / "record_ids.npy")
    assert src.record_ids[FLAT] not in ids.tolist()

    ds = TokenDataset(tmp_path / "c", split="train")
    assert len(ds) == 5 and ds.class_names == ["a", "b", "c"]
    item = ds[4]
    assert set(item) == {"tokens", "valid", "time", "labels", "beat_labels"}
    assert item["tokens"].dtype == torch.float32 and item["tokens"].shape == (12, 15, 96)
    assert item["valid"].dtype == torch.bool and item["time"].dtype == torch.int64
    assert item["labels"].dtype == torch.float32 and item["labels"].shape == (3,)
    # train item 4 is source record 5 (record 4 was skipped): compare with tokenising it directly
    assert ds.record_id(4) == src.record_ids[5]
    direct = tokenize_beats(src.signals[5], 250, max_beats=15)
    np.testing.assert_array_equal(item["tokens"].numpy(), direct.tokens)
    np.testing.assert_array_equal(item["valid"].numpy(), direct.valid)
    np.testing.assert_array_equal(item["time"].numpy(), direct.time)
    np.testing.assert_array_equal(item["labels"].numpy(), src.labels[5])
    assert len(TokenDataset(tmp_path / "c", split=None)) == N - 1
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    assert next(iter(loader))["tokens"].shape == (4, 12, 15, 96)
    import pickle

    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive: no arrays inside, re-mapped on use
    assert clone._arr is None and torch.equal(clone[4]["tokens"], item["tokens"])
    with pytest.raises(ValueError):
        TokenDataset(tmp_path / "c", split="dev")


def test_resume_after_a_killed_run(tmp_path):
    src = _fake_source()
    out = tmp_path / "c"
    build_cache(src, out, shard_size=3, progress=False)
    ref = {k: np.load(out / f"{k}.npy") for k in ("tokens", "valid", "time", "labels", "splits", "record_ids",
                                                  "offsets")}
    # Simulate a run killed midway: the final files and two shards never written, a half-written temp shard and a
    # damaged shard left behind.
    for name in ("meta.json", "tokens.npy", "labels.npy"):
        os.unlink(out / name)
    os.unlink(out / "shards" / "shard_00002.npz")
    (out / "shards" / "shard_00003.npz.tmpab12cd").write_bytes(b"PK\x03\x04 half a zip")
    (out / "shards" / "shard_00001.npz").write_bytes(b"not a zip at all")
    (out / "tokens.npy.tmpzz").write_bytes(b"\x93NUMPY partial")
    untouched = os.path.getmtime(out / "shards" / "shard_00000.npz")
    with pytest.raises(FileNotFoundError):
        TokenDataset(out)  # incomplete cache: no meta.json
    meta = build_cache(src, out, shard_size=3, progress=False)
    assert meta["n_records"] == N - 1 and meta["n_skipped"] == 1
    assert os.path.getmtime(out / "shards" / "shard_00000.npz") == untouched  # finished shard not redone
    assert not glob.glob(str(out / "**" / "*.tmp*"), recursive=True)
    for k, v in ref.items():
        np.testing.assert_array_equal(np.load(out / f"{k}.npy"), v)
    # a complete cache is left alone; other options refuse to mix
    assert build_cache(src, out, shard_size=3, progress=False)["created_utc"] == meta["created_utc"]
    with pytest.raises(ValueError, match="other options"):
        build_cache(src, out, shard_size=3, max_beats=20, progress=False)
    meta2 = build_cache(src, out, shard_size=3, max_beats=20, overwrite=True, progress=False)
    assert meta2["max_beats"] == 20 and TokenDataset(out, None)[0]["tokens"].shape == (12, 20, 96)


def test_worker_processes_give_the_same_cache(tmp_path):
    src = _fake_source()
    build_cache(src, tmp_path / "one", shard_size=4, workers=1, progress=False)
    build_cache(src, tmp_path / "two", shard_size=4, workers=2, progress=False)
    for k in ("tokens", "valid", "time", "record_ids"):
        np.testing.assert_array_equal(np.load(tmp_path / "one" / f"{k}.npy"), np.load(tmp_path / "two" / f"{k}.npy"))


def test_prepare_cinc_folder_skips_bad_records(tmp_path, capsys):
    d = need_ecg("cinc2021")
    root = tmp_path / "cinc"
    root.mkdir()
    for name in ("HR06000", "HR06001", "E07500", "E07503"):
        for ext in (".hea", ".mat"):
            os.symlink(d / (name + ext), root / (name + ext))  # linked, not copied
    (root / "BROKEN.hea").write_text("not a header\n")
    shutil.copy(d / "E07501.hea", root / "TRUNC.hea")
    (root / "TRUNC.hea").write_text((d / "E07501.hea").read_text().replace("E07501", "TRUNC"))
    (root / "TRUNC.mat").write_bytes((d / "E07501.mat").read_bytes()[:3000])
    rc = prepare.main(["--source", "cinc", "--root", str(root), "--out", str(tmp_path / "c"), "--workers", "1",
                       "--no-progress", "--max-beats", "20"])
    assert rc == 0
    meta = load_meta(tmp_path / "c")
    assert meta["n_total"] == 6 and meta["n_records"] == 4 and meta["skipped_by_kind"] == {"unreadable": 2}
    reasons = {s["record"]: s["reason"] for s in meta["skipped"]}
    assert sorted(reasons) == ["BROKEN", "TRUNC"]
    # Said in the record's terms, not as wfdb's "Samples were not loaded correctly".
    assert "signal file TRUNC.mat is truncated: 3000 bytes, the header's 5000 samples need 120024" in reasons["TRUNC"]
    assert "the header has no record line" in reasons["BROKEN"]
    assert "skipped 2" in capsys.readouterr().out
    ds = TokenDataset(tmp_path / "c", split=None)
    assert ds[0]["tokens"].shape == (12, 20, 96) and "SNR" in ds.class_names
    # sinus tachycardia record E07503 (> 100 bpm) has more than 16 beats in every lead; its label row says STach
    j = [ds.record_id(i) for i in range(len(ds))].index("E07503")
    counts = ds[j]["valid"].sum(1)
    assert bool((counts == counts[0]).all()) and 16 <= int(counts[0]) <= 20
    assert ds[j]["labels"][ds.class_names.index("STach")] == 1


def test_prepare_synthetic(tmp_path):
    rc = prepare.main(["--source", "synthetic", "--n-records", "24", "--out", str(tmp_path / "s"),
                       "--workers", "1", "--no-progress"])
    assert rc == 0
    meta = load_meta(tmp_path / "s")
    assert meta["n_total"] == 24 and meta["n_records"] + meta["n_skipped"] == 24


def test_prepare_ptbxl_folder(tmp_path):
    root = write_ptbxl_fixture(tmp_path / "ptbxl")
    out = tmp_path / "c"
    rc = prepare.main(["--source", "ptbxl", "--root", str(root), "--out", str(out), "--task", "superdiagnostic",
                       "--sampling-rate", "500", "--workers", "1", "--no-progress", "--bandpass"])
    assert rc == 0
    meta = load_meta(out)
    assert meta["class_names"] == ["HYP", "MI", "NORM", "STTC"] and meta["n_records"] == 4
    assert meta["split_counts"] == {"train": 2, "val": 1, "test": 1} and meta["bandpass"] is True
    assert meta["info"]["task"] == "superdiagnostic" and meta["info"]["sampling_rate"] == 500
    test = TokenDataset(out, split="test")
    assert len(test) == 1 and test.record_id(0) == "5"
    item = test[0]
    assert item["labels"].tolist() == [0, 0, 0, 1]
    assert int(item["valid"][0].sum()) == 11  # toy record: 11 beats, all tokenised, every lead valid
    assert bool((item["valid"].sum(1) == 11).all())


def _fake_generator():
    """A stand-in for clear_hug.data.synthetic with the agreed interface (records depend only on seed and index)."""
    import types

    from clear_hug.data.readers import stable_split

    def record(seed, k):
        rng = np.random.default_rng([seed, k])
        x, r = toy_ecg(100, rng.uniform(0.5, 1.2, 14), n_leads=12, seed=seed * 1000 + k)
        if k % 7 == 3:
            x[:] = 0.0  # a record with no beats, to be skipped
        return x[:, :1000], r[r < 1000], [k % 2, 1 - k % 2]

    def generate_dataset(n_records, seed, fs=100, duration_s=10.0, start=0):
        recs = [record(seed, start + k) for k in range(n_records)]
        return types.SimpleNamespace(signals=np.stack([a for a, _, _ in recs]).astype(np.float32), fs=100,
                                     labels=np.array([c for _, _, c in recs], np.float32), class_names=["x", "y"],
                                     rpeaks=[b for _, b, _ in recs],
                                     splits=np.array([stable_split(f"{seed}-{start + k}") for k in range(n_records)]))

    return types.SimpleNamespace(generate_dataset=generate_dataset)


def test_synthetic_source_shards_concatenate_exactly(tmp_path, monkeypatch):
    import sys

    from clear_hug.data.cache import synthetic_source

    monkeypatch.setitem(sys.modules, "clear_hug.data.synthetic", _fake_generator())
    outs = {}
    for shard_size in (6, 20):  # shards generated in the workers vs the whole dataset in one call
        src = synthetic_source(20, seed=5, use_true_rpeaks=True)
        meta = build_cache(src, tmp_path / str(shard_size), shard_size=shard_size, progress=False)
        assert meta["n_total"] == 20 and meta["skipped_by_kind"] == {"no_beats": 3}  # records 3, 10, 17
        outs[shard_size] = {k: np.load(tmp_path / str(shard_size) / f"{k}.npy") for k in
                            ("tokens", "valid", "labels", "splits", "record_ids")}
    for k in outs[6]:
        np.testing.assert_array_equal(outs[6][k], outs[20][k])
    assert outs[6]["labels"][:, 0].tolist() == [k % 2 for k in range(20) if k % 7 != 3]


def test_prepare_counts_and_skips_any_failing_record(tmp_path, capsys):
    d = need_ecg("cinc2021")
    root = tmp_path / "cinc"
    root.mkdir()
    for name in ("HR06000", "E07500"):
        for ext in (".hea", ".mat"):
            os.symlink(d / (name + ext), root / (name + ext))
    header = (d / "HR06001.hea").read_text().splitlines()
    for name, rate in (("RATE_TEXT", "abc"), ("RATE_HUGE", "1e12"), ("RATE_TINY", "0.001")):
        lines = [f"{name} 12 {rate} 5000"] + [s.replace("HR06001", name) for s in header[1:]]
        (root / f"{name}.hea").write_text("\n".join(lines) + "\n")
        os.symlink(d / "HR06001.mat", root / f"{name}.mat")
    rc = prepare.main(["--source", "cinc", "--root", str(root), "--out", str(tmp_path / "c"), "--workers", "1",
                       "--no-progress"])
    assert rc == 0
    meta = load_meta(tmp_path / "c")
    assert meta["n_records"] == 2 and meta["skipped_by_kind"] == {"unreadable": 3}
    reasons = {s["record"]: s["reason"] for s in meta["skipped"]}
    assert "'abc' is not a number" in reasons["RATE_TEXT"]
    assert "1e+12 Hz is outside" in reasons["RATE_HUGE"] and "0.001 Hz is outside" in reasons["RATE_TINY"]


def test_a_record_failing_in_an_unexpected_way_is_a_counted_skip(tmp_path):
    src = _fake_source()
    src.signals = list(src.signals)
    src.signals[2] = src.signals[2][:5]  # 5 leads where the tokeniser needs 12
    meta = build_cache(src, tmp_path / "c", shard_size=4, progress=False)
    assert meta["n_records"] == N - 2 and meta["skipped_by_kind"] == {"no_beats": 1, "failed": 1}
    failed = [s for s in meta["skipped"] if s["kind"] == "failed"]
    assert failed[0]["record"] == "fake000002" and "12" in failed[0]["reason"]


def test_empty_results_are_errors(tmp_path, capsys):
    def run(*args):
        rc = prepare.main([*args, "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
        return rc, capsys.readouterr()

    (tmp_path / "empty").mkdir()
    rc, io = run("--source", "cinc", "--root", str(tmp_path / "empty"))
    assert rc == 2 and "no WFDB records" in io.err
    ptbxl = write_ptbxl_fixture(tmp_path / "ptbxl")
    shutil.rmtree(ptbxl / "records500")
    rc, io = run("--source", "ptbxl", "--root", str(ptbxl), "--sampling-rate", "500")
    assert rc == 2 and "has no records500/" in io.err
    scipy_io = pytest.importorskip("scipy.io")
    cpsc = tmp_path / "cpsc2018"
    cpsc.mkdir()
    scipy_io.savemat(cpsc / "A0001.mat", {"ECG": {"sex": "Male", "age": 60, "data": np.zeros((12, 5000))}})
    rc, io = run("--source", "cinc", "--root", str(cpsc))
    assert rc == 2 and "original CPSC 2018" in io.err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("X1", "X2"):
        (broken / f"{name}.hea").write_text("not a header\n")
    rc, io = run("--source", "cinc", "--root", str(broken))
    assert rc == 2 and "none of the 2 records" in io.err and not (tmp_path / "out" / "meta.json").exists()


def test_array_source_refuses_an_implausible_rate():
    with pytest.raises(ValueError, match="sampling rate 0.001 Hz is outside"):
        ArraySource(np.zeros((2, 12, 1000)), 0.001, np.zeros((2, 1)), ["a"], [0, 0])
