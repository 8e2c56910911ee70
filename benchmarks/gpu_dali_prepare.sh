#!/usr/bin/env bash
# Here (a machine with pip and network): fetch DALI and the wheels it needs for the GPU box's Python 3.12,
# and cut them into parts small enough for the device tool's 64 MiB carry limit.
#
#   bash benchmarks/gpu_dali_prepare.sh        # -> .dali/part-aa, part-ab, ... (ignored by git)
#
# Then, on ONE warm device machine, back to back (it is given back after ~30 s idle, which loses the
# parts already sent): one call per part with `carry: [".dali/part-XX"]` and the command
# `ls -la .dali`, and the last part's call running `bash benchmarks/gpu_dali.sh` (which joins the
# parts, installs to /tmp/site_dali and times the DALI GPU path against the C++ loader). Parts carried
# earlier stay on the warm machine (ignored paths are kept between calls). ~260 MB -> 5 parts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PART_MB="${PART_MB:-55}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# nvidia-dali-cuda130 and its Requires-Dist that the GPU image lacks (KINDS.md lists what it has)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work" \
    nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
    nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13 \
    astunparse gast optree nvtx makefun "libcst~=1.8"
rm -rf .dali.tmp && mkdir .dali.tmp
(cd "$work" && sha256sum ./*.whl > SHA256SUMS && tar cf - ./*.whl SHA256SUMS) | split -b "${PART_MB}M" - .dali.tmp/part-
rm -rf .dali && mv .dali.tmp .dali
ls -la .dali
echo "carry one part per call, in order: $(cd .dali && echo part-*)"
