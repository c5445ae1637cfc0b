import glob
import os
import shutil

import numpy as np
import pytest
from _ecgdata import PTBXL_NAMES, need_ecg, toy_ecg, write_ptbxl_fixture
from _ecgdata import write_record as _write

from clear_hug.data.leads import LEADS, lead_index, map_leads
from clear_hug.data.readers import (
    CinCFolderDataset,
    PTBXLDataset,
    RecordReadError,
    parse_header_comments,
    read_record,
    stable_split,
)
from clear_hug.data.snomed import SNOMED_NAMES, snomed_name

wfdb = pytest.importorskip("wfdb")

def test_lead_names():
    assert LEADS[3] == "aVR" and len(LEADS) == 12
    assert lead_index("AVR") == 3 and lead_index("avf") == 5 and lead_index(" V6 ") == 11
    assert lead_index("MLII") == 1 and lead_index("vx") is None
    assert map_leads(["II", "ii", "V1"]) == [1, None, 6]  # duplicate lead keeps only its first channel


def test_header_comments():
    m = parse_header_comments(["Age: 59", "Sex: Female", "Dx: 164934002,426783006", "Rx: Unknown"])
    assert m == {"age": 59.0, "sex": "F", "dx": [164934002, 426783006]}
    m = parse_header_comments(["age: NaN", "sex: male"])
    assert m["age"] is None and m["sex"] == "M" and m["dx"] == []


def test_every_cinc2021_record():
    d = need_ecg("cinc2021")
    heas = sorted(glob.glob(str(d / "*.hea")))
    assert len(heas) == 30
    for hea in heas:
        sig, fs, meta = read_record(hea)  # with extension, too
        assert sig.shape == (12, 5000) and sig.dtype == np.float32 and fs == 500.0
        assert meta["missing_leads"] == [] and meta["record"] == os.path.basename(hea)[:-4]
        assert meta["sex"] in ("M", "F") and len(meta["dx"]) >= 1
        assert all(isinstance(c, int) for c in meta["dx"])
        # millivolts: a QRS is tenths of a mV to a few mV, never thousands (adu) or thousandths (V)
        amp = np.percentile(np.ptp(sig, axis=1), 50)
        assert 0.2 < amp < 10, (hea, amp)
    # the header's lead I equals our row 0 (order kept), converted from adu at 1000 adu/mV
    rec = wfdb.rdrecord(str(d / "HR06000"), physical=False)
    sig, _, _ = read_record(d / "HR06000")
    np.testing.assert_allclose(sig[0], rec.d_signal[:, 0] / 1000.0, atol=1e-6)


def test_ptb_lowercase_leads_and_extra_channels():
    d = need_ecg("ptbdb")
    sig, fs, meta = read_record(d / "s0010_re")
    assert sig.shape == (12, 38400) and fs == 1000.0 and meta["missing_leads"] == []
    assert meta["lead_names"][12:] == ["vx", "vy", "vz"] and meta["age"] == 81.0


def test_missing_lead_is_zeros_and_named(tmp_path):
    x, _ = toy_ecg(250, [0.8] * 8, n_leads=8)
    names = ["i", "II", "v1", "V2", "v3", "V4", "V5", "v6"]  # limb leads III, aVR, aVL, aVF absent
    base = _write(tmp_path, "rec8", x, 250, names, comments=["Age: 40", "Sex: Male", "Dx: 426783006"])
    sig, fs, meta = read_record(base)
    assert meta["missing_leads"] == ["III", "aVR", "aVL", "aVF"]
    assert np.all(sig[2:6] == 0)
    np.testing.assert_allclose(sig[6], x[2], atol=1e-3)  # file channel 2 (v1) -> canonical row 6
    assert meta["dx"] == [426783006] and meta["age"] == 40.0


def test_microvolt_units_are_converted(tmp_path):
    x, _ = toy_ecg(100, [0.8] * 5, n_leads=12)
    base = _write(tmp_path, "uv", x * 1000.0, 100, PTBXL_NAMES, units="uV", gain=1.0)
    sig, _, _ = read_record(base)
    np.testing.assert_allclose(sig, x, atol=2e-3)


