"""Training throughput: bmclip vs open_clip 3.3 (timm ViT + HF BERT) on the same architecture and batch.

Both sides run the same recipe in ONE process on the same card: synthetic in-memory data (so the loader
is not measured), bf16 autocast, gradient checkpointing (optional, same for both), global CLIP loss,
AdamW (fused on CUDA). Captions have realistic lengths (clipped log-normal, median ~60 tokens, tail to the
256 context); open_clip always runs padded to 256 (that is how it trains), bmclip runs its attention
backend (``--attn-backend``; the flash/triton backends run the text tower unpadded).

Reports samples/s per GPU, step time, peak memory, and MFU (model FLOPs counted from the architecture with
real, unpadded text tokens and patch dropout applied, over the card's bf16 peak from
``bmclip.train.metrics.PEAK_BF16_TFLOPS``) — the same FLOP count for both sides, so MFU ratios equal
throughput ratios. A batch that runs out of memory is recorded as "oom", not hidden.

    python benchmarks/bench_train.py --batch 256 512 1024 --out bench_train.json       # GPU
    python benchmarks/bench_train.py --quick                                           # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import keep_results_on_sigint, write_json_atomic  # noqa: E402


def caption_lengths(n: int, context: int, median: float, seed: int = 0) -> torch.Tensor:
    """Real token counts (incl. [CLS]/[SEP]) per caption: log-normal around ``median``, clipped to [8, context]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.6 + math.log(median)
    return x.exp().round().clamp(8, context).long()


