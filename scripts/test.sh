#!/usr/bin/env bash
# Quickstart command 2: set up (idempotent), then run the lint and the test suite on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
VENV="${BMCLIP_VENV:-$ROOT/.venv}"
"$VENV/bin/ruff" check --no-cache .
exec "$VENV/bin/python" -m pytest "$@"
