"""Flash attention and the unpadded text tower vs PyTorch SDPA (each backend) and xformers, one process.

Measured (GPU, bf16 by default; FLOPs by flash-attn's convention: forward 4*B*H*S^2*D, halved when
causal, forward+backward 3.5x the forward i.e. backward = 2.5x forward; varlen sums per sequence, so
padded baselines are credited with the *useful* FLOPs only):

1. ``vit``: attention at the ViT-B/16-224 shape (batch 256, seq 197, 12 heads, head dim 64), forward and
   forward+backward: Triton (``flash_attention(backend="triton")``) vs SDPA restricted to each backend it
   has (cuDNN, flash, efficient; ``torch.nn.attention.sdpa_kernel``) vs xformers if installed.
2. ``text_attn``: attention of one text layer for a batch of captions whose lengths are drawn from a real
   caption-length distribution (``benchmarks/data/caption_lengths.json``, made from the PMC samples by
   ``--make-lengths``): Triton varlen vs SDPA on the batch padded to the context (256) with a key mask (what
   a padded tower does) vs xformers' block-diagonal varlen.
3. ``text_tower``: the whole PubMedBERT-size text tower (BertTextEncoder, 12 layers, width 768) forward +
   backward under bf16 autocast, captions/s: unpadded Triton vs padded-to-256 SDPA (``trim_padding=False``)
   and, for honesty, SDPA with the tower's default trimming of all-padding columns.

Rows run in this order: ``text_tower``, ``vit``, ``text_attn`` with the Triton backward in the first
``--bwd-mode`` ("separate": a dQ kernel, 7 matmuls per block pair; "atomic": dQ accumulated with fp32 atomics
inside the dK/dV kernel, 5 matmuls), then the Triton rows of the other mode (``*_atomic_dq``), so a run cut
short keeps the comparisons; the autotune lists are short, so few configs compile before the first row. After
the rows every non-SDPA row is printed against every SDPA row of its section (time ratios: > 1 = faster
than that SDPA backend), and the same ratios go into the JSON summary (``vs_sdpa``).

Targets (H100/H200): vit fwd+bwd Triton >= 1.0x the fastest SDPA backend; text tower captions/s
unpadded Triton >= 2x padded-to-256 SDPA.

    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100.json
    python benchmarks/bench_attention.py --reps 10 --bwd-mode atomic --sections vit
    python benchmarks/bench_attention.py --quick           # CPU smoke run (Triton interpreter, tiny shapes)
    python benchmarks/bench_attention.py --make-lengths    # rebuild benchmarks/data/caption_lengths.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from bench_common import keep_results_on_sigint, median_ms, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LENGTHS_JSON = REPO / "benchmarks" / "data" / "caption_lengths.json"
DEFAULT_SAMPLES = Path(os.environ.get("BMCLIP_SHARED", REPO.parent / "shared")) / "data" / "pmc_samples"
CONTEXT = 256


# --------------------------------------------------------------------------------------------- lengths


def _captions_from_samples(root: Path) -> list[str]:
    from bmclip.data.pmc.jats import parse_jats

    captions = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".xml", ".nxml") or "images_only" in path.parts:
            continue
        try:
            arts = parse_jats(path)
        except Exception as e:  # non-JATS files in the samples (e.g. a Texture manifest) are skipped, counted
            print(f"skip {path.relative_to(root)}: {type(e).__name__}", file=sys.stderr)
            continue
        for art in arts if isinstance(arts, list) else [arts]:
            captions += [f.caption for f in art.figures if f.caption]
    return captions


def make_lengths(samples: Path, out: Path, vocab: Path | None) -> dict:
    """Token counts ([CLS] + tokens + [SEP], truncated to CONTEXT) of every figure caption in ``samples``."""
    captions = _captions_from_samples(samples)
    if not captions:
        raise SystemExit(f"no figure captions found under {samples}")
    try:
        from bmclip.tokenizer import get_tokenizer

        tok = get_tokenizer(vocab)
    except Exception as e:  # no tokenizer module / vocabulary in this checkout: say so and use the proxy
        print(f"bmclip tokenizer unavailable ({type(e).__name__}: {e}); using the word-count proxy",
              file=sys.stderr)
        tok = None
    if tok is not None:
        # Untruncated counts (huge context) so the truncated fraction can be reported too.
        raw = tok.encode_batch_lengths(captions, context_length=8192)  # padded to this: keep it modest
        name = vocab.name if vocab else "bundled vocabulary"
        method = f"bmclip.tokenizer WordPiece ({name}, {tok.vocab_size} ids, uncased), [CLS]+[SEP] included"
    else:
        # ~1.3 WordPiece tokens per whitespace word (typical for biomedical English), + [CLS] and [SEP].
        raw = [math.ceil(1.3 * len(re.findall(r"\S+", c))) + 2 for c in captions]
        method = "proxy: ceil(1.3 * whitespace words) + 2 (no bmclip tokenizer was available)"
    lengths = [min(n, CONTEXT) for n in raw]
    data = {
        "source": f"figure captions of the JATS XML in {samples.name} (bmclip.data.pmc.jats.parse_jats)",
        "method": method,
        "context": CONTEXT,
        "n_captions": len(lengths),
        "fraction_truncated": sum(n > CONTEXT for n in raw) / len(raw),
        "median": statistics.median(lengths),
        "mean": statistics.fmean(lengths),
        "lengths": lengths,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, data)
    return data


def draw_lengths(n: int, seed: int, context: int) -> list[int]:
    dist = json.loads(LENGTHS_JSON.read_text())["lengths"]
    rng = random.Random(seed)
    return [min(rng.choice(dist), context) for _ in range(n)]


# --------------------------------------------------------------------------------------------- timing


def _timer(device: torch.device, warmup: int, reps: int):
    def run(fn) -> float:
        """Median milliseconds of fn() over reps (after warmup), synchronised per call."""
        return median_ms(fn, warmup, reps, cuda=device.type == "cuda")

    return run


def attn_flops(lengths: list[int], heads: int, head_dim: int, causal: bool = False) -> float:
    """Forward FLOPs of attention over sequences of these lengths (flash-attn's convention)."""
    f = sum(4.0 * heads * n * n * head_dim for n in lengths)
    return f / 2 if causal else f


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}
    return {k: (sdpa_kernel, getattr(SDPBackend, v)) for k, v in names.items() if hasattr(SDPBackend, v)}