def make_batch(b: int, image_size: int, context: int, vocab: int, median: float, device, seed: int = 0):
    """Normalised float images (B,3,S,S) and padded input ids (B,L) with realistic lengths."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, image_size, image_size, generator=g)
    lengths = caption_lengths(b, context, median, seed)
    ids = torch.zeros(b, context, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = 2
        ids[i, 1:n - 1] = torch.randint(5, vocab, (n - 2,), generator=g)
        ids[i, n - 1] = 3
    return images.to(device), ids.to(device), lengths


def build_open_clip(mcfg):
    """open_clip CustomTextCLIP with the same architecture, built offline (local BertConfig, no hub)."""
    import transformers
    from open_clip import hf_model
    from open_clip.model import CustomTextCLIP

    if (mcfg.vision.width, mcfg.vision.layers, mcfg.vision.patch_size) != (768, 12, 16):
        raise SystemExit("the open_clip baseline is built for ViT-B/16 presets only")
    bert = transformers.BertConfig(vocab_size=mcfg.text.vocab_size, hidden_size=mcfg.text.width,
                                   num_hidden_layers=mcfg.text.layers, num_attention_heads=mcfg.text.heads,
                                   intermediate_size=mcfg.text.mlp_dim, max_position_embeddings=mcfg.text.max_positions,
                                   type_vocab_size=mcfg.text.type_vocab_size, layer_norm_eps=mcfg.text.ln_eps,
                                   pad_token_id=0)
    name = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    cfg = {
        "embed_dim": mcfg.embed_dim,
        "vision_cfg": {"timm_model_name": f"vit_base_patch16_{mcfg.vision.image_size}",
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
    for _ in range(warmup):
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
    return {"step_s": dt, "peak_mem_gib": mem}


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


def bench_batch(args, b, device, mcfg, peak, rows=None):
    """One batch size, bmclip then open_clip; its row is appended to ``rows`` first, so an interrupt keeps a side
    already measured."""
    from bmclip.kernels import ClipLoss

    from bmclip.model import create_model
    from bmclip.train.config import OptimSection
    from bmclip.train.gradcache import forward_backward
    from bmclip.train.metrics import train_step_flops
    from bmclip.train.optim import build_optimizer

    use_bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    images, ids, lengths = make_batch(b, mcfg.vision.image_size, mcfg.text.context_length,
                                      mcfg.text.vocab_size, args.median_tokens, device)
    flops = train_step_flops(mcfg, batch=b, text_token_counts=lengths.tolist())
    res = {"batch": b, "model_tflop_per_step": flops / 1e12,
           "mean_tokens": float(lengths.float().mean()), "context": mcfg.text.context_length}
    if rows is not None:
        rows.append(res)

    def finish(side, r):
        r["samples_per_s"] = b / r["step_s"]
        r["mfu"] = flops / r["step_s"] / (peak * 1e12) if peak else None
        res[side] = r

    # --- bmclip
    try:
        torch.manual_seed(0)
        model = create_model(mcfg, attn_backend=args.attn_backend).to(device).train()
        model.set_grad_checkpointing(args.grad_checkpointing)
        fwd = torch.compile(model) if args.compile else model
        opt = build_optimizer(model, OptimSection(), device.type)
        lf = ClipLoss()

        def ours():
            opt.zero_grad(set_to_none=True)
            forward_backward(fwd, images, ids, lambda i, t, s, _b: lf(i, t, s), autocast=autocast)
            opt.step()

        finish("bmclip", run_side("bmclip", model, ours, device, args.warmup, args.iters))
    except torch.OutOfMemoryError:
        res["bmclip"] = "oom"
    except Exception as e:  # recorded with its traceback, and the baseline still runs (one GPU call)
        res["bmclip"] = _error(e)
    finally:
        model = fwd = opt = None
        _free_memory(device)

    # --- open_clip (same architecture, same batch, padded text as open_clip trains)
    if not args.no_open_clip:
        try:
            from open_clip.loss import ClipLoss as OCClipLoss

            torch.manual_seed(0)
            oc = build_open_clip(mcfg).to(device).train()
            oc.set_grad_checkpointing(args.grad_checkpointing)
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

            finish("open_clip", run_side("open_clip", oc, theirs, device, args.warmup, args.iters))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="biomedclip-vit-b16-224")
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512, 1024], help="per-GPU batch sizes to try")
    p.add_argument("--attn-backend", default="auto", help="bmclip attention backend (auto: best available)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--median-tokens", type=float, default=60.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-open-clip", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU smoke: batch 2, 1 warm-up + 1 step, fp32")
    p.add_argument("--out", default=None, help="write results JSON here")
    args = p.parse_args(argv)

    from bmclip.model.config import get_preset
    from bmclip.train.metrics import peak_tflops_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.batch, args.warmup, args.iters = [2], 1, 1
    if args.attn_backend == "auto":
        from bmclip.model import available_backends

        avail = available_backends()
        args.attn_backend = next((b for b in ("triton", "flash", "xformers") if device.type == "cuda" and b in avail),
                                 "sdpa")
    mcfg = get_preset(args.preset)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops_for(dev_name) if device.type == "cuda" else None
    meta = {"device": dev_name, "peak_bf16_tflops": peak, "torch": torch.__version__, "preset": args.preset,
            "attn_backend": args.attn_backend, "grad_checkpointing": args.grad_checkpointing,
            "compile": args.compile, "precision": "bf16" if device.type == "cuda" else "fp32",
            "median_tokens": args.median_tokens, "iters": args.iters}
    print(json.dumps(meta))

    def save():
        if args.out:  # after every batch size: the GPU suite stops this step with SIGINT at its limit
            write_json_atomic(Path(args.out), json.loads(json.dumps({"meta": meta, "rows": rows}, default=str)))

    rows = []
    with keep_results_on_sigint("bench_train", meta):
        for b in args.batch:
            r = bench_batch(args, b, device, mcfg, peak, rows)
            print(json.dumps(r, default=str), flush=True)
            save()
    print(f"\n{'batch':>6} {'bmclip samples/s':>17} {'MFU':>6} {'mem GiB':>8} | {'open_clip samples/s':>19} "
          f"{'MFU':>6} {'mem GiB':>8} | speedup")
    def cells(r, side):
        v = r.get(side)
        if not isinstance(v, dict):
            return f"{str(v):>17} {'':>6} {'':>8}"
        mfu = f"{v['mfu'] * 100:5.1f}%" if v["mfu"] is not None else "   n/a"
        mem = f"{v['peak_mem_gib']:8.1f}" if v["peak_mem_gib"] is not None else "     n/a"
        return f"{v['samples_per_s']:17.1f} {mfu} {mem}"

    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"{r['batch']:>6} {cells(r, 'bmclip')} | {cells(r, 'open_clip'):>36} | {sp}")
    save()
    return 130 if meta["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
