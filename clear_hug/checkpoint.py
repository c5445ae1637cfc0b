"""Checkpoint files: one versioned format for pretraining runs and trained heads, loaded without running code.

A checkpoint is a dict ``{"format": FORMAT, "kind": "pretrain" | "head", ...}`` of tensors and plain Python
values (numbers, strings, lists, tuples, dicts, None), written with ``torch.save`` to a temporary file that is
then renamed over the target (so a killed run never leaves half a file), and read back with
``torch.load(weights_only=True)``. That loader rebuilds only tensors and plain containers: a crafted file whose
unpickling would call a function (``__reduce__``) is refused before anything runs. RNG states are therefore
stored as tensors and lists, never as numpy arrays or opaque tuples.

A head trained on a frozen pretrained encoder does not copy the encoder: it names the pretraining checkpoint by a
path relative to the head file (so the run folders can be moved or copied together) and by a SHA-256 digest of the
encoder's weights, checked on load, so a different file at that path is refused instead of silently used.

Portable weights are a second, simpler format: ``save_pretrained`` writes a folder in the layout of a Hugging Face
Hub model (``model.safetensors`` + ``config.json``) holding a ``CLEAR`` encoder or a ``Classifier`` with its class
names and preprocessing; ``from_pretrained`` reads it back bitwise, without pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # the model modules import torch.nn and the kernels; loaded only when a model is built
    from .heads import Classifier
    from .model import CLEAR

# 2: the position map reads unit-norm sinusoidal codes (model._Positions); format-1 weights have the same names and
# shapes but were trained on codes 5.7x larger, so loading them would silently shift every position code.
FORMAT = 2
KINDS = ("pretrain", "head")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not pickle-free, of another format or kind, or inconsistent."""


# ------------------------------------------------------------------ files
def atomic_save(obj: Any, path: os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only when saving failed
            tmp.unlink()


def save_checkpoint(path: os.PathLike, kind: str, content: dict) -> None:
    """Write ``content`` (tensors and plain values only) as a checkpoint of ``kind``, atomically."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    reserved = {"format", "kind"} & set(content)
    if reserved:
        raise ValueError(f"content must not set {sorted(reserved)}; they are the checkpoint's own fields")
    atomic_save({"format": FORMAT, "kind": kind, **content}, path)


def load_checkpoint(path: os.PathLike, kind: str) -> dict:
    """Read a checkpoint of ``kind`` with ``weights_only=True`` (no code from the file runs) and check its header."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global it does not know: a file made with another tool, or a crafted one.
        # Only torch's one-line reason is kept, not its advice to retry with the unsafe (pickle) loader.
        reason = re.search(r"Unsupported global: [^.]*", str(exc))
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain values (a file "
                              f"of another program, or a crafted one); "
                              f"{reason.group(0) if reason else 'not loadable with weights_only=True'}") from exc
    except Exception as exc:  # torch reports a damaged or foreign file as EOFError, KeyError, RuntimeError...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path}: not a clear_hug checkpoint (no 'format' field)")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r} is not supported (this version "
                              f"reads format {FORMAT})")
    if state.get("kind") != kind:
        raise CheckpointError(f"{path}: a {state.get('kind')!r} checkpoint, expected a {kind!r} checkpoint")
    return state


