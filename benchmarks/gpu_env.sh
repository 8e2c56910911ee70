# Sourced by the GPU scripts (gpu_suite.sh, gpu_dali.sh): repo root as cwd, $OUT for results, $PY, and a
# source checkout on PYTHONPATH with the Triton interpreter off.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_suite_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
