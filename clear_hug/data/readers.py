"""Readers: WFDB records to canonical 12-lead arrays, and the PTB-XL and PhysioNet/CinC datasets.

``read_record`` is the single entry point from a file on disk to ``[12, T]`` float32 millivolts in the order of
``leads.LEADS``. The datasets only index records (paths, labels, splits); reading and tokenising happen later,
in worker processes, so building a dataset over 20,000 records takes seconds, not minutes.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .leads import LEADS, NUM_LEADS, map_leads
from .preprocess import check_sampling_rate, check_size
from .snomed import class_of

if TYPE_CHECKING:
    import pandas as pd

ECG_DIR_ENV = "CLEAR_HUG_ECG_DIR"


def shared_ecg_dir() -> Path:
    """The folder of real test records: ``$CLEAR_HUG_ECG_DIR``, else ``shared/ecg`` beside a source checkout."""
    env = os.environ.get(ECG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "ecg"


SPLIT_NAMES = ("train", "val", "test")
SPLIT_IDS = {name: i for i, name in enumerate(SPLIT_NAMES)}


class RecordReadError(ValueError):
    """A record that cannot be read: missing, unparsable, truncated or otherwise corrupt."""


# ---------------------------------------------------------------------------------------------------------------
# Single records
# ---------------------------------------------------------------------------------------------------------------

_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}


def _record_base(path) -> str:
    """WFDB wants the record name without extension; accept ``x``, ``x.hea``, ``x.mat`` and ``x.dat``."""
    p = str(path)
    for ext in (".hea", ".mat", ".dat"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def parse_header_comments(comments: Sequence[str]) -> dict[str, object]:
    """Age, sex and ``Dx`` SNOMED codes from WFDB header comment lines (CinC style ``Age: 59``, PTB ``age: 81``).

    Missing or unparsable values become None (age, sex) or an empty list (dx); codes that are not integers are
    skipped rather than failing the record, since the label table keeps unknown codes anyway.
    """
    out: dict[str, object] = {"age": None, "sex": None, "dx": []}
    for line in comments:
        m = re.match(r"\s*#?\s*([A-Za-z]+)\s*:\s*(.*)$", str(line))
        if not m:
            continue
        key, value = m.group(1).lower(), m.group(2).strip()
        if key == "age":
            try:
                age = float(value)
                out["age"] = None if np.isnan(age) else age
            except ValueError:
                pass
        elif key == "sex":
            v = value.lower()
            out["sex"] = "M" if v.startswith("m") else "F" if v.startswith("f") else None
        elif key == "dx":
            codes = []
            for tok in re.split(r"[,\s]+", value):
                if tok.isdigit():
                    codes.append(int(tok))
            out["dx"] = codes
    return out


_RATE = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_FORMAT = re.compile(r"(\d+)(?:x(\d+))?(?::\d+)?(?:\+(\d+))?")
_BYTES_PER_SAMPLE = {8: 1, 80: 1, 16: 2, 61: 2, 160: 2, 212: 1.5, 310: 4 / 3, 311: 4 / 3, 24: 3, 32: 4}


def _header_rate(base: str) -> tuple[float, int | None]:
    """The sampling rate and samples per channel that the record line of ``base.hea`` declares, checked.

    Read here, not by wfdb, which falls back to 250 Hz when the rate field is missing or unreadable and reads
    "1e12" as 1 and "5x0" as 5. The size is checked against the rate, and against the signal files on disk,
    before wfdb allocates anything (so a truncated file is named as such, not as "cannot reshape array").
    """
    try:
        with open(base + ".hea", encoding="utf-8", errors="replace") as fh:
            lines = [t for t in (raw.strip() for raw in fh) if t and not t.startswith("#")]
    except OSError as exc:
        raise RecordReadError(f"{base}: cannot open the header ({exc})") from exc
    fields = lines[0].split() if lines else []
    if len(fields) < 2 or not fields[1].isdigit():
        raise RecordReadError(f"{base}: the header has no record line (name, number of signals, sampling rate)")
    if len(fields) < 3:
        raise RecordReadError(f"{base}: the header gives no sampling rate (wfdb would silently assume 250 Hz)")
    rate = fields[2].split("/")[0]  # "500/1000(0)": sampling rate / counter frequency (base counter value)
    if not _RATE.fullmatch(rate):
        raise RecordReadError(f"{base}: the header's sampling-rate field {fields[2]!r} is not a number")
    try:
        fs = check_sampling_rate(float(rate))
        n_samples = int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else None
        if n_samples is not None:
            check_size(n_samples, int(fields[1]), fs)
    except ValueError as exc:
        raise RecordReadError(f"{base}: {exc}") from exc
    if n_samples is not None:
        _check_signal_files(base, lines[1:1 + int(fields[1])], n_samples)
    return fs, n_samples


def _check_signal_files(base: str, signal_lines: Sequence[str], n_samples: int) -> None:
    """RecordReadError when a signal file is missing or shorter than the header's samples need (known formats)."""
    need: dict[str, float] = {}
    for line in signal_lines:
        parts = line.split()
        m = _FORMAT.fullmatch(parts[1]) if len(parts) > 1 else None
        if m is None or int(m.group(1)) not in _BYTES_PER_SAMPLE:
            return  # a format not checked here (compressed, say): wfdb reports what it finds
        per_frame = _BYTES_PER_SAMPLE[int(m.group(1))] * int(m.group(2) or 1)
        need[parts[0]] = need.get(parts[0], int(m.group(3) or 0)) + per_frame * n_samples
    for name, size in need.items():
        path = os.path.join(os.path.dirname(base), name)
        if not os.path.exists(path):
            raise RecordReadError(f"{base}: signal file {name} named by the header is missing")
        have = os.path.getsize(path)
        if have < int(size):
            raise RecordReadError(f"{base}: signal file {name} is truncated: {have} bytes, the header's "
                                  f"{n_samples} samples need {int(size)}")