def state_digest(state_dict: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict: the identity of a set of weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ RNG states as tensors and lists
def rng_state() -> dict:
    """The torch, numpy, python (and CUDA) global RNG states, in a form ``weights_only`` loading accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by ``rng_state``."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ models from checkpoints
def load_encoder(path: os.PathLike, attn_impl: str | None = None, map_location: str = "cpu") -> CLEAR:
    """The CLEAR encoder of a pretraining checkpoint (optionally with another attention implementation)."""
    from .config import CLEARConfig
    from .model import CLEAR

    state = load_checkpoint(path, "pretrain")
    cfg = state["config"] if attn_impl is None else {**state["config"], "attn_impl": attn_impl}
    model = CLEAR(CLEARConfig.from_dict(cfg))
    model.load_state_dict(state["model"])
    return model.to(map_location)


def save_head(path: os.PathLike, *, head: str, fusion: str, head_state: dict, class_names: Sequence[str],
              encoder_config: dict, encoder_state: dict, encoder_file: os.PathLike | None = None,
              **extra: Any) -> None:
    """Write a trained head. With ``encoder_file`` (the pretraining checkpoint the frozen encoder came from) the
    head refers to it by relative path and digest; without it the encoder's weights are stored in the head file.
    ``extra`` holds plain values kept for the record (run arguments, results)."""
    path = Path(path)
    content = {"head": head, "fusion": fusion, "head_state": head_state, "class_names": list(class_names),
               "encoder_config": dict(encoder_config), "encoder_sha256": state_digest(encoder_state), **extra}
    if encoder_file is not None:
        content["encoder_file"] = os.path.relpath(Path(encoder_file).resolve(), path.resolve().parent)
        content["encoder_state"] = None
    else:
        content["encoder_file"] = None
        content["encoder_state"] = encoder_state
    save_checkpoint(path, "head", content)


def load_classifier(path: os.PathLike, class_names: Sequence[str] | None = None) -> Classifier:
    """A head checkpoint (from ``finetune``) as an encoder + head ``Classifier``.

    With ``class_names`` (those of the data it is about to score), a head trained on other classes is refused.
    """
    from .config import CLEARConfig
    from .heads import Classifier, build_head
    from .model import CLEAR

    path = Path(path)
    state = load_checkpoint(path, "head")
    if class_names is not None and list(class_names) != list(state["class_names"]):
        raise CheckpointError(f"{path}: the head predicts classes {state['class_names']}, but the data has "
                              f"classes {list(class_names)}")
    if state["encoder_state"] is not None:
        encoder = CLEAR(CLEARConfig.from_dict(state["encoder_config"]))
        encoder.load_state_dict(state["encoder_state"])
    else:
        encoder_path = path.parent / state["encoder_file"]
        if not encoder_path.is_file():
            raise CheckpointError(f"{path}: its encoder checkpoint {encoder_path} (stored as "
                                  f"{state['encoder_file']!r}, relative to the head file) is missing")
        encoder = load_encoder(encoder_path)
    digest = state_digest(encoder.state_dict())
    if digest != state["encoder_sha256"]:
        raise CheckpointError(f"{path}: the encoder weights found ({digest[:12]}...) are not the ones the head was "
                              f"trained on ({state['encoder_sha256'][:12]}...)")
    head = build_head(state["head"], encoder.cfg.enc_dim, len(state["class_names"]), state["fusion"])
    head.load_state_dict(state["head_state"])
    return Classifier(encoder, head)


# ------------------------------------------------------------------ portable weights (Hub-style folders)
PRETRAINED_FORMAT = 2  # 2: as FORMAT 2 (unit-norm position codes)
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


def _head_spec(head: torch.nn.Module) -> dict:
    from .heads import HUG, LinearProbe

    if isinstance(head, HUG):
        return {"kind": "hug", "fusion": head.fusion, "num_classes": head.classifier.out_features}
    if isinstance(head, LinearProbe):
        return {"kind": "linear", "fusion": "mean", "num_classes": head.linear.out_features}
    raise TypeError(f"head must be a HUG or a LinearProbe, got {type(head).__name__}")


def save_pretrained(model: torch.nn.Module, directory: os.PathLike, *, class_names: Sequence[str] | None = None,
                    preprocessing: dict | None = None) -> Path:
    """Write ``model`` (a ``CLEAR`` encoder or a ``Classifier``) as a folder in the layout of a Hugging Face Hub
    model: ``model.safetensors`` (the weights; safetensors holds tensors only, so loading runs no code) and
    ``config.json`` (model config, head, class names, and how records were turned into tokens:
    ``preprocessing``, e.g. the token cache's sampling rate, band-pass, token length and beats).
    A classifier needs its ``class_names``. Each file is written atomically."""
    from safetensors.torch import save_file

    from .heads import Classifier
    from .model import CLEAR

    if isinstance(model, CLEAR):
        kind, encoder, head = "clear", model, None
    elif isinstance(model, Classifier):
        kind, encoder, head = "classifier", model.encoder, _head_spec(model.head)
        if class_names is None or len(class_names) != head["num_classes"]:
            raise ValueError(f"class_names must name the classifier's {head['num_classes']} classes, "
                             f"got {None if class_names is None else len(class_names)}")
    else:
        raise TypeError(f"model must be a CLEAR or a Classifier, got {type(model).__name__}")
    config = {"format": PRETRAINED_FORMAT, "kind": kind, "model": encoder.cfg.to_dict(), "head": head,
              "class_names": None if class_names is None else list(class_names),
              "preprocessing": dict(preprocessing or {})}
    # Clones: safetensors refuses tensors that share storage, and it needs them contiguous and on the CPU.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in ((WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=1, allow_nan=False)))):
        tmp = directory / f".{name}.tmp{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, directory / name)
        finally:
            if tmp.exists():
                tmp.unlink()
    return directory


def load_pretrained_config(directory: os.PathLike) -> dict:
    """The ``config.json`` of a folder written by ``save_pretrained``, checked."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pretrained-model folder (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != PRETRAINED_FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format') if isinstance(config, dict) else None!r} "
                              f"is not supported (this version reads format {PRETRAINED_FORMAT})")
    if config.get("kind") not in ("clear", "classifier"):
        raise CheckpointError(f"{path}: unknown model kind {config.get('kind')!r}")
    return config


def from_pretrained(directory: os.PathLike, kind: str | None = None) -> torch.nn.Module:
    """The ``CLEAR`` or ``Classifier`` saved in ``directory`` by ``save_pretrained``; ``kind`` ("clear" or
    "classifier") refuses the other. The weights are read with safetensors (no pickle) and must match exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .config import CLEARConfig
    from .heads import Classifier, build_head
    from .model import CLEAR

    config = load_pretrained_config(directory)
    if kind is not None and config["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {config['kind']!r} model, expected a {kind!r} model")
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_NAME} is missing")
    try:
        state = load_file(str(weights))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    model = CLEAR(CLEARConfig.from_dict(config["model"]))
    if config["kind"] == "classifier":
        head = config["head"]
        model = Classifier(model, build_head(head["kind"], model.cfg.enc_dim, head["num_classes"], head["fusion"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"{weights}: the weights do not fit the model of {CONFIG_NAME}: {exc}") from exc
    # What predict needs to turn a record into this model's inputs and name its outputs.
    model.preprocessing = dict(config.get("preprocessing") or {})
    if config["kind"] == "classifier":
        model.class_names = list(config["class_names"])
    return model
