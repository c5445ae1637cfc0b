"""Class probabilities for ECG records read straight from disk, without a token cache.

``Classifier.from_pretrained(DIR).predict_record(path)`` and ``clear-hug predict --model DIR INPUT...``. A record
becomes model inputs through the same functions as a record of a token cache (``cache._tokenize_item``,
``item_rows``, ``item_tensors``) with the preprocessing the model's ``config.json`` names, so a record scores the
same here as in ``clear-hug evaluate``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data.cache import _Options, _tokenize_item, item_rows, item_tensors, pad_collate
from .data.preprocess import TARGET_FS
from .data.readers import RecordReadError, _record_base
from .data.tokenize import TOKEN_LEN, NoBeatsError

if TYPE_CHECKING:
    from .heads import Classifier


def check_preprocessing(prep: dict) -> dict:
    """The preprocessing of a model's ``config.json``, checked: predict can only repeat what it names."""
    if not isinstance(prep, dict):
        raise TypeError(f"preprocessing must be a dict, got {type(prep).__name__}")
    missing = [k for k in ("bandpass", "max_beats") if k not in prep]
    if missing:
        raise ValueError(f"the model's preprocessing does not say {missing}, so records cannot be tokenised as it "
                         "was trained (save it with the preprocessing of its token cache)")
    if prep.get("fs", TARGET_FS) != TARGET_FS or prep.get("token_len", TOKEN_LEN) != TOKEN_LEN:
        raise ValueError(f"the model expects {prep.get('fs')} Hz tokens of {prep.get('token_len')} samples; this "
                         f"version makes {TARGET_FS} Hz tokens of {TOKEN_LEN}")
    if prep.get("window_s"):
        raise ValueError(f"the model was trained on {prep['window_s']} s windows of records; predict scores whole "
                         "records only")
    return prep


