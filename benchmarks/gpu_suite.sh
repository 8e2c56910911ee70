#!/usr/bin/env bash
# One GPU call: bf16 correctness of every kernel, then each kernel and the training step timed against its
# baseline in the same process, on the same card. Sized to finish in about 9 minutes on one H100/H200: the
# step limits add up to 530 s, under the device tool's 600 s per command (run it with timeout_s=600), and
# the steps run most important first. A step that reaches its limit gets SIGINT; every benchmark then writes
# the rows it has (JSON "interrupted": true, exit 130). Triton compiles each autotune config serially on first
# use (~1 s each on this VM; a flash-attention case has 48), which is what most of the limits pay for.
# DALI's GPU timing needs its wheels carried: see gpu_dali.sh.
#
#   bash benchmarks/gpu_suite.sh            # writes JSON/logs under $OUT (default: ./gpu_suite_out)
#
# Works from a plain source checkout on a box that cannot pip install (torch + triton preinstalled):
# bmclip is put on PYTHONPATH, bmclip.kernels resolves from the repo (bmclip/__init__.py), and missing
# pure-Python peers (open_clip_torch, ftfy, wcwidth) can travel as wheels in .whl/ (see below). The C++
# loader is built in place when CMake, pybind11 and libjpeg/libpng headers are there; if not, the loader's
# GPU section is skipped and says so.
#
# Prepare the wheels once on a machine with pip (not committed):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl open_clip_torch==3.3.0 ftfy wcwidth
# (add xformers==0.0.35 for its attention rows; its compiled ops were built for another torch, so only its
# PyTorch-backed kernels may run)
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"

log() { echo "[gpu_suite $(date +%H:%M:%S)] $*" | tee -a "$OUT/suite.log"; }
step() {  # step NAME TIMEOUT_S CMD... : run with a time limit, log to $OUT/NAME.log, record status
    local name=$1 limit=$2; shift 2
    log "start $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
    tail -n 25 "$OUT/$name.log"
}

if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"

# The C++ loader (optional here): build in place without network.
if "$PY" -c "import pybind11" 2>/dev/null && [[ -f /usr/include/jpeglib.h && -f /usr/include/png.h ]]; then
    step build_ext 45 "$PY" setup.py build_ext --inplace
else
    log "C++ loader not built here (pybind11 or libjpeg/libpng headers missing): loader GPU section skipped"
fi

# 1. Correctness on the GPU (bf16/fp16 kernels, unpadded tower, DALI/loader GPU paths where installed).
# One config per autotuned kernel (BMCLIP_AUTOTUNE_MAX_CONFIGS=1): with full autotuning these tests alone
# would compile ~800 configs (several minutes); the numerics checked do not depend on the tile config. The
# tests spread over pytest-xdist workers when the box has it (it does: KINDS.md), so compiles run in parallel.
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8 --dist load)
BMCLIP_AUTOTUNE_MAX_CONFIGS=1 step gpu_tests 100 "$PY" -m pytest -q --maxfail=5 -m gpu -p no:cacheprovider \
    ${xdist[@]+"${xdist[@]}"} \
    tests/test_contrastive_loss.py tests/test_flash_attention.py tests/test_unpadded_text.py tests/test_fused_ops.py \
    tests/test_xformers_wrapper.py

# 2. Contrastive loss vs open_clip ClipLoss and plain torch (time + peak memory; 1M rows for ours). Sizes run
# in ascending order on purpose: B >= 64k share one autotune key, tuned at 64k (tuning at 1M would take minutes).
step bench_loss 105 "$PY" benchmarks/bench_loss.py --time-budget 6 --out "$OUT/bench_loss"

# 3. Attention: ViT-B shape and varlen text vs every SDPA backend (+ xformers if present); text tower.
step bench_attention 100 "$PY" benchmarks/bench_attention.py --reps 10 --out "$OUT/bench_attention.json"

# 4. Training step: bmclip vs open_clip 3.3 on biomedclip-vit-b16-224, bf16, synthetic data.
step bench_train 110 "$PY" benchmarks/bench_train.py --batch 256 512 --iters 6 --warmup 2 \
    --out "$OUT/bench_train.json"

# 5. Fused LayerNorm / add+LayerNorm / bias-GELU vs torch eager (then torch.compile while the budget lasts).
step bench_fused_ops 30 "$PY" benchmarks/bench_fused_ops.py --reps 10 --time-budget 18 \
    --out "$OUT/bench_fused_ops.json"

# 6. Loader to GPU (C++ decode + torch normalisation on the GPU; DALI if installed).
if "$PY" -c "import bmclip._C" 2>/dev/null; then
    step bench_loader_gpu 40 "$PY" benchmarks/bench_loader.py --gpu --n 2048 --batch 256 --repeats 2 \
        --only 'ours_gpu_norm_*,dali_gpu_*' --out "$OUT/bench_loader_gpu.json"
fi

log "done"
echo "==== status ===="
cat "$OUT/status.txt"
