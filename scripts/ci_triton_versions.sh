#!/usr/bin/env bash
# CI: compile every Triton kernel of bmclip.kernels for sm_90 with the oldest and the newest supported Triton
# (pyproject.toml: triton>=3.6,<3.10) and check their compile facts, without a GPU.
#
# For each version, Triton is installed beside the venv (pip --no-deps --target .triton/<ver>; skipped when that
# folder is already complete) and put first on PYTHONPATH for benchmarks/aot_compile_check.py, which runs with the
# venv's torch. Its selection (default --training: every kept autotune config of each kernel at the training shapes,
# bf16) must compile and comply with --require (a tl.dot kernel on wgmma with no mma.sync, no spill bytes, shared
# memory within the block). Exit status: 0 when every version passes, 1 otherwise (each version still runs).
#
#   bash scripts/ci_triton_versions.sh                    # 3.6.0 and 3.9.0, --training
#   BMCLIP_CI_TRITON_VERSIONS="3.9.0" BMCLIP_CI_AOT_ARGS="--quick" bash scripts/ci_triton_versions.sh
#
# Time, measured on the 2-core development machine while ~5 other jobs shared it (load average ~9; an upper
# figure): --training is 250 compiles per version, 904 s wall with triton 3.6.0 and 591 s with 3.9.0 (where the
# contrastive kernels failed early), 25 min for the whole script including the pip install (~11 s per version);
# the CPU time of the whole script was ~8 min (user+sys, ptxas included), i.e. some 2-3 min wall per version with
# --jobs 2 on an idle 2-core machine (an estimate, not measured idle).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BMCLIP_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
read -r -a VERSIONS <<< "${BMCLIP_CI_TRITON_VERSIONS:-3.6.0 3.9.0}"
read -r -a AOT_ARGS <<< "${BMCLIP_CI_AOT_ARGS:---training}"
JOBS="${BMCLIP_CI_AOT_JOBS:-2}"
TIMEOUT_S="${BMCLIP_CI_AOT_TIMEOUT_S:-2400}"  # per version; past it that version fails
OUT="$ROOT/.triton/results"
mkdir -p "$OUT"

install_triton() {  # idempotent: a finished install leaves .complete; a partial one is redone
    local ver="$1" dest="$ROOT/.triton/$1"
    if [[ -f "$dest/.complete" ]]; then
        return 0
    fi
    echo "[triton-ci] installing triton==$ver into .triton/$ver" >&2
    # (called in an if: set -e is off in here, so each step checks its own status)
    rm -rf "$dest" "$dest.partial" || return 1
    "$PY" -m pip install --quiet --no-deps --disable-pip-version-check --target "$dest.partial" "triton==$ver" \
        || return 1
    touch "$dest.partial/.complete" && mv "$dest.partial" "$dest"
}

status=0
summary=()
for ver in "${VERSIONS[@]}"; do
    if ! install_triton "$ver"; then
        echo "[triton-ci] FAIL: triton==$ver could not be installed" >&2
        summary+=("triton $ver: install failed")
        status=1
        continue
    fi
    got="$(PYTHONPATH="$ROOT/.triton/$ver" "$PY" -c 'import triton; print(triton.__version__)')"
    if [[ "$got" != "$ver" ]]; then
        echo "[triton-ci] FAIL: PYTHONPATH=.triton/$ver imports triton $got" >&2
        summary+=("triton $ver: imports $got")
        status=1
        continue
    fi
    echo "[triton-ci] triton $ver: aot_compile_check.py ${AOT_ARGS[*]} --require --jobs $JOBS" >&2
    start=$SECONDS
    rc=0
    PYTHONPATH="$ROOT/.triton/$ver" timeout "$TIMEOUT_S" nice "$PY" benchmarks/aot_compile_check.py "${AOT_ARGS[@]}" \
        --require --jobs "$JOBS" --json "$OUT/facts-$ver.json" || rc=$?
    took=$((SECONDS - start))
    case "$rc" in
        0) summary+=("triton $ver: ok (${took} s)") ;;
        77) summary+=("triton $ver: FAIL, cannot compile for sm_90 here (${took} s)"); status=1 ;;
        124) summary+=("triton $ver: FAIL, timed out after ${TIMEOUT_S} s"); status=1 ;;
        *) summary+=("triton $ver: FAIL, compile errors or fact violations, exit $rc (${took} s)"); status=1 ;;
    esac
done
echo "[triton-ci] summary:" >&2
printf '[triton-ci]   %s\n' "${summary[@]}" >&2
exit "$status"
