#!/usr/bin/env bash
# On the GPU box, after every .dali/part-* made by gpu_dali_prepare.sh has been carried: join the parts,
# install DALI to /tmp/site_dali (no network, no root) and time the trainer's two data paths on the GPU at
# batch 256: DALI `mixed` (nvJPEG) decode + crop + normalise (DaliShardSource) vs the C++ loader +
# ShardSource + normalize_images.
# Results: $OUT/bench_loader_dali_gpu.json (and the table in the log).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
work=/tmp/dali_wheels
rm -rf "$work" && mkdir -p "$work"
cat .dali/part-* | tar xf - -C "$work" || { echo "parts missing or damaged: $(ls .dali)"; exit 2; }
(cd "$work" && sha256sum -c --quiet SHA256SUMS) || { echo "checksum mismatch: a part is missing"; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_dali "$work"/*.whl || exit 2
export PYTHONPATH="$PYTHONPATH:/tmp/site_dali"
"$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)" || exit 2
if ! "$PY" -c "import bmclip._C" 2>/dev/null; then
    "$PY" setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 || echo "C++ loader not built (see build_ext.log)"
fi
timeout 240 "$PY" benchmarks/bench_loader.py --gpu --n 2048 --batch 256 --repeats 3 --only 'ours_gpu_norm_*,dali_gpu_*' \
    --out "$OUT/bench_loader_dali_gpu.json" 2>&1 | tee "$OUT/bench_loader_dali_gpu.log"