def _measure_pair(timer, fwd, inputs):
    """(fwd ms, fwd+bwd ms) of fwd(*inputs) -> tensor; raises whatever the backend raises."""
    out = fwd(*inputs)
    grad = torch.randn_like(out)

    def f():
        with torch.no_grad():
            fwd(*inputs)

    def fb():
        for t in inputs:
            t.grad = None
        fwd(*inputs).backward(grad)

    return timer(f), timer(fb)


@contextlib.contextmanager
def bwd_mode(mode: str):
    """The Triton backward's dQ mode ("separate" or "atomic") inside the block, restored after."""
    import importlib

    fa = importlib.import_module("bmclip.kernels.flash_attention")
    if mode not in fa.BWD_DQ_MODES:
        raise ValueError(f"bwd mode must be one of {fa.BWD_DQ_MODES}, got {mode!r}")
    saved = fa._BWD_DQ_MODE
    fa._BWD_DQ_MODE = mode
    try:
        yield
    finally:
        fa._BWD_DQ_MODE = saved


def _mode_suffix(mode: str) -> str:
    return "" if mode == "separate" else "_atomic_dq"


class _SavingRows(list):
    """The result rows; every append rewrites the JSON (the GPU suite may stop this step with SIGINT)."""

    def __init__(self, save):
        super().__init__()
        self._save = save

    def append(self, row) -> None:
        super().append(row)
        self._save(list(self))


def _row(rows, section, method, ms_f, ms_fb, flops_f, extra=None):
    row = {"section": section, "method": method, "fwd_ms": ms_f, "fwd_bwd_ms": ms_fb,
           "fwd_tflops": flops_f / (ms_f * 1e-3) / 1e12 if ms_f else None,
           "fwd_bwd_tflops": 3.5 * flops_f / (ms_fb * 1e-3) / 1e12 if ms_fb else None}
    row.update(extra or {})
    rows.append(row)
    print(f"  {section:10s} {method:24s} fwd {ms_f:9.3f} ms {row['fwd_tflops']:9.4g} TF/s | "
          f"fwd+bwd {ms_fb:9.3f} ms {row['fwd_bwd_tflops']:9.4g} TF/s", flush=True)


def _skip(rows, section, method, err):
    msg = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err) else type(err).__name__
    rows.append({"section": section, "method": method, "skipped": msg})
    print(f"  {section:10s} {method:24s} skipped ({msg})", flush=True)


# --------------------------------------------------------------------------------------------- sections


