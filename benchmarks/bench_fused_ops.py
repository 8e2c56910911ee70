"""Fused LayerNorm / add+LayerNorm / bias-GELU (bmclip.kernels.fused_ops) vs torch eager and torch.compile (CUDA).

Shapes (activations in --dtype, bf16 by default; parameters in the same dtype):

* ``vit``: ViT-B/16-224 at batch 256 -> 256 * 197 = 50432 tokens;
* ``bert``: the packed tokens of 256 captions drawn from the real caption-length distribution
  (``benchmarks/data/caption_lengths.json``, as bench_attention.py), i.e. what the unpadded text tower runs.

LayerNorm width 768, bias-GELU width 3072 (the MLP hidden size). Cases and the bytes credited to them (the
minimal HBM traffic of the op; the same count for every method, so GB/s is proportional to speed):

=========  ==========================  ===============================  ====================================
case       computes                    forward bytes                    backward bytes
=========  ==========================  ===============================  ====================================
ln         y = LN(x)                   read x, write y                  read x, dy; write dx
add_ln     s = x + r, y = LN(s)        read x, r; write y, s            read s, dy, ds; write dx, dr
bias_gelu  y = GELU(x + b), exact erf  read x, write y                  read x, dy; write dx
=========  ==========================  ===============================  ====================================

(dW/dB/db reductions and the (M,) statistics are not credited.) Forward times are training forwards (inputs
require grad). Also ``fc1_gelu`` (ms only): GELU(x W^T + b) with the GEMM, where eager/compile put the bias
in the GEMM and fused runs the GEMM without bias then bias_gelu (what fused_ops=True does); and ``vit_block``
(ms only): one ViT-B block, batch 128, bf16 autocast, SDPA attention, fused_ops off vs on.

    python benchmarks/bench_fused_ops.py --out fused_ops.json
    python benchmarks/bench_fused_ops.py --shapes vit --no-compile --time-budget 20

Needs CUDA (refuses to run otherwise: CPU timings of the Triton interpreter mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import torch.nn.functional as F
from bench_common import keep_results_on_sigint, median_ms, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LENGTHS_JSON = REPO / "benchmarks" / "data" / "caption_lengths.json"
WIDTH, HIDDEN = 768, 3072


class _OutOfTime(Exception):
    pass


def shape_tokens(name: str, captions: int = 256, seed: int = 0) -> int:
    """Rows (tokens) of a shape: ViT-B/16-224 batch 256, or the packed tokens of drawn captions."""
    if name == "vit":
        return 256 * 197
    dist = json.loads(LENGTHS_JSON.read_text())["lengths"]
    rng = random.Random(seed)
    return sum(rng.choice(dist) for _ in range(captions))


def _timer(warmup: int, reps: int, deadline: float):
    def run(fn) -> float:
        """Median ms of fn() over reps after warmup (CUDA events); _OutOfTime past the deadline."""
        if time.monotonic() > deadline:
            raise _OutOfTime("time budget used up")
        return median_ms(fn, warmup, reps, cuda=True)

    return run


# --------------------------------------------------------------------------------------------- cases


def make_case(case: str, rows: int, device, dtype):
    """(inputs, output grads, {method: fn}, (fwd bytes, bwd bytes)) for one case at ``rows`` tokens."""
    from bmclip.kernels.fused_ops import bias_gelu, layer_norm

    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    leaf = lambda t: t.requires_grad_(True)
    el = torch.tensor([], dtype=dtype).element_size()
    if case == "ln":
        x, w, b = leaf(rnd(rows, WIDTH)), leaf(1 + 0.1 * rnd(WIDTH)), leaf(0.1 * rnd(WIDTH))
        eager = lambda x, w, b: F.layer_norm(x, (WIDTH,), w, b, 1e-6)
        fused = lambda x, w, b: layer_norm(x, w, b, 1e-6, backend="triton")
        n = rows * WIDTH * el
        return (x, w, b), (rnd(rows, WIDTH),), {"eager": eager, "fused": fused}, (2 * n, 3 * n)
    if case == "add_ln":
        x, r = leaf(rnd(rows, WIDTH)), leaf(rnd(rows, WIDTH))
        w, b = leaf(1 + 0.1 * rnd(WIDTH)), leaf(0.1 * rnd(WIDTH))

        def eager(x, r, w, b):
            s = x + r
            return F.layer_norm(s, (WIDTH,), w, b, 1e-6), s

        fused = lambda x, r, w, b: layer_norm(x, w, b, 1e-6, residual=r, backend="triton")
        n = rows * WIDTH * el
        return (x, r, w, b), (rnd(rows, WIDTH), rnd(rows, WIDTH)), {"eager": eager, "fused": fused}, (4 * n, 5 * n)
    if case == "bias_gelu":
        x, b = leaf(rnd(rows, HIDDEN)), leaf(0.5 * rnd(HIDDEN))
        eager = lambda x, b: F.gelu(x + b)
        fused = lambda x, b: bias_gelu(x, b, backend="triton")
        n = rows * HIDDEN * el
        return (x, b), (rnd(rows, HIDDEN),), {"eager": eager, "fused": fused}, (2 * n, 3 * n)
    if case == "fc1_gelu":
        x = leaf(rnd(rows, WIDTH))
        w, b = leaf(0.02 * rnd(HIDDEN, WIDTH)), leaf(0.02 * rnd(HIDDEN))
        eager = lambda x, w, b: F.gelu(F.linear(x, w, b))
        fused = lambda x, w, b: bias_gelu(F.linear(x, w), b, backend="triton")
        return (x, w, b), (rnd(rows, HIDDEN),), {"eager": eager, "fused": fused}, (None, None)
    raise ValueError(f"unknown case {case!r}")


def measure(timer, fn, inputs, grads):
    """(training-forward ms, forward+backward ms, outputs of one call)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)

    def f():
        fn(*inputs)

    def fb():
        for t in inputs:
            t.grad = None
        o = fn(*inputs)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)

    return timer(f), timer(fb), [o.detach() for o in outs]


