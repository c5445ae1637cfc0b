"""Tokenised datasets on disk: built in worker processes, written atomically, resumable, memory-mapped.

Layout of a cache folder::

    manifest.json          what is being built (source, options); a rerun with other options refuses to mix
    shards/shard_00000.npz one unit of work (``shard_size`` records), written to a temp file then os.replace'd
    tokens.npy valid.npy time.npy labels.npy splits.npy record_ids.npy   the merged arrays (memory-mappable)
    meta.json              class names, counts, skipped records; written last, so its presence means "complete"

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
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .preprocess import check_sampling_rate
from .readers import SPLIT_IDS, SPLIT_NAMES, RecordIndex, RecordReadError, read_record
from .tokenize import TOKEN_LEN, NoBeatsError, tokenize_beats
from .leads import NUM_LEADS

log = logging.getLogger("clear_hug.data.cache")

ARRAYS = ("tokens", "valid", "time", "labels", "splits", "record_ids")
FORMAT_VERSION = 2  # 2: shards carry the labels and splits of their records


# ---------------------------------------------------------------------------------------------------------------
# Sources: what the cache builder tokenises
# ---------------------------------------------------------------------------------------------------------------


class Source:
    """A list of records with labels and splits. ``payload(indices)`` is what a worker needs to tokenise them.

    A payload is a list of items, ``("path", path)`` (the worker reads the file) or
    ``("array", signal, fs, rpeaks_or_None)`` (records in memory), or one ``("synthetic", ...)`` tuple with
    which the worker generates the records itself, together with their labels and splits (then the source's
    ``labels`` and ``splits`` are None and the shard files carry them).
    """

    name = "source"

    def __init__(self, record_ids, labels, class_names, splits, info: Optional[Dict] = None):
        self.record_ids = [str(r) for r in record_ids]
        n, c = len(self.record_ids), len(class_names)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32).reshape(n, c)
        self.class_names = list(class_names)
        self.splits = None if splits is None else np.asarray(splits, dtype=np.int8)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.record_ids)

    def payload(self, indices: Sequence[int]) -> List[tuple]:
        raise NotImplementedError


class PathSource(Source):
    """Records on disk, from a ``RecordIndex`` (``PTBXLDataset``, ``CinCFolderDataset``)."""

    def __init__(self, index: RecordIndex, name: str, info: Optional[Dict] = None, limit: Optional[int] = None):
        n = len(index) if limit is None else min(limit, len(index))
        super().__init__(index.record_ids[:n], index.labels[:n], index.class_names, index.splits[:n], info)
        self.paths = index.paths[:n]
        self.name = name

    def payload(self, indices):
        return [("path", self.paths[i]) for i in indices]


class ArraySource(Source):
    """Records held in memory: ``signals`` [N, 12, T] (or a list of [12, T_i]) at one rate ``fs``."""

    def __init__(self, signals, fs, labels, class_names, splits, record_ids=None, rpeaks=None, name="arrays",
                 info: Optional[Dict] = None):
        n = len(signals)
        ids = record_ids if record_ids is not None else [f"{name}{i:06d}" for i in range(n)]
        super().__init__(ids, labels, class_names, splits, info)
        self.signals, self.fs, self.rpeaks, self.name = signals, check_sampling_rate(fs), rpeaks, name

    def payload(self, indices):
        return [("array", np.asarray(self.signals[i]), self.fs, None if self.rpeaks is None else self.rpeaks[i])
                for i in indices]


class SyntheticSource(Source):
    """The built-in generator, run inside the workers shard by shard: nothing is generated in the parent.

    Needs ``generate_dataset(n_records, seed, ..., start=k)`` to return records ``k .. k + n_records - 1`` of
    dataset ``seed`` (so shards concatenate to exactly the records of one big call).
    """

    name = "synthetic"

    def __init__(self, n_records: int, seed: int, class_names, use_true_rpeaks: bool = False):
        ids = [f"syn{seed}_{i:06d}" for i in range(n_records)]
        info = {"seed": seed, "n_records": n_records, "true_rpeaks": use_true_rpeaks}
        super().__init__(ids, None, class_names, None, info)
        self.seed, self.use_true_rpeaks = seed, use_true_rpeaks

    def payload(self, indices):
        indices = list(indices)
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise ValueError("synthetic shards must be contiguous")
        return ("synthetic", self.seed, indices[0], len(indices), self.use_true_rpeaks)


def synthetic_source(n_records: int, seed: int = 0, use_true_rpeaks: bool = False) -> Source:
    """The built-in generator's records (``clear_hug.data.synthetic.generate_dataset``) as a source, generated
    shard by shard in the workers, so memory does not grow with ``n_records``."""
    from .synthetic import generate_dataset

    probe = generate_dataset(n_records=1, seed=seed)
    return SyntheticSource(n_records, seed, probe.class_names, use_true_rpeaks)


# ---------------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------------


def _tokenize_payload(payload, positions: List[int], max_beats: int, bandpass: bool):
    """Worker body: tokenise one shard.

    Returns kept positions, the token arrays, ``(position, kind, reason)`` skips, and the labels and splits of
    all the shard's records when the worker generated them (else None). Any failure of one record is a skip of
    that record: kind "unreadable" or "no_beats" for the expected ones, "failed" (with the exception's type) for
    the rest, so that one odd record never ends a job of thousands halfway.
    """
    gen_labels = gen_splits = None
    if isinstance(payload, tuple) and payload[0] == "synthetic":
        from .synthetic import generate_dataset

        _, seed, start, count, true_rpeaks = payload
        ds = generate_dataset(n_records=count, seed=seed, start=start)
        gen_labels, gen_splits = np.asarray(ds.labels, np.float32), np.asarray(ds.splits, np.int8)
        payload = [("array", ds.signals[k], ds.fs, ds.rpeaks[k] if true_rpeaks else None) for k in range(count)]
    kept, toks, vals, times, skipped = [], [], [], [], []
    for pos, item in zip(positions, payload):
        try:
            if item[0] == "path":
                signal, fs, meta = read_record(item[1])
                bt = tokenize_beats(signal, fs, max_beats=max_beats, bandpass=bandpass,
                                    missing_leads=meta["missing_leads"])
            else:
                _, signal, fs, rpeaks = item
                bt = tokenize_beats(signal, fs, max_beats=max_beats, rpeaks=rpeaks, bandpass=bandpass)
        except RecordReadError as exc:
            skipped.append((pos, "unreadable", str(exc)))
            continue
        except NoBeatsError as exc:
            skipped.append((pos, "no_beats", str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 -- counted and reported with its reason, see the docstring
            skipped.append((pos, "failed", f"{type(exc).__name__}: {exc}"))
            continue
        kept.append(pos)
        toks.append(bt.tokens)
        vals.append(bt.valid)
        times.append(bt.time)
    shape = (0, NUM_LEADS, max_beats)
    return (
        np.asarray(kept, dtype=np.int64),
        np.stack(toks) if toks else np.zeros(shape + (TOKEN_LEN,), np.float32),
        np.stack(vals) if vals else np.zeros(shape, bool),
        np.stack(times) if times else np.zeros(shape, np.int64),
        skipped,
        gen_labels,
        gen_splits,
    )


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


def _load_shard(path: Path):
    """A finished shard, or None when it is missing or unreadable (then it is simply redone)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("kept", "tokens", "valid", "time", "skipped", "labels", "splits", "first")}
        return out
    except Exception as exc:  # a damaged shard is recomputed, never trusted
        log.warning("shard %s unreadable (%s); recomputing it", path.name, exc)
        return None