def bench_vit(rows, timer, device, dtype, shape, mode="separate", baselines=True):
    """ViT-shape rows: Triton with the backward in ``mode``, and (``baselines``) every SDPA backend and xformers."""
    from bmclip.kernels.flash_attention import flash_attention

    b, s, h, d = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    flops = attn_flops([s] * b, h, d)
    methods = {"triton" + _mode_suffix(mode): lambda q, k, v: flash_attention(q, k, v, backend="triton")}

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    if baselines:
        for name, (ctx, be) in _sdpa_backends().items():
            if name == "math" and device.type == "cuda":
                continue  # the unfused reference: orders of magnitude off, and memory-hungry at this shape

            def run(q, k, v, ctx=ctx, be=be):
                with ctx(be):
                    return sdpa(q, k, v)

            methods[f"sdpa_{name}"] = run
        methods["sdpa"] = sdpa  # torch's own choice (what attn_backend="auto" runs for the ViT)
        methods["xformers"] = lambda q, k, v: flash_attention(q, k, v, backend="xformers")
    for name, fn in methods.items():
        try:
            with bwd_mode(mode):
                ms_f, ms_fb = _measure_pair(timer, fn, (q, k, v))
        except Exception as e:  # a backend this card/build lacks: reported, not fatal
            _skip(rows, "vit", name, e)
            continue
        _row(rows, "vit", name, ms_f, ms_fb, flops, {"shape": list(shape), "bwd_mode": mode})


def bench_text_attention(rows, timer, device, dtype, n_captions, heads, head_dim, context, seed, mode="separate",
                         baselines=True):
    """Varlen text-attention rows; ``mode`` and ``baselines`` as in ``bench_vit``."""
    from bmclip.kernels.flash_attention import flash_attention

    lengths = draw_lengths(n_captions, seed, context)
    total = sum(lengths)
    cu = torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32, device=device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(total, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    flops = attn_flops(lengths, heads, head_dim)
    extra = {"n_captions": n_captions, "tokens": total, "padded_tokens": n_captions * context,
             "mean_len": total / n_captions, "max_len": max(lengths)}
    max_len = max(lengths)

    # Padded baseline: scatter the captions into (B, context) and attend with a key mask, as a padded tower.
    idx = torch.cat([torch.arange(n, device=device) + i * context for i, n in enumerate(lengths)])
    key_mask = torch.zeros(n_captions * context, dtype=torch.bool, device=device)
    key_mask[idx] = True
    key_mask = key_mask.view(n_captions, 1, 1, context)
    pq, pk, pv = (torch.zeros(n_captions * context, heads, head_dim, device=device, dtype=dtype)
                  .index_copy(0, idx, t.detach()).view(n_captions, context, heads, head_dim).transpose(1, 2)
                  .requires_grad_() for t in (q, k, v))

    methods = [("triton_varlen" + _mode_suffix(mode),
                lambda q, k, v: flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, backend="triton"),
                (q, k, v))]
    for name, (ctx, be) in (_sdpa_backends().items() if baselines else ()):
        if name == "math" and device.type == "cuda":
            continue

        def run(q, k, v, ctx=ctx, be=be):
            with ctx(be):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)

        methods.append((f"sdpa_{name}_pad{context}", run, (pq, pk, pv)))
    if baselines:
        methods.append(("xformers_varlen", lambda q, k, v: flash_attention(q, k, v, cu_seqlens=cu,
                                                                         max_seqlen=max_len, backend="xformers"),
                        (q, k, v)))
    for name, fn, inputs in methods:
        try:
            with bwd_mode(mode):
                ms_f, ms_fb = _measure_pair(timer, fn, inputs)
        except Exception as e:
            _skip(rows, "text_attn", name, e)
            continue
        _row(rows, "text_attn", name, ms_f, ms_fb, flops, {**extra, "bwd_mode": mode})


def _cumsum(xs):
    t = 0
    for x in xs:
        t += x
        yield t