def bench_ops(rows_out, timer, device, dtype, shapes, cases, methods_wanted):
    for shape in shapes:
        rows = shape_tokens(shape)
        for case in cases:
            inputs, grads, methods, (bytes_f, bytes_b) = make_case(case, rows, device, dtype)
            if "compile" in methods_wanted:
                methods["compile"] = torch.compile(methods["eager"], dynamic=False)
            ref = None
            for name in methods_wanted:
                row = {"shape": shape, "tokens": rows, "case": case, "method": name}
                try:
                    ms_f, ms_fb, outs = measure(timer, methods[name], inputs, grads)
                except _OutOfTime as e:
                    row["skipped"] = str(e)
                    rows_out.append(row)
                    print(f"  {shape:5s} {case:10s} {name:8s} skipped ({e})", flush=True)
                    continue
                except Exception as e:  # e.g. torch.compile unavailable on this box: reported, not fatal
                    row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    rows_out.append(row)
                    print(f"  {shape:5s} {case:10s} {name:8s} skipped ({row['skipped']})", flush=True)
                    continue
                if name == "eager":
                    ref = outs
                row.update(fwd_ms=ms_f, fwd_bwd_ms=ms_fb)
                if bytes_f is not None:
                    row["fwd_gbps"] = bytes_f / (ms_f * 1e-3) / 1e9
                    row["fwd_bwd_gbps"] = (bytes_f + bytes_b) / (ms_fb * 1e-3) / 1e9
                rows_out.append(row)
                gb = (f"{row['fwd_gbps']:7.0f} GB/s | fwd+bwd {ms_fb:8.3f} ms {row['fwd_bwd_gbps']:7.0f} GB/s"
                      if bytes_f is not None else f"        | fwd+bwd {ms_fb:8.3f} ms")
                print(f"  {shape:5s} {case:10s} {name:8s} fwd {ms_f:8.3f} ms {gb}", flush=True)
            # Same inputs, so the fused outputs must agree with eager to the dtype's rounding: recorded.
            fused_row = next((r for r in rows_out if r["shape"] == shape and r["case"] == case
                              and r["method"] == "fused" and "fwd_ms" in r), None)
            if ref is not None and fused_row is not None:
                outs = methods["fused"](*inputs)
                outs = outs if isinstance(outs, tuple) else (outs,)
                fused_row["max_abs_diff_vs_eager"] = max(
                    (o.detach().float() - r.float()).abs().max().item() for o, r in zip(outs, ref))
            del inputs, grads, methods
            torch.cuda.empty_cache()