def read_record(path: str | os.PathLike) -> tuple[np.ndarray, float, dict[str, object]]:
    """Read one WFDB record (``.dat`` or the CinC ``.mat`` variant) as ``(signal [12, T] float32 mV, fs, meta)``.

    Leads are put in the canonical order by name (case-insensitive); leads the file lacks are zeros and listed
    in ``meta["missing_leads"]``; extra channels (PTB's Frank leads, say) are ignored. ``meta`` holds
    ``record``, ``lead_names`` (as in the file), ``missing_leads``, ``age``, ``sex`` and ``dx`` (list of int).
    Raises ``RecordReadError`` for anything that cannot be read, and for a sampling rate or length that no ECG
    has (see ``preprocess.check_sampling_rate``), before reading the samples.
    """
    import wfdb  # local import: keeps `import clear_hug.data` light for users of the token cache only

    base = _record_base(path)
    if not os.path.exists(base + ".hea"):
        raise RecordReadError(f"{base}: header file {base}.hea not found")
    fs, _ = _header_rate(base)
    try:
        rec = wfdb.rdrecord(base, physical=True)
    except Exception as exc:  # wfdb raises many types (ValueError, HeaderSyntaxError, OSError, IndexError...)
        raise RecordReadError(f"{base}: cannot read record ({type(exc).__name__}: {exc})") from exc
    sig = rec.p_signal
    if sig is None or sig.ndim != 2 or sig.shape[0] == 0:
        raise RecordReadError(f"{base}: record has no samples")
    if rec.sig_len is not None and sig.shape[0] != rec.sig_len:
        raise RecordReadError(f"{base}: truncated, {sig.shape[0]} of {rec.sig_len} samples")
    if not rec.fs or abs(float(rec.fs) - fs) > 1e-9 * fs:
        raise RecordReadError(f"{base}: wfdb read the sampling rate as {rec.fs}, the header says {fs:g} Hz")
    names = list(rec.sig_name or [])
    units = list(rec.units or [""] * len(names))
    idx = map_leads(names)
    out = np.zeros((NUM_LEADS, sig.shape[0]), dtype=np.float32)
    for ch, (i, unit) in enumerate(zip(idx, units)):
        if i is None:
            continue
        scale = _UNIT_TO_MV.get(str(unit or "").strip().lower(), 1.0)
        out[i] = sig[:, ch] * scale
    present = {i for i in idx if i is not None}
    if not present:
        raise RecordReadError(f"{base}: none of the leads {names} is one of the 12 standard leads")
    meta: dict[str, object] = {
        "record": os.path.basename(base),
        "lead_names": names,
        "missing_leads": [LEADS[i] for i in range(NUM_LEADS) if i not in present],
    }
    meta.update(parse_header_comments(rec.comments or []))
    return out, fs, meta


def _header_comments(base: str) -> list[str]:
    """Comment lines of a ``.hea`` file, read as text (much faster than parsing the whole header)."""
    try:
        with open(base + ".hea", encoding="utf-8", errors="replace") as fh:
            return [line[1:].strip() for line in fh if line.startswith("#")]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------------------
# Datasets (indexes of records with labels and splits)
# ---------------------------------------------------------------------------------------------------------------


