"""Tokenised datasets on disk: built in worker processes, written atomically, resumable, memory-mapped.

Records are ragged: a 10 s strip has ~12 beats, a Holter excerpt thousands. The beats of all items (records, or
windows of records) are stored one after another, beat-major, with a length index::

    manifest.json          what is being built (source, options); a rerun with other options refuses to mix
    shards/shard_00000.npz one unit of work (``shard_size`` records), written to a temp file then os.replace'd
    tokens.npy  float32 [beats_total, 12, 96]   valid.npy bool [beats_total, 12]   time.npy int32 [beats_total]
    beat_labels.npy uint8 [beats_total, K]      per-beat multi-hot labels (K = 0 without per-beat labels)
    offsets.npy int64 [N + 1]                   item i is rows offsets[i]:offsets[i + 1] (the length index)
    labels.npy splits.npy record_ids.npy starts.npy   per item (starts: window start in seconds, 0 for records)
    meta.json              class names, counts, skipped records, dropped beats; written last: "complete"

All arrays are plain ``.npy`` (memory-mapped, loaded without pickle). ``max_beats`` caps the beats kept per item
(the rest are counted in ``beats_dropped``); None keeps every beat. ``window_s``/``stride_s`` cut long records
into windows, each an item.

A killed run leaves finished shards plus at most some ``*.tmp*`` files; the rerun deletes the temp files, skips the
finished shards and does the rest. A record that fails (cannot be read, has no beats, or anything else goes wrong
with it) is logged, counted and skipped with its reason; the job goes on. A cache without any record is an error.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time as _time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import Episode, episode_labels, read_annotations
from .leads import NUM_LEADS
from .preprocess import check_sampling_rate
from .readers import SPLIT_IDS, SPLIT_NAMES, RecordIndex, RecordReadError, read_record
from .tokenize import TARGET_FS, TOKEN_LEN, BeatTokens, NoBeatsError, _check_max_beats, split_windows, tokenize_beats

log = logging.getLogger("clear_hug.data.cache")

BEAT_ARRAYS = ("tokens", "valid", "time", "beat_labels")
ITEM_ARRAYS = ("offsets", "labels", "splits", "record_ids", "starts")
ARRAYS = BEAT_ARRAYS + ITEM_ARRAYS
FORMAT_VERSION = 3  # 3: ragged items (beat rows + offsets), per-beat labels, windows


# ---------------------------------------------------------------------------------------------------------------
# Sources: what the cache builder tokenises
# ---------------------------------------------------------------------------------------------------------------


class Source:
    """A list of records with labels and splits. ``payload(indices)`` is what a worker needs to tokenise them.

    A payload is a list of items, ``("path", path, annotation_extension_or_None)`` (the worker reads the file)
    or ``("array", signal, fs, rpeaks_or_None, episodes_or_None)`` (records in memory), or one
    ``("synthetic", ...)`` tuple with which the worker generates the records itself, together with their labels
    and splits (then the source's ``labels`` and ``splits`` are None and the shard files carry them).

    ``beat_class_names`` (rhythm names such as ``"AFIB"``) turn on per-beat labels: each tokenised beat is
    labelled by the rhythm episodes its R peak falls in, and an item's labels are then "any beat of the class"
    over those names (so a window's label follows the beats inside it).
    """

    name = "source"

    def __init__(self, record_ids: Sequence[str], labels: np.ndarray | None, class_names: Sequence[str],
                 splits: np.ndarray | None, info: dict | None = None,
                 beat_class_names: Sequence[str] = ()) -> None:
        self.record_ids = [str(r) for r in record_ids]
        self.beat_class_names = [str(c) for c in beat_class_names]
        if self.beat_class_names:
            class_names, labels = self.beat_class_names, None  # item labels come from the beats
        n, c = len(self.record_ids), len(class_names)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32).reshape(n, c)
        self.class_names = list(class_names)
        self.splits = None if splits is None else np.asarray(splits, dtype=np.int8)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.record_ids)

    def payload(self, indices: Sequence[int]) -> list[tuple]:
        raise NotImplementedError


class PathSource(Source):
    """Records on disk, from a ``RecordIndex`` (``PTBXLDataset``, ``CinCFolderDataset``)."""

    def __init__(self, index: RecordIndex, name: str, info: dict | None = None, limit: int | None = None,
                 annotations: str | None = None, beat_class_names: Sequence[str] = ()) -> None:
        n = len(index) if limit is None else min(limit, len(index))
        if beat_class_names and not annotations:
            raise ValueError("beat_class_names needs annotations (the WFDB annotation extension, e.g. 'atr')")
        info = {**(info or {}), "annotations": annotations}
        super().__init__(index.record_ids[:n], index.labels[:n], index.class_names, index.splits[:n], info,
                         beat_class_names)
        self.paths = index.paths[:n]
        self.name, self.annotations = name, annotations

    def payload(self, indices: Sequence[int]) -> list[tuple]:
        return [("path", self.paths[i], self.annotations) for i in indices]


class ArraySource(Source):
    """Records held in memory: ``signals`` [N, 12, T] (or a list of [12, T_i]) at one rate ``fs``.

    ``episodes`` (per record, a list of ``annotations.Episode``) label beats with ``beat_class_names``."""

    def __init__(self, signals: np.ndarray | Sequence[np.ndarray], fs: float, labels: np.ndarray | None,
                 class_names: Sequence[str], splits: np.ndarray | None, record_ids: Sequence[str] | None = None,
                 rpeaks: Sequence[np.ndarray] | None = None, name: str = "arrays", info: dict | None = None,
                 episodes: Sequence[Sequence[Episode]] | None = None,
                 beat_class_names: Sequence[str] = ()) -> None:
        n = len(signals)
        ids = record_ids if record_ids is not None else [f"{name}{i:06d}" for i in range(n)]
        if beat_class_names and episodes is None:
            raise ValueError("beat_class_names needs episodes (the rhythm episodes of each record)")
        super().__init__(ids, labels, class_names, splits, info, beat_class_names)
        self.signals, self.fs, self.rpeaks, self.name, self.episodes = (
            signals, check_sampling_rate(fs), rpeaks, name, episodes)

    def payload(self, indices: Sequence[int]) -> list[tuple]:
        return [("array", np.asarray(self.signals[i]), self.fs, None if self.rpeaks is None else self.rpeaks[i],
                 None if self.episodes is None else self.episodes[i]) for i in indices]


class SyntheticSource(Source):
    """The built-in generator, run inside the workers shard by shard: nothing is generated in the parent.

    ``kind="strips"``: ``synthetic.generate_dataset`` (10 s strips, record labels); ``kind="long"``:
    ``synthetic.long.generate_long_dataset`` (records of minutes with paroxysmal episodes, per-beat labels).
    Either must return records ``k .. k + n_records - 1`` of dataset ``seed`` for ``start=k`` (so shards
    concatenate to exactly the records of one big call).
    """

    name = "synthetic"

    def __init__(self, n_records: int, seed: int, class_names: Sequence[str], use_true_rpeaks: bool = False,
                 kind: str = "strips", options: dict | None = None, beat_class_names: Sequence[str] = ()) -> None:
        if kind not in ("strips", "long"):
            raise ValueError(f"kind must be 'strips' or 'long', got {kind!r}")
        ids = [f"syn{seed}_{i:06d}" if kind == "strips" else f"long{seed}_{i:06d}" for i in range(n_records)]
        info = {"seed": seed, "n_records": n_records, "true_rpeaks": use_true_rpeaks}
        if kind == "long":
            info.update(kind=kind, **(options or {}))
        super().__init__(ids, None, class_names, None, info, beat_class_names)
        self.seed, self.use_true_rpeaks, self.kind, self.options = seed, use_true_rpeaks, kind, dict(options or {})
        if kind == "long":
            self.name = "synthetic_long"

    def payload(self, indices: Sequence[int]) -> tuple:
        indices = list(indices)
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise ValueError("synthetic shards must be contiguous")
        return ("synthetic", self.kind, self.seed, indices[0], len(indices), self.use_true_rpeaks, self.options)


def synthetic_source(n_records: int, seed: int = 0, use_true_rpeaks: bool = False) -> Source:
    """The built-in generator's records (``clear_hug.data.synthetic.generate_dataset``) as a source, generated
    shard by shard in the workers, so memory does not grow with ``n_records``."""
    from .synthetic import generate_dataset

    probe = generate_dataset(n_records=1, seed=seed)
    return SyntheticSource(n_records, seed, probe.class_names, use_true_rpeaks)


def long_synthetic_source(n_records: int, seed: int = 0, use_true_rpeaks: bool = True, **options) -> Source:
    """Long synthetic records with paroxysmal AF and ectopic runs (``synthetic.long``), labelled per beat."""
    from .synthetic.long import BEAT_CLASSES

    return SyntheticSource(n_records, seed, BEAT_CLASSES, use_true_rpeaks, kind="long", options=options,
                           beat_class_names=BEAT_CLASSES)


# ---------------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Options:
    """How items are cut from records (travels to the workers)."""

    max_beats: int | None
    bandpass: bool
    window_s: float | None
    stride_s: float | None
    beat_classes: tuple[str, ...]


def _generated_items(payload):
    """Run the generator of a ``("synthetic", ...)`` payload: array items, labels and splits of its records."""
    _, kind, seed, start, count, true_rpeaks, options = payload
    if kind == "long":
        from .synthetic.long import generate_long_dataset

        ds = generate_long_dataset(n_records=count, seed=seed, start=start, **options)
        episodes = ds.episodes
    else:
        from .synthetic import generate_dataset

        ds = generate_dataset(n_records=count, seed=seed, start=start)
        episodes = [None] * count
    items = [("array", ds.signals[k], ds.fs, ds.rpeaks[k] if true_rpeaks else None, episodes[k])
             for k in range(count)]
    return items, np.asarray(ds.labels, np.float32), np.asarray(ds.splits, np.int8)


def _tokenize_item(item, opt: _Options):
    """One record to ``[(start_s, BeatTokens, beat_labels, n_dropped)]`` (one entry, or one per window) and the
    number of windows left out for having no beat."""
    if item[0] == "path":
        _, path, ann_ext = item
        signal, fs, meta = read_record(path)
        rpeaks, missing = None, meta["missing_leads"]
        episodes = read_annotations(path, ann_ext).episodes if ann_ext else None
    else:
        _, signal, fs, rpeaks, episodes = item
        missing = None
    cap = None if opt.window_s else opt.max_beats
    bt = tokenize_beats(signal, fs, max_beats=cap, rpeaks=rpeaks, bandpass=opt.bandpass, missing_leads=missing)
    n_kept = min(len(bt.rpeaks), bt.tokens.shape[1])
    whole = type(bt)(tokens=bt.tokens[:, :n_kept], valid=bt.valid[:, :n_kept], time=bt.time[:, :n_kept],
                     rpeaks=bt.rpeaks[:n_kept], flat=bt.flat)
    if opt.window_s:
        duration = np.asarray(signal).shape[-1] / float(fs)
        windows = split_windows(whole, opt.window_s, opt.stride_s or opt.window_s, duration)
        n_windows = max(1, int(np.ceil((duration - opt.window_s) / (opt.stride_s or opt.window_s) - 1e-9)) + 1)
        empty = n_windows - len(windows)
    else:
        windows, empty = [(0.0, whole)], 0
    out = []
    for start, w in windows:
        dropped = bt.n_dropped
        if opt.window_s and opt.max_beats is not None and w.tokens.shape[1] > opt.max_beats:
            m = opt.max_beats
            dropped = w.tokens.shape[1] - m
            w = type(w)(tokens=w.tokens[:, :m], valid=w.valid[:, :m], time=w.time[:, :m], rpeaks=w.rpeaks[:m],
                        flat=w.flat)
        labels = episode_labels(np.asarray(w.rpeaks) / TARGET_FS, episodes or [], opt.beat_classes)
        out.append((start, w, labels, int(dropped)))
    return out, empty


def item_rows(start: float, bt: BeatTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The beat-major rows an item of ``bt`` (starting ``start`` seconds into its record) is stored as:
    ``tokens [n, 12, 96]``, ``valid [n, 12]``, ``time [n]`` (see ``item_tensors`` for the way back)."""
    # Beat-major: an item is a contiguous block of rows. The R peak's second is shared by the leads; stored once.
    time = ((np.asarray(bt.rpeaks) - int(round(start * TARGET_FS))) // TARGET_FS).astype(np.int32)
    return bt.tokens.transpose(1, 0, 2), bt.valid.T, time


def _tokenize_payload(payload, positions: list[int], opt: _Options) -> dict:
    """Worker body: tokenise one shard into the arrays of its items (see ``_write_shard``).

    Any failure of one record is a skip of that record: kind "unreadable" or "no_beats" for the expected ones,
    "failed" (with the exception's type) for the rest, so that one odd record never ends a job of thousands
    halfway.
    """
    gen_labels = gen_splits = None
    if isinstance(payload, tuple) and payload[0] == "synthetic":
        payload, gen_labels, gen_splits = _generated_items(payload)
    pos_l, start_l, len_l, drop_l, toks, vals, times, blabs, skipped = [], [], [], [], [], [], [], [], []
    empty_windows = 0
    for pos, item in zip(positions, payload):
        try:
            items, empty = _tokenize_item(item, opt)
        except RecordReadError as exc:
            skipped.append((pos, "unreadable", str(exc)))
            continue
        except NoBeatsError as exc:
            skipped.append((pos, "no_beats", str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 -- counted and reported with its reason, see the docstring
            skipped.append((pos, "failed", f"{type(exc).__name__}: {exc}"))
            continue
        empty_windows += empty
        for start, bt, labels, dropped in items:
            pos_l.append(pos)
            start_l.append(start)
            len_l.append(bt.tokens.shape[1])
            drop_l.append(dropped)
            rows = item_rows(start, bt)
            toks.append(rows[0])
            vals.append(rows[1])
            times.append(rows[2])
            blabs.append(labels)
    k = len(opt.beat_classes)
    cat = lambda xs, shape, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt)  # noqa: E731
    return {
        "kept": np.asarray(pos_l, np.int64), "starts": np.asarray(start_l, np.float64),
        "lengths": np.asarray(len_l, np.int64), "dropped": np.asarray(drop_l, np.int64),
        "tokens": cat(toks, (0, NUM_LEADS, TOKEN_LEN), np.float32), "valid": cat(vals, (0, NUM_LEADS), bool),
        "time": cat(times, (0,), np.int32), "beat_labels": cat(blabs, (0, k), np.uint8),
        "empty_windows": np.int64(empty_windows), "skipped": skipped, "gen_labels": gen_labels,
        "gen_splits": gen_splits,
    }


# ---------------------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file in the same folder, then rename it over ``path`` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)

    _atomic_write(path, w)


def _write_npz(path: Path, **arrays) -> None:
    def w(tmp):
        with open(tmp, "wb") as fh:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(fh, **arrays)

    _atomic_write(path, w)


def _save_npy(tmp: str, arr: np.ndarray) -> None:
    with open(tmp, "wb") as fh:  # a file object, so numpy does not append ".npy" to the temp name
        np.save(fh, arr, allow_pickle=False)


_SHARD_KEYS = ("kept", "starts", "lengths", "dropped", "tokens", "valid", "time", "beat_labels", "empty_windows",
               "skipped", "labels", "splits", "first")


def _load_shard(path: Path):
    """A finished shard, or None when it is missing or unreadable (then it is simply redone)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in _SHARD_KEYS}
    except Exception as exc:  # a damaged or older shard is recomputed, never trusted
        log.warning("shard %s unreadable (%s); recomputing it", path.name, exc)
        return None


# ---------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------


def build_cache(source: Source, out_dir: str | os.PathLike, *, max_beats: int | None = 15, bandpass: bool = False,
                workers: int = 1, shard_size: int = 256, overwrite: bool = False, progress: bool = True,
                window_s: float | None = None, stride_s: float | None = None) -> dict:
    """Tokenise ``source`` into ``out_dir`` (see the module docstring) and return the ``meta.json`` content.

    ``max_beats=None`` keeps every beat; with a cap the beats after it are counted (``beats_dropped``), logged
    and reported. ``window_s`` cuts records into windows of that many seconds every ``stride_s`` (default: no
    overlap); each window is an item, and ``max_beats`` then caps the beats of a window.

    Raises ValueError for a source without records, and for one of which no record could be tokenised.
    """
    if len(source) == 0:
        raise ValueError(f"source {source.name!r} has no records: an empty dataset cannot be cached")
    _check_max_beats(max_beats)
    for name, v in (("window_s", window_s), ("stride_s", stride_s)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise ValueError(f"{name} must be a positive number of seconds or None, got {v!r}")
    if stride_s is not None and window_s is None:
        raise ValueError("stride_s needs window_s")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    opt = _Options(max_beats=None if max_beats is None else int(max_beats), bandpass=bool(bandpass),
                   window_s=window_s, stride_s=stride_s, beat_classes=tuple(source.beat_class_names))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    config = {"format": FORMAT_VERSION, "source": source.name, "info": source.info, "n_total": len(source),
              "max_beats": opt.max_beats, "bandpass": opt.bandpass, "shard_size": int(shard_size),
              "window_s": window_s, "stride_s": stride_s, "class_names": source.class_names,
              "beat_class_names": source.beat_class_names}
    manifest = out / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old != config:
            if not overwrite:
                raise ValueError(f"{out} holds a cache built with other options ({old}); "
                                 "use another folder or overwrite=True / --overwrite")
            for p in shard_dir.glob("shard_*"):
                p.unlink()
            for name in ARRAYS:
                (out / f"{name}.npy").unlink(missing_ok=True)
            (out / "meta.json").unlink(missing_ok=True)
    elif overwrite:
        (out / "meta.json").unlink(missing_ok=True)
    _write_json(manifest, config)
    # Leftovers of a killed run: temp files are never valid, remove them.
    for p in list(out.glob("*.tmp*")) + list(shard_dir.glob("*.tmp*")):
        p.unlink()
    if (out / "meta.json").exists() and not overwrite:
        log.info("%s is complete; nothing to do", out)
        return json.loads((out / "meta.json").read_text())

    n = len(source)
    n_shards = (n + shard_size - 1) // shard_size
    shard_path = lambda s: shard_dir / f"shard_{s:05d}.npz"  # noqa: E731
    todo = [s for s in range(n_shards) if _load_shard(shard_path(s)) is None]
    log.info("%d records in %d shards, %d to do", n, n_shards, len(todo))

    def positions(s: int) -> list[int]:
        return list(range(s * shard_size, min((s + 1) * shard_size, n)))

    def save(s: int, result: dict) -> None:
        pos = positions(s)
        labels = source.labels[pos] if source.labels is not None else result["gen_labels"]
        splits = source.splits[pos] if source.splits is not None else result["gen_splits"]
        if source.beat_class_names:
            labels = np.zeros((len(pos), 0), np.float32)  # item labels come from the beats at the merge
        if labels is None or splits is None or len(labels) != len(pos):
            raise RuntimeError(f"shard {s}: no labels/splits for its {len(pos)} records")
        skipped = result["skipped"]
        skipped_arr = np.array([json.dumps(list(x)) for x in skipped], dtype=str) if skipped else np.zeros(0, "<U1")
        # Labels and splits of all the shard's records travel with it (a generated source has them only here).
        arrays = {k: result[k] for k in _SHARD_KEYS if k in result and k != "skipped"}
        _write_npz(shard_path(s), **arrays, skipped=skipped_arr, labels=np.asarray(labels, np.float32),
                   splits=np.asarray(splits, np.int8), first=np.int64(pos[0] if pos else 0))
        for p, kind, reason in skipped:
            log.warning("skipped %s (%s): %s", source.record_ids[p], kind, reason)

    bar = _progress(sum(len(positions(s)) for s in todo), progress)
    if workers <= 1 or len(todo) <= 1:
        for s in todo:
            pos = positions(s)
            save(s, _tokenize_payload(source.payload(pos), pos, opt))
            bar.update(len(pos))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {}
            for s in todo:
                pos = positions(s)
                futures[pool.submit(_tokenize_payload, source.payload(pos), pos, opt)] = s
            for fut in as_completed(futures):
                s = futures[fut]
                save(s, fut.result())
                bar.update(len(positions(s)))
    bar.close()
    return _merge(source, out, n_shards, shard_path, config)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="tokenising", disable=not enabled)


def _write_rows(path: Path, shards: list[dict], key: str, shape_tail: tuple[int, ...], dtype) -> None:
    """Stream one beat array, shard by shard, into a memory-mapped temp file, then rename it into place: the
    merge never holds a dataset of hours in memory."""
    total = int(sum(len(sh[key]) for sh in shards))

    def w(tmp):
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,) + shape_tail)
        at = 0
        for sh in shards:
            rows = sh[key]
            arr[at:at + len(rows)] = rows
            at += len(rows)
        arr.flush()
        del arr

    _atomic_write(path, w)


def _merge(source: Source, out: Path, n_shards: int, shard_path, config: dict) -> dict:
    """Concatenate the shards into the final memory-mappable arrays, then write meta.json last."""
    shards = [_load_shard(shard_path(s)) for s in range(n_shards)]
    if any(sh is None for sh in shards):
        raise RuntimeError("a shard disappeared during the merge")
    kept = np.concatenate([sh["kept"] for sh in shards])
    skipped = [json.loads(s) for sh in shards for s in sh["skipped"]]
    skipped_list = [{"record": source.record_ids[p], "kind": kd, "reason": r} for p, kd, r in skipped]
    if len(kept) == 0:  # before any array is written: an empty cache must not look complete
        kinds = dict(Counter(s["kind"] for s in skipped_list))
        first = "; ".join(f"{s['record']}: {s['reason']}" for s in skipped_list[:3])
        raise ValueError(f"none of the {len(source)} records of the {source.name} source could be tokenised "
                         f"(skipped {kinds}; first: {first})")
    k = len(source.beat_class_names)
    for key, tail, dt in (("tokens", (NUM_LEADS, TOKEN_LEN), np.float32), ("valid", (NUM_LEADS,), bool),
                          ("time", (), np.int32), ("beat_labels", (k,), np.uint8)):
        _write_rows(out / f"{key}.npy", shards, key, tail, dt)
    lengths = np.concatenate([sh["lengths"] for sh in shards])
    starts = np.concatenate([sh["starts"] for sh in shards])
    dropped = np.concatenate([sh["dropped"] for sh in shards])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if k:
        # An item carries a class when any of its beats does ("AF somewhere in this window / record").
        beat_labels = np.concatenate([sh["beat_labels"] for sh in shards])
        labels = (np.maximum.reduceat(beat_labels, offsets[:-1], axis=0) if len(kept) else
                  np.zeros((0, k), np.uint8)).astype(np.float32)
    else:
        labels = np.concatenate([sh["labels"][sh["kept"] - sh["first"]] for sh in shards]).astype(np.float32)
    splits = np.concatenate([sh["splits"][sh["kept"] - sh["first"]] for sh in shards]).astype(np.int8)
    windowed = config["window_s"] is not None
    ids = [source.record_ids[p] + (f"@{s:g}s" if windowed else "") for p, s in zip(kept, starts)]
    items = {"offsets": offsets, "labels": labels, "splits": splits, "record_ids": np.asarray(ids, dtype=str),
             "starts": starts}
    for name, arr in items.items():
        _atomic_write(out / f"{name}.npy", lambda tmp, a=arr: _save_npy(tmp, a))
    n_items = int(len(kept))
    beats_dropped = int(dropped.sum())
    if beats_dropped:
        log.warning("max_beats=%s left out %d beats of %d items (kept %d); use max_beats=None or windows to keep "
                    "them", config["max_beats"], beats_dropped, int((dropped > 0).sum()), int(lengths.sum()))
    n_valid = int(np.load(out / "valid.npy", mmap_mode="r").sum()) if n_items else 0
    meta = {
        "format": FORMAT_VERSION,
        "source": source.name,
        "info": source.info,
        "class_names": source.class_names,
        "beat_class_names": source.beat_class_names,
        "n_total": len(source),
        "n_records": n_items,
        "n_skipped": len(skipped_list),
        "skipped_by_kind": dict(Counter(s["kind"] for s in skipped_list)),
        "skipped": skipped_list,
        "split_counts": {name: int((splits == i).sum()) for name, i in SPLIT_IDS.items()},
        "class_counts": {c: int(v) for c, v in zip(source.class_names, labels.sum(axis=0))},
        "max_beats": config["max_beats"],
        "window_s": config["window_s"],
        "stride_s": config["stride_s"],
        "windows_without_beats": int(sum(int(sh["empty_windows"]) for sh in shards)),
        "beats_total": int(lengths.sum()),
        "beats_dropped": beats_dropped,
        "items_capped": int((dropped > 0).sum()),
        "beats_per_item": {"min": int(lengths.min()) if n_items else 0,
                           "median": float(np.median(lengths)) if n_items else 0.0,
                           "max": int(lengths.max()) if n_items else 0},
        "token_len": TOKEN_LEN,
        "fs": 100,
        "bandpass": config["bandpass"],
        "valid_tokens_per_record": float(n_valid / max(n_items, 1)),
        "created_utc": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime()),
    }
    _write_json(out / "meta.json", meta)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Reading a cache
# ---------------------------------------------------------------------------------------------------------------


def load_meta(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{cache_dir} is not a complete token cache (no meta.json); run prepare")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{cache_dir} is a token cache of format {meta.get('format')}, this version reads "
                         f"format {FORMAT_VERSION}; rebuild it (clear-hug prepare --overwrite)")
    return meta


class TokenDataset(Dataset):
    """A token cache as a torch Dataset over one split (``"train"``, ``"val"``, ``"test"``, or None for all).

    Arrays are memory-mapped, so opening a cache of any size is instant and workers share the page cache.
    Items are dicts: ``tokens [12, n, 96] float32``, ``valid [12, n] bool``, ``time [12, n] int64``,
    ``labels [C] float32`` and ``beat_labels [n, K] float32``, where ``n`` is the item's beat count, or
    ``max_beats`` for a capped cache (shorter items padded, so fixed-size batches stack). Batch ragged items
    with ``pad_collate``; ``lengths`` feeds a length-bucketing sampler.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str | None = "train") -> None:
        self.cache_dir = Path(cache_dir)
        self.meta = load_meta(cache_dir)
        self.class_names: list[str] = list(self.meta["class_names"])
        self.beat_class_names: list[str] = list(self.meta.get("beat_class_names", []))
        self.pad_to: int | None = self.meta["max_beats"]
        self._arr: dict[str, np.ndarray] | None = None
        self._pid = None
        splits = np.load(self.cache_dir / "splits.npy")
        if split is None:
            self.indices = np.arange(len(splits))
        elif split in SPLIT_IDS:
            self.indices = np.nonzero(splits == SPLIT_IDS[split])[0]
        else:
            raise ValueError(f"split must be one of {SPLIT_NAMES} or None, got {split!r}")
        offsets = np.load(self.cache_dir / "offsets.npy")
        self.lengths = np.diff(offsets)[self.indices]  # beats per item, for bucketing and token budgets

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The memory-mapped arrays, opened lazily once per process (DataLoader workers map their own)."""
        if self._arr is None or self._pid != os.getpid():
            self._arr = {name: np.load(self.cache_dir / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
            self._pid = os.getpid()
        return self._arr

    def __getstate__(self):
        # Pickled into worker processes without the maps: a pickled memmap would be copied as a whole array.
        state = dict(self.__dict__)
        state["_arr"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def record_id(self, i: int) -> str:
        return str(self.arrays["record_ids"][self.indices[i]])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.indices[i])
        a = self.arrays
        lo, hi = int(a["offsets"][j]), int(a["offsets"][j + 1])
        item = item_tensors(a["tokens"][lo:hi], a["valid"][lo:hi], a["time"][lo:hi], self.pad_to)
        beat_labels = np.zeros((item["tokens"].shape[1], a["beat_labels"].shape[1]), np.float32)
        beat_labels[: hi - lo] = a["beat_labels"][lo:hi]
        item["labels"] = torch.from_numpy(np.array(a["labels"][j], dtype=np.float32))
        item["beat_labels"] = torch.from_numpy(beat_labels)
        return item


def item_tensors(tokens: np.ndarray, valid: np.ndarray, time: np.ndarray,
                 pad_to: int | None) -> dict[str, torch.Tensor]:
    """Beat-major rows of one item (``tokens [n, 12, 96]``, ``valid [n, 12]``, ``time [n]``) as the model's
    lead-major inputs ``tokens [12, w, 96]``, ``valid [12, w]``, ``time [12, w]``, padded to ``w = max(n,
    pad_to)``. The one place a cached item and a record read by ``predict`` become model inputs, so both give
    the model the same numbers."""
    n = len(tokens)
    width = max(n, pad_to or 0)
    tok = np.zeros((NUM_LEADS, width, TOKEN_LEN), np.float32)
    val = np.zeros((NUM_LEADS, width), bool)
    tim = np.zeros((NUM_LEADS, width), np.int64)
    tok[:, :n] = np.asarray(tokens).transpose(1, 0, 2)
    val[:, :n] = np.asarray(valid).T
    tim[:, :n] = np.where(val[:, :n], np.asarray(time, np.int64)[None, :], 0)
    return {"tokens": torch.from_numpy(tok), "valid": torch.from_numpy(val), "time": torch.from_numpy(tim)}


def pad_collate(items: Sequence[dict]) -> dict:
    """Stack dataset items of different beat counts, padding each to the longest of the batch (padding tokens
    are invalid, so the model and the losses ignore them)."""
    import torch

    if not items:
        raise ValueError("pad_collate needs at least one item")
    width = max(int(it["tokens"].shape[1]) for it in items)
    out = {}
    for key in items[0]:
        rows = []
        for it in items:
            x = it[key]
            axis = 1 if key in ("tokens", "valid", "time") else 0 if key == "beat_labels" else None
            if axis is not None and x.shape[axis] < width:
                pad = [0, 0] * (x.dim() - axis - 1) + [0, width - x.shape[axis]]
                x = torch.nn.functional.pad(x, pad)
            rows.append(x)
        out[key] = torch.stack(rows)
    return out
