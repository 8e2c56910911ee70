#!/usr/bin/env python
"""Contrastive-loss benchmark: forward+backward time and peak memory, bmclip vs open_clip vs plain torch.

GPU (default): B ∈ {4k, 16k, 32k, 64k, 256k, 1M}, D=512, bf16 features (what a bf16-autocast trainer
hands the loss), fp32 logit scale. All
implementations run side by side in one process on the same inputs; a baseline that runs out of
memory is recorded as "OOM" and skipped for larger B. The card's bf16 matmul peak is measured first
(an 8192³ matmul) and the Triton kernels' achieved TFLOP/s is reported against it.

For the Triton rows the work model (``contrastive_triton.loss_work``) gives the GEMM-equivalent passes over
B×B×D and the operand bytes the programs load, for the configs the autotuner picked; ``meta["work_model"]``
lists both for every kept config at every B. fp32 (``--dtype fp32``) runs the one fixed fp32 config (never
autotuned). Above B = 65536 the autotune key is the 64k one, so B = 256k and 1M reuse its tuning.

``--quick``: tiny CPU run (torch backends, fp32) that only proves the script works (used by a test).

Writes JSON and CSV (``--out`` prefix) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing: kernels/ imports standalone
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import keep_results_on_sigint  # noqa: E402

from bmclip.io import atomic_write_text  # noqa: E402

try:
    from bmclip.kernels import clip_loss
    from bmclip.kernels import contrastive_triton as _ct
except ImportError:  # not installed: the folder itself is importable (torch + triton only)
    from kernels import clip_loss
    from kernels import contrastive_triton as _ct


def _plain_torch_loss(I, T, s):
    logits = s * I @ T.T
    labels = torch.arange(I.shape[0], device=I.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _impls(include_torch_backend: bool):
    impls = {"bmclip_triton": lambda I, T, s: clip_loss(I, T, s, backend="triton")}
    if include_torch_backend:
        impls["bmclip_torch"] = lambda I, T, s: clip_loss(I, T, s, backend="torch")
    try:
        from open_clip.loss import ClipLoss as OpenClipLoss

        oc = OpenClipLoss()
        impls["open_clip"] = lambda I, T, s: oc(I, T, s)
    except ImportError:
        print("open_clip not importable: skipping that baseline", file=sys.stderr)
    impls["plain_torch"] = _plain_torch_loss
    return impls


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device, dtype, n=8192, iters=20) -> float:
    """Measured dense matmul throughput of this card (TFLOP/s) for an n³ product in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    dt = (time.perf_counter() - t0) / iters
    del a, b
    return 2 * n**3 / dt / 1e12


