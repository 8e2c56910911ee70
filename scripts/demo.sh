#!/usr/bin/env bash
# Quickstart command 1: set up (idempotent), then run bmclip's end-to-end demo on its built-in default
# (a fixed number of training steps: its numbers do not depend on the machine's speed; ~4 min on 2 cores).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "${BMCLIP_VENV:-$ROOT/.venv}/bin/bmclip" demo "$@"