def record_inputs(path: str | os.PathLike, preprocessing: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """One record on disk as model inputs (``tokens``, ``valid``, ``time`` without a batch axis) and facts about
    it (``beats``, ``beats_dropped``, ``rpeaks`` at 100 Hz). Raises ``RecordReadError`` or ``NoBeatsError``."""
    prep = check_preprocessing(preprocessing)
    opt = _Options(max_beats=prep["max_beats"], bandpass=bool(prep["bandpass"]), window_s=None, stride_s=None,
                   beat_classes=())
    (start, bt, _, dropped), = _tokenize_item(("path", str(path), None), opt)[0]
    item = item_tensors(*item_rows(start, bt), prep["max_beats"])
    return item, {"beats": int(bt.tokens.shape[1]), "beats_dropped": int(dropped), "rpeaks": np.asarray(bt.rpeaks)}


def find_records(inputs: Sequence[os.PathLike]) -> tuple[list[tuple[str, str]], list[dict]]:
    """``(record id, base path)`` of every record named by ``inputs`` (records, folders searched recursively for
    ``.hea`` headers, or a PTB-XL root with ``ptbxl_database.csv``), and the inputs that name no record."""
    records, missing = [], []
    for given in inputs:
        p = Path(given)
        if p.is_dir() and (p / "ptbxl_database.csv").is_file():
            column = "filename_lr" if (p / "records100").is_dir() else "filename_hr"
            with open(p / "ptbxl_database.csv", newline="") as fh:
                records += [(str(row["ecg_id"]), str(p / row[column])) for row in csv.DictReader(fh)]
        elif p.is_dir():
            headers = sorted(p.rglob("*.hea"))
            if not headers:
                missing.append({"record": str(p), "reason": "folder holds no WFDB header (.hea)"})
            records += [(h.stem, str(h)[:-4]) for h in headers]
        else:
            base = _record_base(p)
            if os.path.exists(base + ".hea"):
                records.append((Path(base).name, base))
            else:
                missing.append({"record": str(p), "reason": f"no such record ({base}.hea not found)"})
    return records, missing


@torch.no_grad()
def predict_records(model: Classifier, records: Sequence[tuple[str, str]],
                    device: str | torch.device | None = None, batch_size: int = 64,
                    progress: bool = False) -> tuple[list[dict], list[dict]]:
    """Rows ``{"record", "path", "beats", "beats_dropped", "probabilities": {class: p}}`` of the records that
    could be read, and ``{"record", "reason"}`` for each that could not (a named skip, never a guess)."""
    from tqdm.auto import tqdm

    names = _class_names(model)
    check_preprocessing(model.preprocessing)  # a model-level problem is an error, not a skip of every record
    device = torch.device(device or next(model.parameters()).device)
    model = model.to(device).eval()
    rows, skipped, batch = [], [], []

    def flush() -> None:
        inputs = pad_collate([item for item, _ in batch])
        probs = torch.sigmoid(model(inputs["tokens"].to(device), inputs["valid"].to(device),
                                    inputs["time"].to(device)).float()).cpu().numpy()
        for (_, row), p in zip(batch, probs):
            rows.append({**row, "probabilities": {c: float(v) for c, v in zip(names, p)}})
        batch.clear()

    for record, path in tqdm(records, desc="predict", unit="rec", disable=not progress):
        try:
            item, facts = record_inputs(path, model.preprocessing)
        except (RecordReadError, NoBeatsError) as exc:
            skipped.append({"record": record, "path": path, "reason": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 -- as in the cache builder: one odd record is a named skip
            skipped.append({"record": record, "path": path, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        batch.append((item, {"record": record, "path": path, "beats": facts["beats"],
                             "beats_dropped": facts["beats_dropped"]}))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return rows, skipped


def _class_names(model) -> list[str]:
    names = getattr(model, "class_names", None)
    if names is None or not hasattr(model, "preprocessing"):
        raise ValueError("the classifier has no class names or preprocessing; load it with "
                         "Classifier.from_pretrained(DIR), which reads them from DIR/config.json")
    return list(names)


def predict_record(model: Classifier, path: str | os.PathLike,
                   device: str | torch.device | None = None) -> dict:
    """One record's row (see ``predict_records``); a record that cannot be read raises ``RecordReadError``."""
    base = _record_base(path)
    rows, skipped = predict_records(model, [(Path(base).name, base)], device)
    if skipped:
        raise RecordReadError(skipped[0]["reason"])
    return rows[0]


def write_predictions(rows: Sequence[dict], class_names: Sequence[str], path: os.PathLike,
                      extra: dict | None = None) -> tuple[Path, Path]:
    """``path`` as CSV (one row per record, a column per class) and beside it the same as JSON (with ``extra``,
    e.g. the skipped records). Returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fixed = [k for k in ("record", "path", "beats", "beats_dropped") if rows and k in rows[0]]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fixed + list(class_names))
        for r in rows:
            w.writerow([r[k] for k in fixed] + [f"{r['probabilities'][c]:.6g}" for c in class_names])
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps({"class_names": list(class_names), "records": list(rows), **(extra or {})},
                                    indent=1, allow_nan=False))
    return path, json_path


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import predict_parser

    args = predict_parser().parse_args(argv)
    from .checkpoint import from_pretrained

    model = from_pretrained(args.model, kind="classifier")
    records, missing = find_records(args.inputs)
    if not records:
        raise ValueError(f"no records found in {list(args.inputs)}: " + "; ".join(m["reason"] for m in missing))
    rows, skipped = predict_records(model, records, args.device, progress=args.progress)
    skipped = missing + skipped
    for s in skipped:
        print(f"skipped {s['record']}: {s['reason']}", file=sys.stderr)
    csv_path, json_path = write_predictions(rows, model.class_names, args.out, {"skipped": skipped})
    print(f"predicted {len(rows)} records, skipped {len(skipped)}; wrote {csv_path} and {json_path}")
    if args.plot:
        from .plot import plot_prediction

        for row in rows:
            plot_prediction(model, row, Path(args.plot) / f"{row['record']}.png")
        print(f"wrote {len(rows)} plots to {args.plot}")
    return 0 if rows else 2