class RecordIndex:
    """Common shape of the datasets: parallel lists of record ids, paths, multi-hot labels and split ids."""

    source = "records"

    def __init__(self, record_ids: Sequence[str], paths: Sequence[str], labels: np.ndarray,
                 class_names: Sequence[str], splits: np.ndarray) -> None:
        self.record_ids: list[str] = list(record_ids)
        self.paths: list[str] = list(paths)
        self.labels = np.asarray(labels, dtype=np.float32).reshape(len(self.paths), len(class_names))
        self.class_names: list[str] = list(class_names)
        self.splits = np.asarray(splits, dtype=np.int8)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """``(signal, fs, meta, labels)`` of record ``i``, read from disk."""
        signal, fs, meta = read_record(self.paths[i])
        return signal, fs, meta, self.labels[i]

    def indices(self, split: str) -> np.ndarray:
        """Positions of the records of one split (``"train"``, ``"val"`` or ``"test"``)."""
        return np.nonzero(self.splits == SPLIT_IDS[split])[0]

    def use_split_file(self, path: str | os.PathLike) -> None:
        """Replace the splits by a published one: a CSV with columns ``record`` and ``split`` (train, val or
        test). Every record of the index must be listed (records of the file that are not here are ignored)."""
        import csv

        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"record", "split"} <= set(reader.fieldnames):
                raise ValueError(f"split file {path} must have the columns 'record' and 'split', got "
                                 f"{reader.fieldnames}")
            table = {}
            for line, row in enumerate(reader, start=2):
                if row["split"] not in SPLIT_IDS:
                    raise ValueError(f"split file {path}, line {line}: split {row['split']!r} is not one of "
                                     f"{SPLIT_NAMES}")
                table[row["record"]] = SPLIT_IDS[row["split"]]
        absent = [r for r in self.record_ids if r not in table]
        if absent:
            raise ValueError(f"split file {path} does not list {len(absent)} of the {len(self)} records "
                             f"(first: {absent[:5]})")
        self.splits = np.array([table[r] for r in self.record_ids], dtype=np.int8)


PTBXL_TASKS = ("superdiagnostic", "subdiagnostic", "diagnostic", "form", "rhythm", "all")


def ptbxl_labels(scp_codes: dict[str, float], statements: pd.DataFrame, task: str) -> list[str]:
    """Labels of one PTB-XL record for a benchmark task, aggregated the standard way (Strodthoff et al. 2021).

    Every code in ``scp_codes`` counts, whatever its likelihood. superdiagnostic / subdiagnostic: diagnostic
    statements mapped to their ``diagnostic_class`` / ``diagnostic_subclass``; diagnostic / form / rhythm: the
    codes flagged ``diagnostic`` / ``form`` / ``rhythm`` themselves; all: every statement of the table.
    """
    out = set()
    for code in scp_codes:
        if code not in statements.index:
            continue
        row = statements.loc[code]
        if task == "all":
            out.add(code)
        elif task in ("superdiagnostic", "subdiagnostic"):
            if _flag(row.get("diagnostic")):
                col = "diagnostic_class" if task == "superdiagnostic" else "diagnostic_subclass"
                value = row.get(col)
                if isinstance(value, str) and value:
                    out.add(value)
        elif _flag(row.get(task)):
            out.add(code)
    return sorted(out)


def _flag(value) -> bool:
    try:
        return float(value) == 1.0
    except (TypeError, ValueError):
        return False