def bench_vit_block(rows_out, timer, device, dtype, batch: int = 128):
    from bmclip.model.config import VisionConfig
    from bmclip.model.vit import ViTBlock

    torch.manual_seed(0)
    block = ViTBlock(VisionConfig(), "sdpa").to(device)
    x = torch.randn(batch, 197, WIDTH, device=device, requires_grad=True)
    dy = torch.randn(batch, 197, WIDTH, device=device)
    for fused in (False, True):
        name = "fused" if fused else "eager"
        block.fused_ops = fused
        block.mlp.fused_ops = fused

        def fb():
            x.grad = None
            block.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                out = block(x)
            out.backward(dy)

        def f():
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                block(x)

        row = {"shape": f"vit_block_b{batch}", "tokens": batch * 197, "case": "vit_block", "method": name}
        try:
            row.update(fwd_ms=timer(f), fwd_bwd_ms=timer(fb))
        except _OutOfTime as e:
            row["skipped"] = str(e)
        rows_out.append(row)
        print(f"  vit_block b{batch} {name:8s} " + (f"fwd {row['fwd_ms']:8.3f} ms | fwd+bwd {row['fwd_bwd_ms']:8.3f} ms"
                                                   if "fwd_ms" in row else f"skipped ({row['skipped']})"), flush=True)


def summary(rows) -> dict:
    """fwd+bwd speed-up of fused over eager and over compile, per shape and case."""
    out = {}
    by = {(r["shape"], r["case"], r["method"]): r for r in rows if "fwd_bwd_ms" in r}
    for (shape, case, method), r in by.items():
        if method != "fused":
            continue
        for base in ("eager", "compile"):
            b = by.get((shape, case, base))
            if b:
                out[f"{shape}/{case} fused vs {base} (fwd+bwd)"] = round(b["fwd_bwd_ms"] / r["fwd_bwd_ms"], 3)
                out[f"{shape}/{case} fused vs {base} (fwd)"] = round(b["fwd_ms"] / r["fwd_ms"], 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--shapes", default="vit,bert", help="comma list of vit, bert")
    ap.add_argument("--cases", default="ln,add_ln,bias_gelu,fc1_gelu,vit_block")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (compile time)")
    ap.add_argument("--time-budget", type=float, default=600.0,
                    help="seconds; measurements not started by then are recorded as skipped")
    ap.add_argument("--out", type=Path, help="write the JSON results here (atomically)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused_ops: needs a CUDA device (Triton interpreter timings on CPU would mean nothing)",
              file=sys.stderr)
        return 2
    shapes = [s for s in args.shapes.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    for s in shapes:
        if s not in ("vit", "bert"):
            ap.error(f"unknown shape {s!r}")
    for c in cases:
        if c not in ("ln", "add_ln", "bias_gelu", "fc1_gelu", "vit_block"):
            ap.error(f"unknown case {c!r}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda")
    import triton

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dtype": args.dtype, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "bert_tokens": shape_tokens("bert") if "bert" in shapes else None}
    print(f"bench_fused_ops on {env['device']} ({args.dtype}), torch {env['torch']}, triton {env['triton']}",
          flush=True)
    timer = _timer(args.warmup, args.reps, time.monotonic() + args.time_budget)
    rows: list[dict] = []
    op_cases = [c for c in cases if c != "vit_block"]
    status: dict = {}
    with keep_results_on_sigint("bench_fused_ops", status):
        # Fused and eager for every case first, the (slow to compile) torch.compile baseline last, so a tight
        # --time-budget drops compile rows rather than the comparison itself.
        bench_ops(rows, timer, device, dtype, shapes, op_cases, ("fused", "eager"))
        if "vit_block" in cases:
            bench_vit_block(rows, timer, device, dtype)
        if not args.no_compile:
            bench_ops(rows, timer, device, dtype, shapes, op_cases, ("compile",))
    result = {"env": env, "rows": rows, "summary": summary(rows), "interrupted": status["interrupted"]}
    for k, v in result["summary"].items():
        print(f"{k}: {v}")
    if args.out:
        write_json_atomic(args.out, result)
    return 130 if status["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