def time_one(fn, B, D, dtype, device, warmup, iters, time_budget_s, first_call=True):
    """(median seconds per fwd+bwd, peak extra bytes or None, loss value) for one implementation.

    Stops warming up and timing once ``time_budget_s`` has passed after the first call (at least one timed
    step: the peak-memory step, which runs after the first call and any warm-ups). ``first_call=False`` skips
    the untimed first call, for kernels already compiled and tuned for this shape's autotune key."""
    g = torch.Generator(device="cpu").manual_seed(B)
    I = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    T = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, device=device, requires_grad=True)

    def step():
        I.grad = T.grad = s.grad = None
        loss = fn(I, T, s)
        loss.backward()
        return loss

    first_s = 0.0
    if first_call:  # compiles / autotunes (the autotuner's own buffers must not count as peak)
        t0 = time.perf_counter()
        step()
        _sync(device)
        first_s = time.perf_counter() - t0
    # The budget starts after the first call (compiles and autotuning are not timed) and covers the warm-ups:
    # at B = 1M one fwd+bwd takes seconds, so a first call longer than half the budget means no warm-up (the
    # kernels are compiled and tuned by then) and the peak step is the one timed step.
    t_start = time.perf_counter()
    for _ in range(warmup if first_s <= time_budget_s / 2 else 0):
        if time.perf_counter() - t_start > time_budget_s:
            break
        step()
    _sync(device)
    if device.type == "cuda":
        I.grad = T.grad = s.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    loss = step()  # peak extra memory of one fwd+bwd (includes the gradients it creates); also a timed step
    _sync(device)
    times = [time.perf_counter() - t0]
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None
    for _ in range(iters - 1):
        if time.perf_counter() - t_start > time_budget_s:
            break
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    value = float(loss.detach())
    return times[len(times) // 2], peak, value


def _measure_row(name, fn, B, D, dtype, device, args, dead, peak_tflops, warm_big) -> dict:
    """One result row: time/memory of ``name`` at batch ``B`` (or why it was skipped / ran out of memory)."""
    rec = {"impl": name, "B": B, "D": D, "dtype": str(dtype).replace("torch.", ""), "status": "ok",
           "time_ms": None, "peak_mem_mb": None, "loss": None, "tflops": None, "pct_of_peak": None,
           "passes": None, "operand_mb": None, "fwd_config": None, "bwd_config": None}
    if name in dead:
        rec["status"] = "skipped (OOM at smaller B)"
        return rec
    if name == "bmclip_torch" and device.type == "cuda" and B > args.torch_backend_max_b:
        rec["status"] = f"skipped (B > --torch-backend-max-b {args.torch_backend_max_b})"
        return rec
    try:
        # Triton at B > 64k: one autotune key (batch buckets cap at 65536) and the two-pass forward, both
        # compiled and tuned by the first such B, so at the next (1M: ~15 s per step) the first call is skipped.
        n_rb = math.ceil(B / _ct._FWD_BM)
        big = (name == "bmclip_triton" and _ct._bucket(B) == _ct._bucket(1 << 40)
               and n_rb * B * 4 > _ct._COLPART_MAX_BYTES)
        t, peak, val = time_one(fn, B, D, dtype, device, args.warmup, args.iters, args.time_budget,
                                first_call=not (big and name in warm_big))
        if big:
            warm_big.add(name)
        rec.update(time_ms=t * 1e3, loss=val, peak_mem_mb=None if peak is None else peak / 2**20)
        if name == "bmclip_triton":
            # executed tensor-op work of the configs the autotuner picked (the work model shares the launchers'
            # grid and loop geometry); fp32 runs the fixed config
            fc, bc = _picked_configs(D, dtype)
            w = _ct.loss_work(B, D, dtype, fc, bc, interpreted=False)
            rec.update(passes=w["passes"], operand_mb=w["operand_bytes"] / 2**20,
                       fwd_config=_cfg_label(w["fwd_config"]), bwd_config=_cfg_label(w["bwd_config"]))
            flops = w["flops"]
            rec["tflops"] = flops / t / 1e12
            if peak_tflops:
                rec["pct_of_peak"] = 100.0 * rec["tflops"] / peak_tflops
    except torch.cuda.OutOfMemoryError:
        rec["status"] = "OOM"
        dead.add(name)
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        rec["status"] = "OOM"
        dead.add(name)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


_CSV_COLS = ["impl", "B", "D", "dtype", "status", "time_ms", "peak_mem_mb", "loss", "tflops", "pct_of_peak",
             "passes", "operand_mb", "fwd_config", "bwd_config", "time_vs_open_clip", "mem_vs_open_clip"]


def _cfg_label(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def _picked_configs(D: int, dtype):
    """(fwd, bwd) configs the autotuners last picked for this D's chunk class (None: the default/fixed one)."""
    if dtype == torch.float32 or not getattr(_ct, "_TUNERS", None):
        return None, None
    out = []
    for kind in ("fwd", "bwd"):
        bd0, bd1 = _ct._plan(kind, D, False, False)
        tuner = _ct._TUNERS.get((kind, _ct._wclass(bd0 + bd1, kind == "fwd" or D <= bd0 + bd1)))
        out.append(getattr(tuner, "best_config", None))
    return tuple(out)


def work_model_table(sizes, D: int, dtype) -> list[dict]:
    """Passes and operand bytes of every kept config at every B (pure Python: what the launches would do)."""
    rows = []
    if dtype == torch.float32:
        for B in sizes:
            w = _ct.loss_work(B, D, dtype, interpreted=False)
            rows.append(dict(B=B, fwd=_cfg_label(w["fwd_config"]), bwd=_cfg_label(w["bwd_config"]),
                             passes=w["passes"], operand_mb=w["operand_bytes"] / 2**20))
        return rows
    f0, f1 = _ct._plan("fwd", D, False, False)
    b0, b1 = _ct._plan("bwd", D, False, False)
    for B in sizes:
        for fc in _ct.fwd_configs(f0 + f1):
            for bc in _ct.bwd_configs(b0 + b1, D <= b0 + b1):
                w = _ct.loss_work(B, D, dtype, fc, bc, interpreted=False)
                rows.append(dict(B=B, fwd=_cfg_label(w["fwd_config"]), bwd=_cfg_label(w["bwd_config"]),
                                 passes=w["passes"], operand_mb=w["operand_bytes"] / 2**20))
    return rows


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    """Fill the vs-open_clip columns and write ``out``.json / .csv atomically (called after every row)."""
    ref = {r["B"]: r for r in rows if r["impl"] == "open_clip" and r["time_ms"] is not None}
    for r in rows:
        o = ref.get(r["B"])
        r["time_vs_open_clip"] = (r["time_ms"] / o["time_ms"]) if (o and r["time_ms"]) else None
        r["mem_vs_open_clip"] = (r["peak_mem_mb"] / o["peak_mem_mb"]) if (
            o and r["peak_mem_mb"] and o["peak_mem_mb"]) else None
    atomic_write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), out.with_suffix(".json"))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_COLS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), out.with_suffix(".csv"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096,16384,32768,65536,262144,1048576", help="batch sizes B")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--time-budget", type=float, default=60.0, help="seconds per (impl, B) before stopping")
    ap.add_argument("--torch-backend-max-b", type=int, default=65536,
                    help="largest B for bmclip's torch backend on GPU (fp32 chunked GEMMs: slow)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_loss"),
                    help="output prefix (.json and .csv are appended)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run (torch backends only)")
    args = ap.parse_args(argv)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.quick:
        device = torch.device("cpu")
        sizes, D, dtype = [256, 640], 64, torch.float32
        impls = _impls(True)
        impls.pop("bmclip_triton")  # the interpreter is a correctness tool, not something to time
        peak_tflops = None
    else:
        if not torch.cuda.is_available():
            print("bench_loss: no CUDA device; use --quick for a CPU smoke run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        sizes = [int(x) for x in args.sizes.split(",") if x]
        D = args.dim
        impls = _impls(True)
        peak_tflops = matmul_peak_tflops(device, dtype)
        print(f"{torch.cuda.get_device_name(device)}: measured {args.dtype} matmul peak {peak_tflops:.0f} TFLOP/s")

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "matmul_peak_tflops": peak_tflops,
        "quick": args.quick,
        "work_model": [] if args.quick else work_model_table(sizes, D, dtype),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    rows = []
    dead = set()  # baselines that went OOM: larger B would too
    warm_big = set()  # implementations already compiled and tuned for B > 65536
    with keep_results_on_sigint("bench_loss", meta):
        for B in sizes:
            for name, fn in impls.items():
                rows.append(_measure_row(name, fn, B, D, dtype, device, args, dead, peak_tflops, warm_big))
                r = rows[-1]
                shown = f"{r['time_ms']:.2f} ms" if r["time_ms"] is not None else r["status"]
                print(f"  B={B:>8} {name:<14} {shown}", flush=True)
                # after every row: the GPU suite stops this step with SIGINT and later ones may never come
                write_results(out, meta, rows)
    write_results(out, meta, rows)

    def fmt(v, f):
        return "-" if v is None else format(v, f)

    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  D={D} {str(dtype)[6:]}")
    print(f"{'B':>8} {'impl':<14} {'time ms':>10} {'peak MB':>10} {'x open_clip':>12} {'mem x oc':>9} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'passes':>6}  status")
    for r in rows:
        print(f"{r['B']:>8} {r['impl']:<14} {fmt(r['time_ms'], '.2f'):>10} {fmt(r['peak_mem_mb'], '.1f'):>10} "
              f"{fmt(r['time_vs_open_clip'], '.3f'):>12} {fmt(r['mem_vs_open_clip'], '.4f'):>9} "
              f"{fmt(r['tflops'], '.1f'):>8} {fmt(r['pct_of_peak'], '.0f'):>6} {fmt(r['passes'], '.2f'):>6}  "
              f"{r['status']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.csv')}")
    return 130 if meta["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
