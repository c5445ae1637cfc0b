#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the main job. Extra arguments go to the job.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$VENV/bin/clear-hug" demo "$@"
