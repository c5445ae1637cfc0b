#!/usr/bin/env bash
# Sets up .venv for this checkout: PyTorch, Triton, the package (editable, native extension built against the
# installed torch) and the test/ECG extras. Safe to run again: it only reinstalls when the build inputs changed.
#
# A machine that already has PyTorch (a GPU user's CUDA build, say) keeps it: the venv then sees the system
# site-packages and nothing replaces that torch. Elsewhere the CPU build torch==2.13.0 is installed.
# Source it (it sets PY) or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLEAR_VENV:-$ROOT/.venv}"
BASE_PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$BASE_PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: using the PyTorch already installed for $BASE_PY"
    "$BASE_PY" -m venv --system-site-packages "$VENV"
  else
    "$BASE_PY" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi

# Reinstall only when something that goes into the build or the dependency list changed.
STAMP="$VENV/.clear-hug-stamp"
HASH="$(cd "$ROOT" && cat pyproject.toml setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$HASH" ]; then
  echo "setup: installing the package and its extras (builds the native extension, a few minutes)"
  "$PY" -m pip install -q --disable-pip-version-check "setuptools>=64" wheel ninja
  (cd "$ROOT" && "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]")
  echo "$HASH" > "$STAMP"
fi
export PY
