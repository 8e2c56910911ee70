#!/usr/bin/env bash
# Quickstart command 2: set up (idempotent), then run the lint and the test suite on the CPU.
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --fast     the fast tier: tests not marked slow (pytest -m "not slow"); every module of
#                                   bmclip/ and kernels/ is still exercised (scripts/check_fast_tier.py checks that)
# Every other argument passes through to pytest (e.g. -k loader, -x, -q).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
args=()
for a in "$@"; do
    if [[ $a == --fast ]]; then args+=(-m "not slow"); else args+=("$a"); fi
done
bash scripts/setup_env.sh
# Test-only tool: clang builds the libFuzzer + ASan/UBSan targets of csrc/fuzz (tests/test_fuzz.py skips
# that test without it). Installed when root and missing; a failed install only costs that one test.
if ! command -v clang++ >/dev/null && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "[test] installing clang (libFuzzer + ASan for tests/test_fuzz.py)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang; } >/dev/null \
        || echo "[test] warning: clang could not be installed; the libFuzzer test will skip" >&2
fi
VENV="${BMCLIP_VENV:-$ROOT/.venv}"
"$VENV/bin/ruff" check --no-cache .
exec "$VENV/bin/python" -m pytest ${args[@]+"${args[@]}"}
