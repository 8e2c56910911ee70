#!/usr/bin/env bash
# Here (a machine with pip and network), before the GPU call: download the Python packages the GPU box
# lacks into .whl/ (git-ignored), for its Python 3.12 on x86-64, one pinned version each. Idempotent: a
# wheel already there is kept, other versions of a listed package are removed.
#
#   bash benchmarks/gpu_prepare.sh      # then call the device with carry: [".whl"], timeout_s: 600,
#                                       # command: bash benchmarks/gpu_suite.sh
#
# What the box has (KINDS.md's package list): torch 2.11, triton 3.6, torchvision, timm, transformers,
# huggingface-hub, safetensors, regex, tqdm, pytest, pytest-xdist, pybind11. open_clip_torch 3.3.0 needs
# beyond those ftfy, and ftfy needs wcwidth: WHEELS below. open_clip also needs timm >= 1.0.17; the box's
# timm version is not recorded, so a timm wheel travels in .whl/fallback/ and gpu_suite.sh installs it only
# where the box's timm is missing or older. gpu_suite.sh installs exactly these lists
# (tests/test_gpu_suite_logic.py checks that the two scripts agree).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
FALLBACK_WHEELS=(timm==1.0.31)
CARRY_LIMIT=$((64 * 1024 * 1024))  # the device tool carries at most 64 MiB per call, working tree included
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64)

fetch() {  # fetch DIR NAME==VERSION: the wheel into DIR unless it is there; other versions of NAME removed
    local dir=$1 spec=$2
    local name=${spec%%==*} ver=${spec##*==}
    local norm=${name//-/_}
    mkdir -p "$dir"
    shopt -s nullglob
    local have=("$dir/$norm-$ver-"*.whl)
    local other
    for other in "$dir/$norm-"*.whl; do
        [[ "$other" == "$dir/$norm-$ver-"* ]] || { echo "removing $other (not $ver)"; rm -f "$other"; }
    done
    if ((${#have[@]})); then
        echo "have    ${have[0]}"
        shopt -u nullglob
        return 0
    fi
    local tmp
    tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$tmp" "$spec"
    local got=("$tmp/$norm-$ver-"*.whl)
    shopt -u nullglob
    if ((${#got[@]} != 1)); then
        echo "pip download $spec gave: $(ls "$tmp")" >&2
        rm -rf "$tmp"
        return 1
    fi
    mv "${got[0]}" "$dir/"  # only a complete download lands in the folder
    rm -rf "$tmp"
    echo "fetched $dir/$(basename "${got[0]}")"
}

for spec in "${WHEELS[@]}"; do fetch .whl "$spec"; done
for spec in "${FALLBACK_WHEELS[@]}"; do fetch .whl/fallback "$spec"; done

echo
echo "Requires-Dist of the carried wheels (each is on the box or carried):"
for spec in "${WHEELS[@]}" "${FALLBACK_WHEELS[@]}"; do
    n=${spec%%==*}; v=${spec##*==}
    for w in .whl/"${n//-/_}-$v-"*.whl .whl/fallback/"${n//-/_}-$v-"*.whl; do
        [[ -f "$w" ]] || continue
        deps=$("$PY" - "$w" <<'PYEOF' || echo "(unreadable wheel)"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
print(", ".join(l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Dist:") and "extra ==" not in l))
PYEOF
)
        echo "  $(basename "$w"): ${deps:-none}"
    done
done

extra=$(find .whl -maxdepth 2 -type f -name '*.whl' | sort | while read -r f; do
    b=$(basename "$f"); keep=0
    for spec in "${WHEELS[@]}" "${FALLBACK_WHEELS[@]}"; do
        n=${spec%%==*}; v=${spec##*==}; [[ "$b" == "${n//-/_}-$v-"* ]] && keep=1
    done
    ((keep)) || echo "$f"
done)
[[ -z "$extra" ]] || echo "note: not installed by the suite (they still travel): $extra"

whl_bytes=$(du -sb .whl | cut -f1)
tree_bytes=$( { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
total=$((whl_bytes + tree_bytes))
echo
echo "carry: [\".whl\"]   (.whl $((whl_bytes / 1024)) KiB + working tree $((tree_bytes / 1024)) KiB = $((total / 1024)) KiB of the $((CARRY_LIMIT / 1048576)) MiB a call may carry)"
if ((total > CARRY_LIMIT)); then
    echo "too big for one call: remove something from .whl or the working tree" >&2
    exit 1
fi