def bench_text_tower(rows, timer, device, dtype, n_captions, text_cfg, seed, profile=False, mode="separate",
                     baselines=True):
    """Whole-tower rows: unpadded Triton (backward in ``mode``) and (``baselines``) padded SDPA, torch's choice
    and each SDPA backend, trimmed SDPA, unpadded xformers."""
    from bmclip.model.bert import BertTextEncoder

    context = text_cfg.context_length
    lengths = draw_lengths(n_captions, seed, context)
    gen = torch.Generator().manual_seed(2)
    ids = torch.zeros(n_captions, context, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, text_cfg.vocab_size, (n,), generator=gen)
    ids = ids.to(device)
    torch.manual_seed(0)
    enc = BertTextEncoder(text_cfg, embed_dim=512).to(device).train()
    extra = {"n_captions": n_captions, "tokens": sum(lengths), "context": context,
             "layers": text_cfg.layers, "width": text_cfg.width}

    def setup(backend, trim):
        for layer in enc.layers:
            layer.attn.attn_backend = backend
        enc.trim_padding = trim

    def step():
        enc.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = enc(ids)
        out.float().square().mean().backward()

    cases = [("triton_unpadded" + _mode_suffix(mode), "triton", False, None)]
    if baselines:
        cases += [("sdpa_padded_to_context", "sdpa", False, None), ("sdpa_trimmed", "sdpa", True, None)]
        cases += [(f"sdpa_{be}_padded_to_context", "sdpa", False, ctx_be) for be, ctx_be in _sdpa_backends().items()
                  if not (be == "math" and device.type == "cuda")]
        cases += [("xformers_unpadded", "xformers", False, None)]
    results = {}
    for name, backend, trim, ctx_be in cases:
        setup(backend, trim)
        try:
            with bwd_mode(mode), (ctx_be[0](ctx_be[1]) if ctx_be else contextlib.nullcontext()):
                ms = timer(step)
        except Exception as e:
            _skip(rows, "text_tower", name, e)
            continue
        results[name] = ms
        rows.append({"section": "text_tower", "method": name, "fwd_bwd_ms": ms,
                     "captions_per_s": n_captions / (ms * 1e-3), **extra, "bwd_mode": mode})
        print(f"  text_tower {name:24s} fwd+bwd {ms:9.2f} ms  {n_captions / (ms * 1e-3):10.1f} captions/s",
              flush=True)
        if profile and backend == "triton":
            _profile_step(step, device, rows, name)
    return results