def test_corrupt_and_truncated_records(tmp_path):
    with pytest.raises(RecordReadError):
        read_record(tmp_path / "nothing_here")
    (tmp_path / "garbage.hea").write_text("this is not a header\n###\n")
    with pytest.raises(RecordReadError):
        read_record(tmp_path / "garbage")
    x, _ = toy_ecg(100, [0.8] * 8, n_leads=12)
    base = _write(tmp_path, "trunc", x, 100, PTBXL_NAMES)
    data = open(base + ".dat", "rb").read()
    with open(base + ".dat", "wb") as fh:
        fh.write(data[: len(data) // 3])
    with pytest.raises(RecordReadError, match="trunc"):
        read_record(base)
    # a header whose leads are none of the 12
    _write(tmp_path, "frank", x[:3], 100, ["vx", "vy", "vz"])
    with pytest.raises(RecordReadError, match="standard leads"):
        read_record(tmp_path / "frank")
    assert issubclass(RecordReadError, ValueError)


def test_truncated_cinc_mat_record(tmp_path):
    d = need_ecg("cinc2021")
    shutil.copy(d / "HR06000.hea", tmp_path / "HR06000.hea")  # a temporary copy, outside the repository
    with open(tmp_path / "HR06000.mat", "wb") as fh:
        fh.write(open(d / "HR06000.mat", "rb").read()[:4000])
    with pytest.raises(RecordReadError, match="HR06000"):
        read_record(tmp_path / "HR06000")


# --- PTB-XL layout ------------------------------------------------------------------------------------------

@pytest.fixture
def ptbxl_root(tmp_path):
    return write_ptbxl_fixture(tmp_path)


def _labels(ds):
    return {rid: sorted(c for c, v in zip(ds.class_names, row) if v) for rid, row in zip(ds.record_ids, ds.labels)}


def test_ptbxl_tasks_and_folds(ptbxl_root):
    sup = PTBXLDataset(ptbxl_root, 100, "superdiagnostic")
    assert sup.class_names == ["HYP", "MI", "NORM", "STTC"]
    assert _labels(sup) == {"1": ["NORM"], "2": ["MI"], "3": ["HYP", "STTC"], "5": ["STTC"]}
    assert list(sup.splits) == [0, 0, 1, 2]
    assert list(sup.indices("test")) == [3]
    sub = PTBXLDataset(ptbxl_root, 100, "subdiagnostic")
    assert sub.class_names == ["AMI", "IMI", "LVH", "NORM", "STTC"]
    assert _labels(sub)["2"] == ["AMI", "IMI"]
    form = PTBXLDataset(ptbxl_root, 100, "form")
    assert form.class_names == ["ABQRS", "NDT", "PVC"]
    assert _labels(form) == {"2": ["ABQRS"], "3": ["NDT"], "4": ["PVC"], "5": ["NDT"]}
    rhy = PTBXLDataset(ptbxl_root, 100, "rhythm")
    assert rhy.class_names == ["AFIB", "SR"] and rhy.record_ids == ["1", "2", "3", "4"]
    assert list(rhy.splits) == [0, 0, 1, 2]
    keep = PTBXLDataset(ptbxl_root, 100, "rhythm", drop_empty=False)
    assert len(keep) == 5 and keep.labels[4].sum() == 0


def test_ptbxl_records_both_rates(ptbxl_root):
    for rate in (100, 500):
        ds = PTBXLDataset(ptbxl_root, rate, "superdiagnostic")
        sig, fs, meta, y = ds[0]
        expected, _ = toy_ecg(rate, [0.85] * 10, n_leads=12, seed=1)
        assert fs == rate and sig.shape == expected.shape
        np.testing.assert_allclose(sig, expected, atol=1e-3)
        assert meta["missing_leads"] == []  # "AVR" etc. matched case-insensitively
        assert y.tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError):
        PTBXLDataset(ptbxl_root, 250)
    with pytest.raises(ValueError):
        PTBXLDataset(ptbxl_root, 100, task="nonsense")


def test_ptbxl_all_and_diagnostic_tasks(ptbxl_root):
    diag = PTBXLDataset(ptbxl_root, 100, "diagnostic")
    assert diag.class_names == ["ASMI", "IMI", "LVH", "NDT", "NORM"]
    assert _labels(diag) == {"1": ["NORM"], "2": ["ASMI", "IMI"], "3": ["LVH", "NDT"], "5": ["NDT"]}
    every = PTBXLDataset(ptbxl_root, 100, "all")
    assert every.class_names == ["ABQRS", "AFIB", "ASMI", "IMI", "LVH", "NDT", "NORM", "PVC", "SR"]
    assert _labels(every)["5"] == ["NDT"] and len(every) == 5  # the unknown code is not a statement


def test_split_file_replaces_the_splits(ptbxl_root, tmp_path):
    ds = PTBXLDataset(ptbxl_root, 100, "rhythm")
    path = tmp_path / "split.csv"
    path.write_text("record,split\n1,test\n2,val\n3,train\n4,train\n99,test\n")
    ds.use_split_file(path)
    assert list(ds.splits) == [2, 1, 0, 0]
    path.write_text("record,split\n1,test\n2,val\n")
    with pytest.raises(ValueError, match="does not list 2 of the 4 records"):
        ds.use_split_file(path)
    path.write_text("record,split\n1,holdout\n")
    with pytest.raises(ValueError, match="line 2: split 'holdout'"):
        ds.use_split_file(path)
    path.write_text("name,fold\n1,1\n")
    with pytest.raises(ValueError, match="columns 'record' and 'split'"):
        ds.use_split_file(path)


def test_cinc2021_scored_classes_merge_equivalent_codes(tmp_path):
    x, _ = toy_ecg(500, [0.85] * 10, n_leads=12, seed=0)
    for name, dx in (("a", "59118001,284470004"), ("b", "713427006,63593006,164873001"), ("c", "426783006")):
        _write(tmp_path, name, x, 500, PTBXL_NAMES, comments=[f"Dx: {dx}"])
    ds = CinCFolderDataset(tmp_path, label_set="cinc2021")
    assert ds.class_names == ["CRBBB|RBBB", "PAC|SVPB", "SNR"]  # LVH (164873001) is not scored
    assert _labels(ds) == {"a": ["CRBBB|RBBB", "PAC|SVPB"], "b": ["CRBBB|RBBB", "PAC|SVPB"], "c": ["SNR"]}
    assert CinCFolderDataset(tmp_path).class_names == ["CRBBB", "LVH", "PAC", "RBBB", "SNR", "SVPB"]
    with pytest.raises(ValueError, match="label_set"):
        CinCFolderDataset(tmp_path, label_set="cinc2020")


def test_every_code_of_the_shared_records_has_a_name():
    d = need_ecg("cinc2021")
    codes = {c for h in d.glob("*.hea") for c in parse_header_comments(
        [line[1:] for line in h.read_text().splitlines() if line.startswith("#")])["dx"]}
    assert codes and [c for c in codes if snomed_name(c) == str(c)] == []


def test_cinc_folder_dataset():
    d = need_ecg("cinc2021")
    ds = CinCFolderDataset(d)
    assert len(ds) == 30 and ds.class_names == sorted(ds.class_names)
    for i in range(len(ds.record_ids)):
        _, _, meta = read_record(ds.paths[i])
        expected = sorted({snomed_name(c) for c in meta["dx"]})
        assert sorted(c for c, v in zip(ds.class_names, ds.labels[i]) if v) == expected
    assert "SNR" in ds.class_names and "STach" in ds.class_names
    assert set(np.unique(ds.splits)) <= {0, 1, 2} and (ds.splits == 0).mean() > 0.5


def test_snomed_table():
    for code in (426783006, 427084000, 426177001, 284470004, 427172004, 164889003, 164934002, 59931005, 698252002,
                 164873001, 270492004, 59118001, 713427006, 164909002, 733534002, 713426002, 39732003):
        assert code in SNOMED_NAMES
    assert snomed_name(164889003) == "AF" and snomed_name(999999) == "999999"
    assert len(set(SNOMED_NAMES.values())) == len(SNOMED_NAMES)  # one name per code, no accidental clashes
    assert stable_split("E07500") == stable_split("E07500")


def _with_record_line(tmp_path, name, record_line):
    """A copy of real record HR06000 (header rewritten, signal file linked) whose record line is ``record_line``."""
    d = need_ecg("cinc2021")
    lines = (d / "HR06000.hea").read_text().splitlines()
    lines[0] = record_line.format(name=name)
    (tmp_path / f"{name}.hea").write_text("\n".join(lines).replace("HR06000.mat", f"{name}.mat") + "\n")
    if not (tmp_path / f"{name}.mat").exists():
        os.symlink(d / "HR06000.mat", tmp_path / f"{name}.mat")
    return tmp_path / name


@pytest.mark.parametrize("line,reason", [
    ("{name} 12 abc 5000", "sampling-rate field 'abc' is not a number"),  # wfdb: 250 Hz
    ("{name} 12 5x0 5000", "sampling-rate field '5x0' is not a number"),  # wfdb: 5 Hz
    ("{name} 12 -500 5000", "sampling-rate field '-500' is not a number"),  # wfdb: 250 Hz
    ("{name} 12", "gives no sampling rate"),  # wfdb: 250 Hz
    ("{name} 12 1e12 5000", "sampling rate 1e\\+12 Hz is outside the plausible range"),  # wfdb: 1 Hz
    ("{name} 12 0.001 5000", "sampling rate 0.001 Hz is outside the plausible range"),
])
def test_unreadable_or_implausible_sampling_rate_is_refused(tmp_path, line, reason):
    base = _with_record_line(tmp_path, "rate", line)
    with pytest.raises(RecordReadError, match=reason):
        read_record(base)


def test_sizes_are_checked_before_reading(tmp_path):
    # 10^10 samples of 12 leads would be 960 GB of float64: refused from the header alone.
    base = _with_record_line(tmp_path, "huge", "{name} 12 500 10000000000")
    with pytest.raises(RecordReadError, match="more than the .* values one record may hold"):
        read_record(base)
    base = _with_record_line(tmp_path, "long", "{name} 12 500 6000")  # the .mat holds 5000 samples
    with pytest.raises(RecordReadError, match=r"long.mat is truncated: 120024 bytes, the header's 6000 samples"):
        read_record(base)
    sig, fs, _ = read_record(_with_record_line(tmp_path, "fine", "{name} 12 500/1000 5000"))
    assert fs == 500.0 and sig.shape == (12, 5000)