# ---------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------


def build_cache(source: Source, out_dir: Union[str, os.PathLike], *, max_beats: int = 15, bandpass: bool = False,
                workers: int = 1, shard_size: int = 256, overwrite: bool = False, progress: bool = True) -> Dict:
    """Tokenise ``source`` into ``out_dir`` (see the module docstring) and return the ``meta.json`` content.

    Raises ValueError for a source without records, and for one of which no record could be tokenised.
    """
    if len(source) == 0:
        raise ValueError(f"the {source.name} source has no records")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    config = {"format": FORMAT_VERSION, "source": source.name, "info": source.info, "n_total": len(source),
              "max_beats": int(max_beats), "bandpass": bool(bandpass), "shard_size": int(shard_size),
              "class_names": source.class_names}
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

    def positions(s):
        return list(range(s * shard_size, min((s + 1) * shard_size, n)))

    def save(s, result):
        kept, toks, vals, times, skipped, gen_labels, gen_splits = result
        pos = positions(s)
        labels = source.labels[pos] if source.labels is not None else gen_labels
        splits = source.splits[pos] if source.splits is not None else gen_splits
        if labels is None or splits is None or len(labels) != len(pos):
            raise RuntimeError(f"shard {s}: no labels/splits for its {len(pos)} records")
        skipped_arr = np.array([json.dumps(list(x)) for x in skipped], dtype=str) if skipped else np.zeros(0, "<U1")
        # Labels and splits of all the shard's records travel with it (a generated source has them only here).
        _write_npz(shard_path(s), kept=kept, tokens=toks, valid=vals, time=times, skipped=skipped_arr,
                   labels=np.asarray(labels, np.float32), splits=np.asarray(splits, np.int8),
                   first=np.int64(pos[0] if pos else 0))
        for pos, kind, reason in skipped:
            log.warning("skipped %s (%s): %s", source.record_ids[pos], kind, reason)

    bar = _progress(sum(len(positions(s)) for s in todo), progress)
    if workers <= 1 or len(todo) <= 1:
        for s in todo:
            pos = positions(s)
            save(s, _tokenize_payload(source.payload(pos), pos, max_beats, bandpass))
            bar.update(len(pos))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {}
            for s in todo:
                pos = positions(s)
                futures[pool.submit(_tokenize_payload, source.payload(pos), pos, max_beats, bandpass)] = s
            for fut in as_completed(futures):
                s = futures[fut]
                save(s, fut.result())
                bar.update(len(positions(s)))
    bar.close()
    return _merge(source, out, n_shards, shard_path, config)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="tokenising", disable=not enabled)


