#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# Lint first (pyflakes, pycodestyle, isort, bugbear, pyupgrade; configured in pyproject.toml): a finding fails
# the command like a failing test.
"$PY" -m ruff check "$ROOT"
exec "$PY" -m pytest tests -p no:cacheprovider "$@"
