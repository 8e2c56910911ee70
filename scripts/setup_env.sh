#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian/Ubuntu machine: system packages (when root and missing),
# a virtualenv in .venv, bmclip installed editable with its dev extras, and the C++ build.
# Re-running is cheap: each step is skipped when its inputs have not changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BMCLIP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

log() { echo "[setup] $*" >&2; }

# 1. System packages: compiler toolchain, CMake, libjpeg-turbo and libpng headers.
need_pkgs=()
# libjpeg-dev is libjpeg-turbo's headers on Debian (libjpeg62-turbo-dev) and Ubuntu (libjpeg-turbo8-dev).
for p in g++ cmake libjpeg-dev libpng-dev python3-venv; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing system packages: ${need_pkgs[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    else
        log "warning: missing system packages (${need_pkgs[*]}); install them with apt-get as root"
    fi
fi

# 2. Virtualenv.
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# 3. Python packages and the C++ extension; redone only when the build inputs change.
stamp="$VENV/.bmclip-setup-stamp"
hash=$( { cat pyproject.toml setup.py CMakeLists.txt scripts/setup_env.sh; find csrc -type f | LC_ALL=C sort | xargs cat; } \
    | sha256sum | cut -c1-16)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$hash" ]] || ! "$VPY" -c "import bmclip._C" 2>/dev/null; then
    log "installing torch and build tools"
    # torch 2.14.1 + torchvision 0.29.1 are what open_clip/timm (test peers) run with here.
    # The build tools: the same ranges as pyproject.toml's [build-system] requires (the install below uses
    # --no-build-isolation, so these are what builds bmclip; a venv's bundled setuptools is too old).
    "$VPY" -m pip install -q --upgrade pip >/dev/null
    "$VPY" -m pip install -q "torch==${BMCLIP_TORCH_VERSION:-2.14.1}" "torchvision==${BMCLIP_TORCHVISION_VERSION:-0.29.1}" \
        "setuptools>=77,<85" "pybind11>=2.12,<4" "ninja>=1.11"
    log "installing bmclip (editable, dev extras) and building the C++ extension"
    "$VPY" -m pip install -q --no-build-isolation -e ".[dev]"
    echo "$hash" > "$stamp"
else
    log "environment up to date ($VENV)"
fi