def _profile_step(step, device, rows, name, top=15):
    """Where one unpadded tower step spends device time (decides whether fused LayerNorm/GELU would pay)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0
    table = [{"op": e.key, "share": getattr(e, key, 0.0) / total, "us": getattr(e, key, 0.0)} for e in events[:top]]
    rows.append({"section": "text_tower_profile", "method": name, "top_ops": table})
    print(f"  profile of {name} (self {'device' if device.type == 'cuda' else 'cpu'} time):")
    for t in table:
        print(f"    {100 * t['share']:5.1f}%  {t['op'][:90]}")


# --------------------------------------------------------------------------------------------- main


def vs_sdpa(rows) -> dict:
    """{section: {method: {sdpa method: {"fwd": ratio, "fwd_bwd": ratio}}}}: each non-SDPA row's speed relative
    to every SDPA row of its section (SDPA ms / row ms; > 1 means the row is faster)."""
    out: dict = {}
    for sec in dict.fromkeys(r["section"] for r in rows):
        timed = [r for r in rows if r["section"] == sec and "fwd_bwd_ms" in r]
        base = [r for r in timed if r["method"].startswith("sdpa")]
        for r in timed:
            if r["method"].startswith("sdpa") or not base:
                continue
            cmp = {}
            for b in base:
                ratios = {key: b[key] / r[key] for key in ("fwd_ms", "fwd_bwd_ms") if r.get(key) and b.get(key)}
                cmp[b["method"]] = {k.replace("_ms", ""): v for k, v in ratios.items()}
            out.setdefault(sec, {})[r["method"]] = cmp
    return out


def _print_vs_sdpa(rows) -> None:
    for sec, methods in vs_sdpa(rows).items():
        print(f"{sec}: speed relative to each SDPA row (SDPA ms / row ms, fwd | fwd+bwd)")
        for method, cmp in methods.items():
            fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            cells = [f"{b} {fmt(c.get('fwd'))}|{fmt(c.get('fwd_bwd'))}" for b, c in cmp.items()]
            print(f"  {method:26s} " + "  ".join(cells), flush=True)


def _summary(rows) -> dict:
    def get(section, method, key):
        for r in rows:
            if r["section"] == section and r["method"] == method and key in r:
                return r[key]
        return None

    out = {"vs_sdpa": vs_sdpa(rows)}
    sdpa = [(r["fwd_bwd_ms"], r["method"]) for r in rows
            if r["section"] == "vit" and r["method"].startswith("sdpa_") and "fwd_bwd_ms" in r]
    for variant in ("triton", "triton_atomic_dq"):
        tri = get("vit", variant, "fwd_bwd_ms")
        if tri and sdpa:
            best_ms, best = min(sdpa)
            out[f"vit_fwd_bwd_speedup_vs_fastest_sdpa[{variant}]"] = {
                "fastest_sdpa": best, "speedup": best_ms / tri, "target": 1.0}
    t_un = get("text_tower", "triton_unpadded", "fwd_bwd_ms")
    t_pad = get("text_tower", "sdpa_padded_to_context", "fwd_bwd_ms")
    t_trim = get("text_tower", "sdpa_trimmed", "fwd_bwd_ms")
    if t_un and t_pad:
        out["text_tower_speedup_vs_padded_sdpa"] = {"speedup": t_pad / t_un, "target": 2.0}
    if t_un and t_trim:
        out["text_tower_speedup_vs_trimmed_sdpa"] = {"speedup": t_trim / t_un}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few reps; runs on CPU (interpreter)")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--captions", type=int, default=256, help="captions per text batch")
    ap.add_argument("--sections", default="text_tower,vit,text_attn")
    ap.add_argument("--out", type=Path, help="write the JSON results here (atomically)")
    ap.add_argument("--profile", action="store_true", help="also profile one unpadded text-tower step")
    ap.add_argument("--bwd-mode", choices=["separate", "atomic", "both"], default="both",
                    help="Triton backward dQ mode(s) to time: 'both' (default) runs every comparison with "
                         "'separate' first, then the 'atomic' (5-matmul) Triton rows")
    ap.add_argument("--make-lengths", action="store_true", help=f"rebuild {LENGTHS_JSON.relative_to(REPO)}")
    ap.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="pmc_samples folder (--make-lengths)")
    ap.add_argument("--vocab", type=Path, help="WordPiece vocab.txt for --make-lengths (default: bundled)")
    args = ap.parse_args(argv)

    if args.make_lengths:
        d = make_lengths(args.samples, LENGTHS_JSON, args.vocab)
        print(f"{d['n_captions']} captions, median {d['median']}, mean {d['mean']:.1f}, "
              f"{100 * d['fraction_truncated']:.1f}% truncated at {CONTEXT}; {d['method']}")
        return 0

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        if not args.quick:
            print("bench_attention: needs a CUDA device (use --quick for a CPU smoke run)", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before bmclip.kernels imports triton
    device = torch.device("cuda" if has_cuda else "cpu")
    if args.quick and not has_cuda:
        dtype = torch.float32  # the interpreter's bf16 dot is unreliable; fp32 is exact there
    else:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16

    from bmclip.model.config import TextConfig

    if args.quick:
        vit_shape, n_caps, reps, warmup = (2, 17, 2, 32), 6, 2, 1
        heads, head_dim, context = 2, 32, 64
        text_cfg = TextConfig(vocab_size=512, width=64, layers=1, heads=2, mlp_dim=128, max_positions=64,
                              context_length=64, proj_hidden=48)
    else:
        vit_shape, n_caps, reps, warmup = (256, 197, 12, 64), args.captions, args.reps, 3
        heads, head_dim, context = 12, 64, CONTEXT
        text_cfg = TextConfig()  # PubMedBERT-base: 12 layers, width 768, 12 heads, context 256
    timer = _timer(device, warmup, reps)
    sections = set(args.sections.split(","))
    import triton

    env = {
        "device": torch.cuda.get_device_name() if has_cuda else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype).replace("torch.", ""),
        "quick": args.quick, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lengths": json.loads(LENGTHS_JSON.read_text())["method"],
    }
    try:
        import xformers

        env["xformers"] = xformers.__version__
    except ImportError:
        env["xformers"] = None
    print(f"bench_attention on {env['device']} ({env['dtype']}), torch {env['torch']}, triton {env['triton']}",
          flush=True)

    def save(rows):
        if args.out:
            write_json_atomic(args.out, {"env": env, "rows": rows, "summary": _summary(rows)})

    rows = _SavingRows(save)
    with keep_results_on_sigint("bench_attention", env):
        # The text tower and ViT rows first (the targets), the other backward mode's Triton rows last, so that a
        # step limit cutting this run short drops those rather than a comparison.
        modes = ["separate", "atomic"] if args.bwd_mode == "both" else [args.bwd_mode]
        for i, mode in enumerate(modes):
            base = i == 0
            if "text_tower" in sections:
                bench_text_tower(rows, timer, device, dtype, n_caps, text_cfg, seed=0,
                                 profile=args.profile and base, mode=mode, baselines=base)
            if "vit" in sections:
                bench_vit(rows, timer, device, dtype, vit_shape, mode=mode, baselines=base)
            if "text_attn" in sections:
                bench_text_attention(rows, timer, device, dtype, n_caps, heads, head_dim, context, seed=0, mode=mode,
                                     baselines=base)
    _print_vs_sdpa(rows)
    summary = _summary(rows)
    for k, v in summary.items():
        if k != "vs_sdpa":
            print(f"{k}: {v}")
    result = {"env": env, "rows": list(rows), "summary": summary}
    if args.out:
        write_json_atomic(args.out, result)
    else:
        print(json.dumps(result, indent=1))
    return 130 if env["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
