# Sourced by the GPU scripts (gpu_suite.sh, gpu_dali.sh): repo root as cwd, $OUT for results, $PY, and a
# source checkout on PYTHONPATH with the Triton interpreter off. Triton keeps autotuning results on disk
# (TRITON_CACHE_AUTOTUNING=1, next to its compiled kernels), so a second run on the same warm machine
# re-tunes nothing it has tuned before.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_suite_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_AUTOTUNING=1
unset TRITON_INTERPRET
