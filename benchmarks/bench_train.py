"""Training throughput: bmclip vs open_clip 3.3 (timm ViT + HF BERT) on the same architecture and batch.

Both sides run the same recipe in ONE process on the same card: synthetic in-memory data (so the loader
is not measured), bf16 autocast, global CLIP loss, AdamW (fused on CUDA), and NO gradient checkpointing
unless asked (``--grad-checkpointing`` for the ``--batch`` rows; ``--ckpt-batch`` adds rows with it, both
sides). Caption lengths come from the real caption-length distribution (``benchmarks/data/caption_lengths.json``,
``--lengths captions``, the default) or a clipped log-normal (``--lengths lognormal --median-tokens``).
open_clip always runs padded to the 256 context (that is how it trains); bmclip runs the model's own
attention backends per tower (``--attn-backend`` overrides them; the flash backends run the text tower
unpadded), and the backends each tower was configured with, and the attention kernels one profiled step
really ran, go into the JSON.

bmclip's step is the trainer's own ``bmclip.train.gradcache.forward_backward`` with the loss fed features in
the autocast dtype (bf16), as the trainer's loss sees them under autocast: a bf16 loss, never an fp32 one.

Reports samples/s per GPU, step time, peak memory, and MFU: model FLOPs counted from the architecture
(``bmclip.train.metrics.train_step_flops``: matmul FLOPs × 3, real unpadded text tokens) over the card's bf16
matmul peak *measured* on this card (``--peak-json`` from ``roofline.py --measure``, ``--peak-tflops``, or an
8192³ bf16 matmul timed here), and beside it the datasheet MFU (``bmclip.train.metrics.PEAK_BF16_TFLOPS``).
Both sides get the same FLOP count, so MFU ratios equal throughput ratios. A batch that runs out of memory is
recorded as "oom", not hidden.

    python benchmarks/bench_train.py --batch 512 --ckpt-batch 512 --out bench_train.json       # GPU
    python benchmarks/bench_train.py --quick                                                     # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    keep_results_on_sigint,
    measure_matmul_tflops,
    read_peak_json,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parent.parent
LENGTHS_JSON = REPO / "benchmarks" / "data" / "caption_lengths.json"
AUTOTUNE_ENV = "BMCLIP_AUTOTUNE_MAX_CONFIGS"
# Kernel / op names that are attention (SDPA's flash / cuDNN / efficient kernels, bmclip's Triton kernels).
_ATTN_RE = re.compile(r"attn|attention|flash|fmha|sdpa|sdp_", re.IGNORECASE)


def caption_lengths(n: int, context: int, median: float, seed: int = 0, source: str = "lognormal") -> torch.Tensor:
    """Real token counts (incl. [CLS]/[SEP]) per caption, clipped to [8, context] (lognormal) or to context:
    ``"captions"`` draws from the real caption-length distribution, ``"lognormal"`` around ``median``."""
    if source == "captions":
        dist = json.loads(LENGTHS_JSON.read_text())["lengths"]
        rng = random.Random(seed)
        return torch.tensor([max(3, min(int(rng.choice(dist)), context)) for _ in range(n)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.6 + math.log(median)
    return x.exp().round().clamp(8, context).long()


def make_batch(b: int, image_size: int, context: int, vocab: int, median: float, device, seed: int = 0,
               source: str = "lognormal"):
    """Normalised float images (B,3,S,S) and padded input ids (B,L) with realistic lengths."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, image_size, image_size, generator=g)
    lengths = caption_lengths(b, context, median, seed, source)
    ids = torch.zeros(b, context, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = 2
        ids[i, 1:n - 1] = torch.randint(5, vocab, (n - 2,), generator=g)
        ids[i, n - 1] = 3
    return images.to(device), ids.to(device), lengths


def build_open_clip(mcfg, timm_model: str | None = None):
    """open_clip CustomTextCLIP with the same architecture, built offline (local BertConfig, no hub).

    ``timm_model`` replaces the ViT-B/16 image tower by another timm model (tests build small ones)."""
    import transformers
    from open_clip import hf_model
    from open_clip.model import CustomTextCLIP

    if timm_model is None and (mcfg.vision.width, mcfg.vision.layers, mcfg.vision.patch_size) != (768, 12, 16):
        raise SystemExit("the open_clip baseline is built for ViT-B/16 presets only")
    bert = transformers.BertConfig(vocab_size=mcfg.text.vocab_size, hidden_size=mcfg.text.width,
                                   num_hidden_layers=mcfg.text.layers, num_attention_heads=mcfg.text.heads,
                                   intermediate_size=mcfg.text.mlp_dim, max_position_embeddings=mcfg.text.max_positions,
                                   type_vocab_size=mcfg.text.type_vocab_size, layer_norm_eps=mcfg.text.ln_eps,
                                   pad_token_id=0,
                                   # the same work as bmclip's tower: its dropout, and no attention dropout (HF's
                                   # defaults of 0.1 each gave the baseline 12 layers of dropout bmclip does not run)
                                   hidden_dropout_prob=mcfg.text.dropout, attention_probs_dropout_prob=0.0)
    name = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    cfg = {
        "embed_dim": mcfg.embed_dim,
        "vision_cfg": {"timm_model_name": timm_model or f"vit_base_patch16_{mcfg.vision.image_size}",
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                       "image_size": mcfg.vision.image_size, "patch_dropout": 0.0},
        "text_cfg": {"hf_model_name": name, "hf_tokenizer_name": name, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": mcfg.text.context_length,
                     "hf_model_pretrained": False},
    }
    orig = hf_model.AutoConfig.from_pretrained
    hf_model.AutoConfig.from_pretrained = lambda *a, **k: bert
    try:
        return CustomTextCLIP(**cfg, output_dict=True)
    finally:
        hf_model.AutoConfig.from_pretrained = orig


def run_side(name, model, step_fn, device, warmup, iters):
    """Time ``iters`` training steps after ``warmup``; returns dict with step_s and peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step_fn()  # the first step: compiles, autotunes, allocates (not timed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / iters
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_s": dt, "first_step_s": first_s, "peak_mem_gib": mem}


def profile_step(step_fn, device, top: int = 8) -> dict:
    """Run one step under torch.profiler: the attention kernels/ops it ran (calls, time) and the top kernels.

    Records which attention implementation really ran (SDPA's flash / cuDNN / efficient kernels, bmclip's
    Triton kernels), whatever the model's configuration says."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step_fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = list(prof.key_averages())
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0

    def rec(e):
        return {"name": e.key[:160], "calls": int(e.count), "ms": getattr(e, key, 0.0) / 1e3,
                "share": getattr(e, key, 0.0) / total}

    attn = [rec(e) for e in events if _ATTN_RE.search(e.key) and (getattr(e, key, 0.0) > 0 or not cuda)]
    attn.sort(key=lambda r: -r["ms"])
    tops = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    return {"timer": "device" if cuda else "cpu", "attention": attn[:16], "top": [rec(e) for e in tops]}


def _profile_or_error(step_fn, device):
    """profile_step, or the error it raised (the side's timing stands either way)."""
    try:
        return profile_step(step_fn, device)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        return _error(e)


def tower_backends(model, device=None) -> dict:
    """The attention backend each tower of a bmclip model runs on ``device`` (``auto`` resolved by the model:
    SDPA for the ViT and Triton for the unpadded text tower on CUDA), else the configured names."""
    resolve = getattr(model, "attn_backends", None)
    if callable(resolve):
        ran = resolve(device)
        return {"visual": [ran["image"]], "text": [ran["text"]]}
    out = {}
    for tower in ("visual", "text"):
        mod = getattr(model, tower, None)
        names = sorted({str(m.attn_backend) for m in mod.modules() if hasattr(m, "attn_backend")}) if mod else []
        out[tower] = names or ["unknown"]
    return out


def checkpointing_state(model) -> dict:
    """Whether each tower really recomputes activations in backward: bmclip's towers (``grad_checkpointing``),
    open_clip's timm trunk (``grad_checkpointing``) and HF text transformer (``is_gradient_checkpointing``);
    None where the model has no such switch."""
    out = {}
    for tower in ("visual", "text"):
        mod = getattr(model, tower, None)
        state = None
        for obj in (mod, getattr(mod, "trunk", None), getattr(mod, "transformer", None)):
            if obj is None:
                continue
            hf = next((n for n in ("is_activation_checkpointing", "is_gradient_checkpointing")
                       if isinstance(getattr(type(obj), n, None), property)), None)
            if hf is not None:
                state = bool(getattr(obj, hf))
            elif isinstance(getattr(obj, "grad_checkpointing", None), bool):
                state = state or obj.grad_checkpointing
        out[tower] = state
    return out


def set_checkpointing(model, enable: bool) -> dict:
    """Switch gradient checkpointing of both towers to ``enable`` and check that it took: open_clip's HF text
    tower turns checkpointing ON for ``set_grad_checkpointing(False)`` too (open_clip 3.3 ignores the flag
    there), so it is only ever called to enable. Raises RuntimeError when a tower ends up otherwise."""
    if enable:
        model.set_grad_checkpointing(True)
    elif hasattr(model, "config") and hasattr(model, "set_attn_backend"):  # bmclip: an explicit off is safe
        model.set_grad_checkpointing(False)
    state = checkpointing_state(model)
    wrong = {k: v for k, v in state.items() if v is not None and v != enable}
    if wrong:
        raise RuntimeError(f"gradient checkpointing {'on' if enable else 'off'} asked, towers report {state}")
    return state


def _error(e: BaseException) -> str:
    """A side's result when it raised: the traceback goes to stderr, the first line into the JSON."""
    import traceback

    traceback.print_exc()
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _free_memory(device) -> None:
    """Give the side just measured's memory back before the other side runs (no cross-side OOM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _autocast_factory(device, dtype):
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def bench_batch(args, b, device, mcfg, peak, rows=None, *, grad_checkpointing=False, profile=False):
    """One row: batch ``b`` (with or without gradient checkpointing), bmclip then open_clip; the row is appended
    to ``rows`` first, so an interrupt keeps a side already measured."""
    from bmclip.kernels import ClipLoss

    from bmclip.model import create_model
    from bmclip.train.config import OptimSection
    from bmclip.train.gradcache import forward_backward
    from bmclip.train.metrics import train_step_flops
    from bmclip.train.optim import build_optimizer

    amp = args.amp_dtype
    autocast = _autocast_factory(device, amp)
    images, ids, lengths = make_batch(b, mcfg.vision.image_size, mcfg.text.context_length,
                                      mcfg.text.vocab_size, args.median_tokens, device, source=args.lengths)
    flops = train_step_flops(mcfg, batch=b, text_token_counts=lengths.tolist())
    res = {"batch": b, "grad_checkpointing": grad_checkpointing, "model_tflop_per_step": flops / 1e12,
           "mean_tokens": float(lengths.float().mean()), "context": mcfg.text.context_length}
    if rows is not None:
        rows.append(res)

    def finish(side, r):
        r["samples_per_s"] = b / r["step_s"]
        r["mfu"] = flops / r["step_s"] / (peak * 1e12) if peak else None
        r["mfu_datasheet"] = flops / r["step_s"] / (args.datasheet_peak * 1e12) if args.datasheet_peak else None
        res[side] = r

    # --- bmclip
    model = fwd = opt = None
    try:
        torch.manual_seed(0)
        overrides = {}
        if args.attn_backend:
            overrides["attn_backend"] = args.attn_backend
        if args.fused_ops is not None:
            overrides["fused_ops"] = args.fused_ops
        model = create_model(mcfg, **overrides).to(device).train()
        ckpt_state = set_checkpointing(model, grad_checkpointing)
        backends = tower_backends(model, device)
        fwd = torch.compile(model) if args.compile else model
        opt = build_optimizer(model, OptimSection(), device.type)
        lf = ClipLoss()
        seen = {}

        def loss_fn(i, t, s, _bias):
            # The features as the trainer's loss sees them under autocast: the autocast dtype, never fp32.
            if amp is not None:
                i, t = i.to(amp), t.to(amp)
            seen.setdefault("loss_input_dtype", str(i.dtype).replace("torch.", ""))
            return lf(i, t, s)

        def ours():
            opt.zero_grad(set_to_none=True)
            forward_backward(fwd, images, ids, loss_fn, autocast=autocast)
            opt.step()

        r = run_side("bmclip", model, ours, device, args.warmup, args.iters)
        r.update(attn_backends=backends, fused_ops=bool(model.config.fused_ops), checkpointing=ckpt_state, **seen)
        finish("bmclip", r)
        if profile:
            r["profile"] = _profile_or_error(ours, device)
    except torch.OutOfMemoryError:
        res["bmclip"] = "oom"
    except Exception as e:  # recorded with its traceback, and the baseline still runs (one GPU call)
        res["bmclip"] = _error(e)
    finally:
        model = fwd = opt = None
        _free_memory(device)

    # --- open_clip (same architecture, same batch, padded text as open_clip trains)
    if not args.no_open_clip:
        oc = ocf = oc_opt = None
        try:
            from open_clip.loss import ClipLoss as OCClipLoss

            torch.manual_seed(0)
            oc = build_open_clip(mcfg).to(device).train()
            oc_ckpt = set_checkpointing(oc, grad_checkpointing)
            ocf = torch.compile(oc) if args.compile else oc
            kw = {"fused": True} if device.type == "cuda" else {}
            oc_opt = torch.optim.AdamW(oc.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, **kw)
            oc_loss = OCClipLoss()

            def theirs():
                oc_opt.zero_grad(set_to_none=True)
                with autocast():
                    out = ocf(images, ids)
                loss = oc_loss(out["image_features"], out["text_features"], out["logit_scale"])
                loss.backward()
                oc_opt.step()

            r = run_side("open_clip", oc, theirs, device, args.warmup, args.iters)
            r["checkpointing"] = oc_ckpt
            finish("open_clip", r)
            if profile:
                r["profile"] = _profile_or_error(theirs, device)
        except torch.OutOfMemoryError:
            res["open_clip"] = "oom"
        except Exception as e:
            res["open_clip"] = _error(e)
        finally:
            oc = ocf = oc_opt = None
            _free_memory(device)
        if isinstance(res.get("bmclip"), dict) and isinstance(res.get("open_clip"), dict):
            res["speedup"] = res["bmclip"]["samples_per_s"] / res["open_clip"]["samples_per_s"]
    return res


def row_plan(batches, ckpt_batches, grad_checkpointing: bool) -> list[tuple[int, bool]]:
    """(batch, checkpointing) per row, most valuable first: the first ``--batch`` row, then the ``--ckpt-batch``
    rows, then the other ``--batch`` rows."""
    plan = [(b, grad_checkpointing) for b in batches[:1]]
    plan += [(b, True) for b in ckpt_batches]
    plan += [(b, grad_checkpointing) for b in batches[1:]]
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="biomedclip-vit-b16-224")
    p.add_argument("--batch", type=int, nargs="+", default=[512], help="per-GPU batch sizes to try")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing for the --batch rows (default: off)")
    p.add_argument("--ckpt-batch", type=int, nargs="*", default=[],
                   help="extra rows WITH gradient checkpointing (both sides), run after the first --batch row")
    p.add_argument("--attn-backend", default=None,
                   help="bmclip attention backend for both towers (default: the model's own per-tower defaults)")
    p.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="bmclip Triton LayerNorm / bias-GELU (default: the model's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--lengths", choices=("captions", "lognormal"), default="captions",
                   help="caption lengths: the real distribution (default) or a log-normal (--median-tokens)")
    p.add_argument("--median-tokens", type=float, default=60.0)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps, the first (compiling) one included")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--peak-json", default=None, help="measured matmul peak from roofline.py --measure (for MFU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="measured bf16 matmul peak (TFLOP/s) for MFU")
    p.add_argument("--autotune-max-configs", type=int, default=None,
                   help=f"set {AUTOTUNE_ENV} (Triton autotuning keeps the first N configs per kernel)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile one step of the first row per side (which attention kernels ran)")
    p.add_argument("--no-open-clip", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU smoke: batch 4, 1 untimed + 1 timed step")
    p.add_argument("--out", default=None, help="write results JSON here")
    args = p.parse_args(argv)

    if args.autotune_max_configs is not None:
        if args.autotune_max_configs < 1:
            p.error("--autotune-max-configs must be >= 1")
        os.environ[AUTOTUNE_ENV] = str(args.autotune_max_configs)
    from bmclip.model.config import get_preset
    from bmclip.train.metrics import peak_tflops_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.batch, args.warmup, args.iters = [4], 1, 1
        args.ckpt_batch = args.ckpt_batch[:1] and [4]
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    args.amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    mcfg = get_preset(args.preset)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak, peak_source = args.peak_tflops, "--peak-tflops" if args.peak_tflops else None
    if peak is None and args.peak_json:
        rec = read_peak_json(args.peak_json)
        if rec.get("matmul_bf16_tflops"):
            peak, peak_source = float(rec["matmul_bf16_tflops"]), f"measured ({args.peak_json})"
    if peak is None and device.type == "cuda":
        peak, peak_source = measure_matmul_tflops(device), "measured here (8192^3 bf16 matmul)"
    args.datasheet_peak = peak_tflops_for(dev_name) if device.type == "cuda" else None
    meta = {"device": dev_name, "peak_bf16_tflops_measured": peak, "peak_source": peak_source,
            "peak_bf16_tflops_datasheet": args.datasheet_peak, "torch": torch.__version__, "preset": args.preset,
            "attn_backend_override": args.attn_backend, "fused_ops_override": args.fused_ops,
            "grad_checkpointing": args.grad_checkpointing, "ckpt_batch": args.ckpt_batch,
            "compile": args.compile, "precision": args.precision, "lengths": args.lengths,
            "median_tokens": args.median_tokens if args.lengths == "lognormal" else None,
            "warmup": args.warmup, "iters": args.iters,
            "autotune_max_configs": os.environ.get(AUTOTUNE_ENV) or None,
            "triton_cache_autotuning": os.environ.get("TRITON_CACHE_AUTOTUNING") or None}
    print(json.dumps(meta), flush=True)

    def save():
        if args.out:  # after every row: the GPU suite stops this step with SIGINT at its limit
            write_json_atomic(Path(args.out), json.loads(json.dumps({"meta": meta, "rows": rows}, default=str)))

    rows = []
    with keep_results_on_sigint("bench_train", meta):
        for i, (b, ckpt) in enumerate(row_plan(args.batch, args.ckpt_batch, args.grad_checkpointing)):
            r = bench_batch(args, b, device, mcfg, peak, rows, grad_checkpointing=ckpt,
                            profile=args.profile and i == 0)
            if i == 0 and isinstance(r.get("bmclip"), dict):
                meta["attn_backends"] = r["bmclip"].get("attn_backends")
            print(json.dumps({k: v for k, v in r.items()}, default=str)[:4000], flush=True)
            save()
    print(f"\n{'batch':>6} {'ckpt':>4} {'bmclip samples/s':>17} {'MFU':>6} {'mem GiB':>8} | "
          f"{'open_clip samples/s':>19} {'MFU':>6} {'mem GiB':>8} | speedup   (MFU vs measured peak "
          f"{peak if peak is None else round(peak)} TFLOP/s; datasheet {args.datasheet_peak})")

    def cells(r, side):
        v = r.get(side)
        if not isinstance(v, dict):
            return f"{str(v)[:17]:>17} {'':>6} {'':>8}"
        mfu = f"{v['mfu'] * 100:5.1f}%" if v.get("mfu") is not None else "   n/a"
        mem = f"{v['peak_mem_gib']:8.1f}" if v.get("peak_mem_gib") is not None else "     n/a"
        return f"{v['samples_per_s']:17.1f} {mfu} {mem}"

    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"{r['batch']:>6} {'yes' if r.get('grad_checkpointing') else 'no':>4} {cells(r, 'bmclip')} | "
              f"{cells(r, 'open_clip'):>36} | {sp}")
    save()
    return 130 if meta["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