class PTBXLDataset(RecordIndex):
    """PTB-XL over ``ptbxl_database.csv``, ``scp_statements.csv`` and ``records100/`` or ``records500/``.

    ``labels`` are multi-hot over ``class_names`` (the task's labels that occur, sorted); splits follow
    ``strat_fold``: 1-8 train, 9 val, 10 test (the dataset's folds keep each patient in one fold, so the splits
    are patient-level). Records without any label for the task are left out, as in the
    benchmark (set ``drop_empty=False`` to keep them with all-zero labels).
    """

    source = "ptbxl"

    def __init__(self, root: str | os.PathLike, sampling_rate: int = 100, task: str = "superdiagnostic",
                 drop_empty: bool = True) -> None:
        import pandas as pd

        if sampling_rate not in (100, 500):
            raise ValueError(f"sampling_rate must be 100 or 500, got {sampling_rate}")
        if task not in PTBXL_TASKS:
            raise ValueError(f"task must be one of {PTBXL_TASKS}, got {task!r}")
        root = Path(root)
        db_path, st_path = root / "ptbxl_database.csv", root / "scp_statements.csv"
        for p in (db_path, st_path):
            if not p.exists():
                raise FileNotFoundError(f"PTB-XL file not found: {p}")
        folder = root / f"records{sampling_rate}"
        if not folder.is_dir():
            raise FileNotFoundError(f"PTB-XL folder {root} has no {folder.name}/ (the records at "
                                    f"sampling_rate={sampling_rate} Hz)")
        db = pd.read_csv(db_path)
        statements = pd.read_csv(st_path, index_col=0)
        col = "filename_lr" if sampling_rate == 100 else "filename_hr"
        ids, paths, label_sets, splits = [], [], [], []
        for row in db.itertuples(index=False):
            codes = ast.literal_eval(row.scp_codes) if isinstance(row.scp_codes, str) else {}
            labels = ptbxl_labels(codes, statements, task)
            if drop_empty and not labels:
                continue
            fold = int(row.strat_fold)
            ids.append(str(int(row.ecg_id)))
            paths.append(str(root / getattr(row, col)))
            label_sets.append(labels)
            splits.append(0 if fold <= 8 else 1 if fold == 9 else 2)
        if not paths:
            raise ValueError(f"{db_path} lists no record with a label for the {task!r} task")
        class_names = sorted({c for s in label_sets for c in s})
        pos = {c: i for i, c in enumerate(class_names)}
        y = np.zeros((len(paths), len(class_names)), dtype=np.float32)
        for r, s in enumerate(label_sets):
            y[r, [pos[c] for c in s]] = 1.0
        super().__init__(ids, paths, y, class_names, splits)
        self.task = task
        self.sampling_rate = sampling_rate


def stable_split(name: str, val: float = 0.1, test: float = 0.1) -> int:
    """A split id from a hash of the record name: the same record lands in the same split on every machine."""
    # md5, not crc32: crc32 is linear, so sequential names (E07500, E07501...) fall into a regular pattern.
    u = int.from_bytes(hashlib.md5(name.encode("utf-8")).digest()[:8], "little") / 2**64
    return 2 if u < test else 1 if u < test + val else 0


def _is_cpsc2018_original(path: Path) -> bool:
    """Whether a ``.mat`` file is a record of the original CPSC 2018 release (a struct variable named ``ECG``)."""
    from scipy.io import whosmat
    from scipy.io.matlab import MatReadError

    try:
        return any(name == "ECG" and cls == "struct" for name, _, cls in whosmat(str(path)))
    except (MatReadError, ValueError, OSError):  # not a MATLAB file scipy can list, so not that format
        return False


class CinCFolderDataset(RecordIndex):
    """A folder (searched recursively) of PhysioNet/CinC records labelled by their ``# Dx:`` SNOMED codes.

    ``label_set="all"``: a class per code, named by ``snomed.SNOMED_NAMES`` (unknown codes keep their number);
    ``"cinc2021"``: the CinC 2021 challenge's scored classes with equivalent codes merged (other codes ignored).
    ``class_names`` are the classes that occur, sorted. The challenge data has no official split, so each record
    gets a stable hash split (80/10/10).
    """

    source = "cinc"

    def __init__(self, root: str | os.PathLike, val: float = 0.1, test: float = 0.1,
                 label_set: str = "all") -> None:
        class_of("0", label_set)  # checks label_set before any file is read
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"CinC folder not found: {root}")
        headers = sorted(root.rglob("*.hea"))
        if not headers:
            mats = sorted(root.rglob("*.mat"))
            if mats and _is_cpsc2018_original(mats[0]):
                raise ValueError(
                    f"{root} holds the original CPSC 2018 release ({mats[0].name}: a MATLAB struct 'ECG', no WFDB "
                    "headers), which is not read here: it has no header with the sampling rate and its labels "
                    "are in a separate REFERENCE.csv. Use the PhysioNet/CinC 2020 or 2021 copy of CPSC 2018 "
                    "(WFDB .hea + .mat with SNOMED codes), e.g. its 'cpsc_2018' folder")
            raise ValueError(f"{root} holds no WFDB records (no .hea header files)"
                             + (f"; its {len(mats)} .mat files have no headers" if mats else ""))
        ids, paths, label_sets, splits = [], [], [], []
        for h in headers:
            base = str(h)[:-4]
            meta = parse_header_comments(_header_comments(base))
            ids.append(h.stem)
            paths.append(base)
            label_sets.append(sorted({c for c in (class_of(code, label_set) for code in meta["dx"]) if c}))
            splits.append(stable_split(h.stem, val, test))
        class_names = sorted({c for s in label_sets for c in s})
        pos = {c: i for i, c in enumerate(class_names)}
        y = np.zeros((len(paths), len(class_names)), dtype=np.float32)
        for r, s in enumerate(label_sets):
            if s:
                y[r, [pos[c] for c in s]] = 1.0
        super().__init__(ids, paths, y, class_names, splits)