def _merge(source: Source, out: Path, n_shards: int, shard_path, config: Dict) -> Dict:
    """Concatenate the shards into the final memory-mappable arrays, then write meta.json last."""
    shards = [_load_shard(shard_path(s)) for s in range(n_shards)]
    if any(sh is None for sh in shards):
        raise RuntimeError("a shard disappeared during the merge")
    kept = np.concatenate([sh["kept"] for sh in shards]) if shards else np.zeros(0, np.int64)
    skipped = [json.loads(s) for sh in shards for s in sh["skipped"]]
    skipped_list = [{"record": source.record_ids[p], "kind": k, "reason": r} for p, k, r in skipped]
    if len(kept) == 0:  # before any array is written: an empty cache must not look complete
        kinds = dict(Counter(s["kind"] for s in skipped_list))
        first = "; ".join(f"{s['record']}: {s['reason']}" for s in skipped_list[:3])
        raise ValueError(f"none of the {len(source)} records of the {source.name} source could be tokenised "
                         f"(skipped {kinds}; first: {first})")
    mb = config["max_beats"]
    arrays = {
        "tokens": np.concatenate([sh["tokens"] for sh in shards]) if shards else np.zeros((0, NUM_LEADS, mb, TOKEN_LEN), np.float32),
        "valid": np.concatenate([sh["valid"] for sh in shards]) if shards else np.zeros((0, NUM_LEADS, mb), bool),
        "time": np.concatenate([sh["time"] for sh in shards]) if shards else np.zeros((0, NUM_LEADS, mb), np.int64),
        "labels": np.concatenate([sh["labels"][sh["kept"] - sh["first"]] for sh in shards]).astype(np.float32)
        if shards else np.zeros((0, len(source.class_names)), np.float32),
        "splits": np.concatenate([sh["splits"][sh["kept"] - sh["first"]] for sh in shards]).astype(np.int8)
        if shards else np.zeros(0, np.int8),
        "record_ids": np.asarray([source.record_ids[i] for i in kept], dtype=str),
    }
    for name, arr in arrays.items():
        _atomic_write(out / f"{name}.npy", lambda tmp, a=arr: _save_npy(tmp, a))
    meta = {
        "format": FORMAT_VERSION,
        "source": source.name,
        "info": source.info,
        "class_names": source.class_names,
        "n_total": len(source),
        "n_records": int(len(kept)),
        "n_skipped": len(skipped_list),
        "skipped_by_kind": dict(Counter(s["kind"] for s in skipped_list)),
        "skipped": skipped_list,
        "split_counts": {name: int((arrays["splits"] == i).sum()) for name, i in SPLIT_IDS.items()},
        "class_counts": {c: int(v) for c, v in zip(source.class_names, arrays["labels"].sum(axis=0))},
        "max_beats": mb,
        "token_len": TOKEN_LEN,
        "fs": 100,
        "bandpass": config["bandpass"],
        "valid_tokens_per_record": float(arrays["valid"].sum() / max(len(kept), 1)),
        "created_utc": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime()),
    }
    _write_json(out / "meta.json", meta)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Reading a cache
# ---------------------------------------------------------------------------------------------------------------


def load_meta(cache_dir) -> Dict:
    path = Path(cache_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{cache_dir} is not a complete token cache (no meta.json); run prepare")
    return json.loads(path.read_text())


class TokenDataset(Dataset):
    """A token cache as a torch Dataset over one split (``"train"``, ``"val"``, ``"test"``, or None for all).

    Arrays are memory-mapped, so opening a cache of any size is instant and workers share the page cache.
    Items are dicts: ``tokens [12, B, 96] float32``, ``valid [12, B] bool``, ``time [12, B] int64``,
    ``labels [C] float32``.
    """

    def __init__(self, cache_dir, split: Optional[str] = "train"):
        self.cache_dir = Path(cache_dir)
        self.meta = load_meta(cache_dir)
        self.class_names: List[str] = list(self.meta["class_names"])
        self._arr: Optional[Dict[str, np.ndarray]] = None
        self._pid = None
        splits = np.load(self.cache_dir / "splits.npy")
        if split is None:
            self.indices = np.arange(len(splits))
        elif split in SPLIT_IDS:
            self.indices = np.nonzero(splits == SPLIT_IDS[split])[0]
        else:
            raise ValueError(f"split must be one of {SPLIT_NAMES} or None, got {split!r}")

    @property
    def arrays(self) -> Dict[str, np.ndarray]:
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

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        j = int(self.indices[i])
        a = self.arrays
        return {
            "tokens": torch.from_numpy(np.array(a["tokens"][j], dtype=np.float32)),
            "valid": torch.from_numpy(np.array(a["valid"][j], dtype=bool)),
            "time": torch.from_numpy(np.array(a["time"][j], dtype=np.int64)),
            "labels": torch.from_numpy(np.array(a["labels"][j], dtype=np.float32)),
        }
