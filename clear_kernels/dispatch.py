"""The one place that decides which backend runs an op call, and says why the faster ones did not.

Backends register themselves here (``reference`` always; ``cpu``/``cuda`` when the native extension loaded;
``triton`` when Triton imports). ``"auto"`` walks the device's preference list and takes the first backend that
accepts the inputs; when that is not the first choice it warns once, naming every refused backend and its
reason. The environment variable ``CLEAR_KERNELS_BACKEND`` forces a backend wherever ``"auto"`` is asked for; an
explicit ``backend=`` argument wins over it. A forced backend that cannot run the inputs is an error, not a
silent fallback.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "CLEAR_KERNELS_BACKEND"
BACKEND_NAMES = ("triton", "cuda", "cpu", "reference")

# Preference per device type, fastest first. The Triton interpreter is for tests, never picked by "auto".
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}


@dataclass(frozen=True)
class Backend:
    """A registered implementation: the op pair ``clear_kernels::<op_prefix>_{fwd,bwd}`` plus its limits."""

    name: str
    op_prefix: str
    device_types: tuple[str, ...]
    # Returns None when the backend can run an input like ``q`` (dtype, device, head dim), else the reason.
    refuse: Callable[[torch.Tensor], str | None]
    # Takes q, k, v as strided views (unit stride along D); others get them contiguous.
    strided: bool = False
    # The optional parts of the op it implements: "causal" (is_causal=True) and "gqa" (fewer key/value heads).
    features: frozenset = frozenset()


# What each optional feature is called in a refusal.
_FEATURE_NAMES = {"causal": "is_causal=True", "gqa": "grouped-query attention (k/v with fewer heads than q)"}


_registry: dict[str, Backend] = {}
_unavailable: dict[str, str] = {}
_warned: set[tuple] = set()


def register(backend: Backend) -> None:
    _registry[backend.name] = backend
    _unavailable.pop(backend.name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record why a backend could not be loaded at all (for example, the extension is not built)."""
    if name not in _registry:
        _unavailable[name] = reason


def why_not(name: str, q: torch.Tensor, features: frozenset = frozenset()) -> str | None:
    """None when backend ``name`` can run inputs like ``q`` using ``features`` (see ``Backend.features``);
    otherwise a sentence saying why not."""
    if name in _unavailable:
        return _unavailable[name]
    backend = _registry.get(name)
    if backend is None:
        return "it is not available in this installation"
    if q.device.type not in backend.device_types:
        return f"it runs on {'/'.join(backend.device_types)} tensors, not {q.device.type}"
    missing = sorted(set(features) - backend.features)
    if missing:
        return "it does not implement " + " or ".join(_FEATURE_NAMES[f] for f in missing)
    return backend.refuse(q)


def available_backends(q: torch.Tensor | None = None) -> dict[str, str | None]:
    """Every backend name mapped to None (usable) or the reason it is not; for ``q`` if given, else in general."""
    if q is None:
        return {name: _unavailable.get(name, None if name in _registry else "not available") for name in BACKEND_NAMES}
    return {name: why_not(name, q) for name in BACKEND_NAMES}


def _check_name(name: str, source: str) -> None:
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be 'auto' or one of {BACKEND_NAMES}, got {name!r}")


def select(requested: str, q: torch.Tensor, features: frozenset = frozenset()) -> Backend:
    """Resolve ``requested`` ('auto' or a backend name) to the backend that will run ``q``'s call, which uses the
    optional ``features`` ("causal", "gqa")."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    _check_name(requested, "backend")
    if requested == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced:
            _check_name(forced, f"environment variable {ENV_VAR}")
            requested = forced
    if requested != "auto":
        reason = why_not(requested, q, features)
        if reason is not None:
            raise ValueError(f"backend={requested!r} cannot run these inputs: {reason}")
        return _registry[requested]

    refused = []
    for name in _AUTO_ORDER.get(q.device.type, ("reference",)):
        reason = why_not(name, q, features)
        if reason is None:
            if refused:
                _warn_fallback(name, refused)
            return _registry[name]
        refused.append((name, reason))
    raise ValueError(f"no backend can run {q.device.type} inputs: " + "; ".join(f"{n}: {r}" for n, r in refused))


def _warn_fallback(chosen: str, refused: list[tuple[str, str]]) -> None:
    key = (chosen, tuple(refused))
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    reasons = "; ".join(f"'{name}' not used because {reason}" for name, reason in refused)
    warnings.warn(f"clear_kernels: falling back to the '{chosen}' backend: {reasons}", RuntimeWarning, stacklevel=4)
