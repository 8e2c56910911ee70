#!/usr/bin/env python
"""Performance floors of bmclip's GPU targets on H100 SXM / H200, and measured / floor for a GPU-suite run.

A floor is the time no implementation can beat on a card: the FLOPs it must do over the bf16 matmul rate,
or the bytes it must move through HBM (each input read once, each output written once) over the bandwidth,
whichever is larger (METHOD.md's "two numbers"). Measured time / floor is the gap left. The card's rates are
the vendor's datasheet numbers (named below) unless a measured matmul peak / copy bandwidth replaces them
(``--peak-tflops``/``--hbm-gbps``, or ``--measure`` on a GPU: an 8192³ bf16 ``torch.matmul`` and a 2 GiB
device-to-device copy, the same figures the GPU suite measures first).

Targets and their floors:

* **contrastive loss**, B×B logits never formed: 5 GEMM-equivalent passes of 2·B²·D FLOPs (1 forward
  + 2 per backward orientation: recompute the logit tile, then the product). open_clip's ``ClipLoss`` runs 6
  GEMMs (two logits matrices, each with 2 backward GEMMs) plus its elementwise HBM traffic over the two
  B×B logits matrices (per matrix: GEMM writes L; log_softmax reads L, writes P; nll backward writes the
  one-hot grad; log_softmax backward reads it and P and writes dL; the two backward GEMMs read dL: 9 B²
  passes), each kernel in turn, so its floor is the GEMM time plus the traffic time. Memory floors: the
  fused loss needs only the features and their gradients (4·B·D elements); open_clip holds at least the two
  logits matrices and the two log-probability matrices saved for backward (4·B² elements).
* **attention** forward+backward (flash-attn's convention: backward = 2.5× forward FLOPs, with the QKᵀ
  recompute), forward and backward each max(compute, bytes): the ViT-B/16 shape (256 × 197 tokens, 12
  heads, head dim 64) and one text layer over captions from the real length distribution
  (``benchmarks/data/caption_lengths.json``), unpadded vs padded to 256.
* **training step** (MFU convention: matmul FLOPs of the model config, training = 3 × forward, real text
  tokens; padding is not useful work): FLOPs per sample of biomedclip-vit-b16-224 with unpadded and with
  padded-to-256 text, and the samples/s at 100 % and at 45 % MFU.

    python benchmarks/roofline.py                                  # floors on H100 SXM and H200 (datasheet)
    python benchmarks/roofline.py --peak-tflops 790 --hbm-gbps 4300   # floors at measured rates
    python benchmarks/roofline.py --measure --out peak.json        # GPU: measure both rates, print, save
    python benchmarks/roofline.py --summary RUN_DIR                # measured / floor for a gpu_suite run

Importable: ``loss_floor``, ``open_clip_loss_floor``, ``attention_floor``, ``train_step_floor`` etc. take a
``Device`` (``DEVICES[...]`` or ``device_from(...)``) and return ``Floor`` records (``.floor_s``,
``.ratio(measured_s)``). Pure Python: torch is imported only by ``--measure``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LENGTHS_JSON = REPO / "benchmarks" / "data" / "caption_lengths.json"
MFU_TARGET = 0.45


# --------------------------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """A card's two ceilings: dense bf16 matmul TFLOP/s and HBM GB/s (10⁹ bytes/s), and where they come from."""

    name: str
    bf16_tflops: float
    hbm_gbps: float
    source: str = "datasheet"

    @property
    def flops_per_s(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9


# NVIDIA datasheets, SXM parts, dense (no sparsity) bf16 tensor-core rate; HBM bandwidth.
DEVICES: dict[str, Device] = {
    "H100 SXM": Device("H100 SXM", 989.4, 3350.0, "datasheet: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3"),
    "H200": Device("H200", 989.4, 4800.0, "datasheet: 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e"),
}


def device_from(name: str | None = None, *, peak_tflops: float | None = None, hbm_gbps: float | None = None) -> Device:
    """The datasheet device matching a CUDA device name (``"NVIDIA H200"``, ``"NVIDIA H100 80GB HBM3"``), with a
    measured matmul peak and/or bandwidth replacing the datasheet figures where given. An unknown name needs
    both measured figures (ValueError otherwise)."""
    base = None
    if name:
        low = name.lower()
        if "h200" in low:
            base = DEVICES["H200"]
        elif "h100" in low and "pcie" not in low and "nvl" not in low:
            base = DEVICES["H100 SXM"]
    if base is None:
        if peak_tflops is None or hbm_gbps is None:
            raise ValueError(f"no datasheet figures for {name!r}: give both a measured peak and a bandwidth")
        return Device(name or "measured", float(peak_tflops), float(hbm_gbps), "measured")
    if peak_tflops is None and hbm_gbps is None:
        return base
    parts = []
    if peak_tflops is not None:
        parts.append(f"measured matmul {peak_tflops:.0f} TFLOP/s")
    if hbm_gbps is not None:
        parts.append(f"measured copy {hbm_gbps:.0f} GB/s")
    return replace(base, bf16_tflops=float(peak_tflops if peak_tflops is not None else base.bf16_tflops),
                   hbm_gbps=float(hbm_gbps if hbm_gbps is not None else base.hbm_gbps),
                   source="; ".join(parts) + " (others: datasheet)")


# --------------------------------------------------------------------------------------------------- floors


@dataclass(frozen=True)
class Floor:
    """Work of one operation and the least time it can take on ``device``.

    ``combine="max"``: one kernel (compute and traffic overlap); ``"sum"``: kernels in sequence, the GEMMs
    compute-bound and the elementwise passes memory-bound (``flops`` over the rate plus ``bytes`` over the
    bandwidth). ``parts``: phases run one after the other (forward, then backward), each its own floor; the
    floor is their sum and ``flops``/``bytes`` are their totals."""

    name: str
    flops: float
    bytes: float
    device: Device
    combine: str = "max"
    parts: tuple = field(default=())

    @property
    def compute_s(self) -> float:
        return self.flops / self.device.flops_per_s

    @property
    def memory_s(self) -> float:
        return self.bytes / self.device.bytes_per_s

    @property
    def floor_s(self) -> float:
        if self.parts:
            return sum(p.floor_s for p in self.parts)
        if self.combine == "sum":
            return self.compute_s + self.memory_s
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        if self.parts:
            return ", ".join(f"{p.name.split()[-1]} {p.bound}" for p in self.parts)
        if self.combine == "sum":
            return "compute+memory"
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def ratio(self, measured_s: float | None) -> float | None:
        """measured / floor (>= 1 for any real implementation), or None without a measurement."""
        if measured_s is None or not self.floor_s:
            return None
        return measured_s / self.floor_s


def phases(name: str, parts: list[Floor]) -> Floor:
    """Phases run one after the other: a Floor whose floor is the sum of theirs."""
    return Floor(name, sum(p.flops for p in parts), sum(p.bytes for p in parts), parts[0].device, parts=tuple(parts))


def gemm_flops(m: float, n: float, k: float) -> float:
    """FLOPs of an (m×k)·(k×n) product: one multiply and one add per term."""
    return 2.0 * m * n * k


def loss_floor(B: int, D: int, device: Device, *, passes: int = 5, elem_bytes: int = 2) -> Floor:
    """The fused contrastive loss, forward + backward: ``passes`` GEMM-equivalents of B×B×D (5: one forward,
    two per backward orientation), reading the two (B, D) feature matrices and writing their gradients once."""
    flops = passes * gemm_flops(B, B, D)
    nbytes = 4.0 * B * D * elem_bytes + 4.0 * B * 4  # I, T, dI, dT; row/column log-sum-exp (fp32)
    return Floor(f"fused loss B={B} D={D} ({passes} passes)", flops, nbytes, device)


def open_clip_loss_floor(B: int, D: int, device: Device, *, elem_bytes: int = 2, logit_bytes: int = 2) -> Floor:
    """open_clip ``ClipLoss`` forward + backward as it executes: 6 GEMMs of B×B×D (two logits matrices, each
    with two backward products) then its elementwise passes over the two B×B matrices (9 passes each, see the
    module docstring), kernel after kernel."""
    flops = 6 * gemm_flops(B, B, D)
    feat = 4.0 * B * D * elem_bytes
    nbytes = feat + 2 * 9.0 * B * B * logit_bytes
    return Floor(f"open_clip ClipLoss B={B} D={D} (6 GEMMs + 18 B² passes)", flops, nbytes, device, "sum")


def loss_min_memory_bytes(B: int, D: int, elem_bytes: int = 2) -> float:
    """Least memory a fused loss step needs beyond the model: features and their gradients (+ fp32 LSEs)."""
    return 4.0 * B * D * elem_bytes + 4.0 * B * 4


def open_clip_loss_min_memory_bytes(B: int, logit_bytes: int = 2) -> float:
    """Least memory open_clip's ClipLoss holds at its peak: two B×B logits and two B×B log-probabilities."""
    return 4.0 * B * B * logit_bytes


# --------------------------------------------------------------------------------------------------- attention


def attention_fwd_flops(lengths, heads: int, head_dim: int) -> float:
    """Forward FLOPs of bidirectional attention over sequences of these lengths: QKᵀ and PV, 4·n²·h·d each."""
    return sum(4.0 * heads * n * n * head_dim for n in lengths)


def attention_floor(lengths, heads: int, head_dim: int, device: Device, *, elem_bytes: int = 2,
                    bwd_factor: float = 2.5, name: str = "attention") -> Floor:
    """Forward + backward floor: forward max(compute, bytes) plus backward max(compute, bytes).

    Forward reads Q, K, V and writes O and the fp32 log-sum-exp; backward reads Q, K, V, O, dO, the LSE and
    writes dQ, dK, dV (plus the fp32 rowsum(dO·O) it writes and reads). Backward FLOPs = ``bwd_factor`` × forward
    (2.5: flash-attn's convention, recomputing QKᵀ)."""
    tokens = float(sum(lengths))
    t = tokens * heads * head_dim * elem_bytes
    lse = tokens * heads * 4.0
    f = attention_fwd_flops(lengths, heads, head_dim)
    fwd = Floor(f"{name} fwd", f, 4 * t + lse, device)
    bwd = Floor(f"{name} bwd", bwd_factor * f, 8 * t + 3 * lse, device)
    return phases(f"{name} fwd+bwd", [fwd, bwd])


def caption_lengths(path: Path = LENGTHS_JSON) -> list[int]:
    """Token counts ([CLS] and [SEP] included, truncated at the 256 context) of the real figure captions."""
    return [int(n) for n in json.loads(Path(path).read_text())["lengths"]]


def length_moments(lengths) -> tuple[float, float]:
    """(E[n], E[n²]) of a length distribution: what linear and quadratic FLOP terms depend on."""
    xs = [float(n) for n in lengths]
    return statistics.fmean(xs), statistics.fmean(x * x for x in xs)


def expected_lengths(n: int, lengths=None, padded_to: int | None = None) -> list[float]:
    """``n`` sequences with the distribution's moments: all of length sqrt(E[n²]) would get the quadratic term
    right and the linear one wrong, so this returns lengths whose sum is n·E[n] and sum of squares n·E[n²]
    (two values, a and b, in equal numbers; n even). ``padded_to``: n sequences of that length."""
    if padded_to is not None:
        return [float(padded_to)] * n
    m1, m2 = length_moments(lengths if lengths is not None else caption_lengths())
    sd = math.sqrt(max(0.0, m2 - m1 * m1))
    half = n // 2
    if n % 2:
        raise ValueError("expected_lengths needs an even count")
    return [m1 - sd] * half + [m1 + sd] * half


# --------------------------------------------------------------------------------------------------- model FLOPs


def layer_forward_flops(tokens: float, sq_tokens: float, width: int, mlp: int) -> float:
    """Matmul FLOPs of one pre/post-norm transformer layer over a sequence: QKV + output projections
    (8·n·w²), attention QKᵀ and PV (4·n²·w, given ``sq_tokens`` = n²) and the MLP (4·n·w·m)."""
    return 8.0 * tokens * width * width + 4.0 * sq_tokens * width + 4.0 * tokens * width * mlp


def image_forward_flops(cfg) -> dict:
    """Forward matmul FLOPs of one image through the ViT (``cfg`` a bmclip ModelConfig): patch embedding,
    the layers over 1 + patches tokens, the projection of the CLS token."""
    v = cfg.vision
    patches = (v.image_size // v.patch_size) ** 2
    t = 1 + patches
    patch = gemm_flops(patches, v.width, 3 * v.patch_size ** 2)
    layers = v.layers * layer_forward_flops(t, t * t, v.width, v.mlp_dim)
    proj = gemm_flops(1, cfg.embed_dim, v.width)
    return {"patch_embed": patch, "layers": layers, "proj": proj, "total": patch + layers + proj}


def text_forward_flops(cfg, tokens: float, sq_tokens: float | None = None) -> dict:
    """Forward matmul FLOPs of one caption of ``tokens`` tokens through the BERT tower and its projection
    head (``sq_tokens``: E[n²] when ``tokens`` is a mean; default tokens²)."""
    t = cfg.text
    sq = tokens * tokens if sq_tokens is None else sq_tokens
    layers = t.layers * layer_forward_flops(tokens, sq, t.width, t.mlp_dim)
    hidden = getattr(t, "proj_hidden", 0) or 0
    head = (gemm_flops(1, hidden, t.width) + gemm_flops(1, cfg.embed_dim, hidden)) if hidden else \
        gemm_flops(1, cfg.embed_dim, t.width)
    return {"layers": layers, "head": head, "total": layers + head}


def train_flops_per_sample(cfg, lengths=None, *, padded_to: int | None = None, batch: int = 512) -> dict:
    """Model FLOPs of one training sample (3 × forward): image, text (real tokens from ``lengths``, default the
    caption distribution; or every caption ``padded_to`` tokens) and its row of the B×D·D×B logits."""
    if padded_to is not None:
        m1, m2 = float(padded_to), float(padded_to) ** 2
    else:
        m1, m2 = length_moments(lengths if lengths is not None else caption_lengths())
    img = image_forward_flops(cfg)["total"]
    txt = text_forward_flops(cfg, m1, m2)["total"]
    logits = gemm_flops(1, batch, cfg.embed_dim)
    return {"image": 3 * img, "text": 3 * txt, "logits": 3 * logits, "total": 3 * (img + txt + logits),
            "mean_tokens": m1}


def train_step_floor(cfg, device: Device, lengths=None, *, padded_to: int | None = None, batch: int = 512) -> dict:
    """FLOPs per sample and the samples/s at 100 % MFU and at the 45 % target on ``device``."""
    f = train_flops_per_sample(cfg, lengths, padded_to=padded_to, batch=batch)
    peak = device.flops_per_s / f["total"]
    return {**f, "samples_per_s_at_100": peak, f"samples_per_s_at_{round(MFU_TARGET * 100)}": MFU_TARGET * peak}


def _preset(name: str = "biomedclip-vit-b16-224"):
    sys.path.insert(0, str(REPO))
    from bmclip.model.config import get_preset

    return get_preset(name)


# --------------------------------------------------------------------------------------------------- report


def floors_report(device: Device, *, loss_b: int = 32768, loss_d: int = 512, big_b: int = 1 << 20,
                  vit_shape=(256, 197, 12, 64), captions: int = 256, context: int = 256, batch: int = 512) -> str:
    """The table of every target's floor on one device, as text."""
    ms = 1e3
    lines = [f"== {device.name}: {device.bf16_tflops:.0f} TFLOP/s bf16, {device.hbm_gbps:.0f} GB/s ({device.source})"]
    fl = loss_floor(loss_b, loss_d, device)
    oc = open_clip_loss_floor(loss_b, loss_d, device)
    big = loss_floor(big_b, loss_d, device)
    mem_ours, mem_oc = loss_min_memory_bytes(loss_b, loss_d), open_clip_loss_min_memory_bytes(loss_b)
    lines.append(f"loss B={loss_b} D={loss_d} bf16 fwd+bwd:")
    lines.append(f"  fused, 5 passes      {fl.flops / 1e12:8.2f} TFLOP {fl.bytes / 1e6:9.1f} MB  "
                 f"floor {fl.floor_s * ms:8.3f} ms ({fl.bound}); target <= 1.3x: {1.3 * fl.floor_s * ms:.3f} ms")
    lines.append(f"  open_clip ClipLoss   {oc.flops / 1e12:8.2f} TFLOP {oc.bytes / 1e6:9.1f} MB  "
                 f"floor {oc.floor_s * ms:8.3f} ms (GEMMs {oc.compute_s * ms:.3f} + traffic {oc.memory_s * ms:.3f})")
    lines.append(f"  floor ratio fused / open_clip {fl.floor_s / oc.floor_s:.3f} (target: measured <= 0.65)")
    lines.append(f"  memory floor: fused {mem_ours / 2**20:.0f} MiB, open_clip >= {mem_oc / 2**30:.2f} GiB "
                 f"(ratio 1/{mem_oc / mem_ours:.0f}; target <= 1/50)")
    lines.append(f"loss B={big_b} (fused only): {big.flops / 1e15:.2f} PFLOP, floor {big.floor_s:.2f} s, memory floor "
                 f"{loss_min_memory_bytes(big_b, loss_d) / 2**30:.2f} GiB (open_clip would hold "
                 f">= {open_clip_loss_min_memory_bytes(big_b) / 2**40:.1f} TiB)")
    b, s, h, d = vit_shape
    vit = attention_floor([s] * b, h, d, device, name="vit")
    lines.append(f"attention ViT {b}x{s} tokens, {h} heads x {d}, fwd+bwd: {vit.flops / 1e9:.1f} GFLOP, "
                 f"{vit.bytes / 1e6:.0f} MB, floor {vit.floor_s * ms:.4f} ms ({vit.bound})")
    un = attention_floor(expected_lengths(captions), h, d, device, name="text")
    pad = attention_floor(expected_lengths(captions, padded_to=context), h, d, device, name="text padded")
    m1, m2 = length_moments(caption_lengths())
    lines.append(f"attention text layer, {captions} captions (E[n]={m1:.1f}, E[n^2]={m2:.0f}), fwd+bwd: unpadded "
                 f"{un.flops / 1e9:.1f} GFLOP, {un.bytes / 1e6:.0f} MB, floor {un.floor_s * ms:.4f} ms; padded to "
                 f"{context} {pad.flops / 1e9:.1f} GFLOP, {pad.bytes / 1e6:.0f} MB, floor {pad.floor_s * ms:.4f} ms "
                 f"({pad.floor_s / un.floor_s:.2f}x)")
    cfg = _preset()
    tun = 3 * captions * text_forward_flops(cfg, m1, m2)["total"]
    tpad = 3 * captions * text_forward_flops(cfg, float(context))["total"]
    lines.append(f"text tower fwd+bwd, {captions} captions: {tun / 1e12:.2f} TFLOP unpadded (floor "
                 f"{tun / device.flops_per_s * ms:.2f} ms), {tpad / 1e12:.2f} TFLOP padded to {context} "
                 f"(floor {tpad / device.flops_per_s * ms:.2f} ms): unpadding can gain at most {tpad / tun:.2f}x "
                 f"(target >= 1.8x)")
    for label, kw in (("unpadded text", {}), (f"text padded to {context}", {"padded_to": context})):
        t = train_step_floor(cfg, device, padded_to=kw.get("padded_to"), batch=batch)
        lines.append(f"training step biomedclip-vit-b16-224, {label}: {t['total'] / 1e9:.1f} GFLOP/sample (image "
                     f"{t['image'] / 1e9:.1f}, text {t['text'] / 1e9:.1f}); samples/s at 100% MFU "
                     f"{t['samples_per_s_at_100']:.0f}, at 45% {t['samples_per_s_at_45']:.0f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- measuring


def measure(out: str | None = None) -> dict:
    """Measure this GPU's bf16 matmul rate and copy bandwidth (bench_common) and save them as JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench_common import measure_copy_gbps, measure_matmul_tflops, write_json_atomic

    if not torch.cuda.is_available():
        raise SystemExit("roofline --measure needs a CUDA device")
    dev = torch.device("cuda")
    rec = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "matmul_bf16_tflops": measure_matmul_tflops(dev), "copy_gbps": measure_copy_gbps(dev)}
    if out:
        write_json_atomic(Path(out), rec)
    return rec


# --------------------------------------------------------------------------------------------------- summary


def _load(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _first_json(run: Path, *patterns) -> tuple[Path | None, dict | None]:
    for pat in patterns:
        for p in sorted(glob.glob(str(run / pat))):
            d = _load(p)
            if isinstance(d, dict):
                return Path(p), d
    return None, None


def _fmt(v, spec=".2f", none="n/a") -> str:
    return none if v is None else format(v, spec)


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def summary_report(run: str | os.PathLike) -> str:
    """measured / floor beside every GPU number the suite wrote under ``run`` (missing files or rows say so)."""
    run = Path(run)
    out = []
    peak = _load(run / "peak.json") or {}
    name = peak.get("device")
    mt, bw = _num(peak.get("matmul_bf16_tflops")), _num(peak.get("copy_gbps"))
    try:
        dev = device_from(name, peak_tflops=mt, hbm_gbps=bw)
    except ValueError:
        dev = None
    sheet = None
    try:
        sheet = device_from(name)
    except ValueError:
        pass
    if dev is None:
        dev = DEVICES["H200"]
        out.append("peak.json missing or incomplete: floors below use the H200 datasheet")
    out.append(f"device {name or '?'}: measured matmul {_fmt(mt, '.0f')} TFLOP/s, copy {_fmt(bw, '.0f')} GB/s"
               + (f"; datasheet {sheet.bf16_tflops:.0f} TFLOP/s, {sheet.hbm_gbps:.0f} GB/s" if sheet else ""))
    out.append(f"floors at: {dev.bf16_tflops:.0f} TFLOP/s, {dev.hbm_gbps:.0f} GB/s ({dev.source})")
    targets = []  # (target, value, goal, met)
    for section in (_summary_train, _summary_loss, _summary_attention, _summary_fused):
        try:
            section(run, dev, sheet, out, targets)
        except Exception as e:  # a changed schema must not hide the other sections
            out.append(f"[{section.__name__[9:]}] could not be read: {type(e).__name__}: {e}")
    out.append("")
    out.append("targets:")
    for t, v, goal, met in targets:
        out.append(f"  {t:58s} {v:>10s}   goal {goal:<8s} {'MET' if met else ('missed' if met is False else '?')}")
    return "\n".join(out)


def _summary_train(run, dev, sheet, out, targets):
    path, d = _first_json(run, "bench_train.json")
    out.append("")
    if d is None:
        out.append("[train] no bench_train.json")
        targets.append(("train: samples/s vs open_clip", "missing", ">= 1.5x", None))
        targets.append(("train: MFU (measured peak)", "missing", ">= 45%", None))
        return
    meta = d.get("meta", {})
    out.append(f"[train] {path.name}: preset {meta.get('preset')}, backends {meta.get('attn_backends')}, "
               f"lengths {meta.get('lengths')}{' (interrupted)' if meta.get('interrupted') else ''}")
    first = True
    for r in d.get("rows", []):
        flops = _num(r.get("model_tflop_per_step"))
        b = r.get("batch")
        ck = "ckpt" if r.get("grad_checkpointing") else "no ckpt"
        for side in ("bmclip", "open_clip"):
            v = r.get(side)
            if not isinstance(v, dict):
                out.append(f"  B={b} {ck:7s} {side:9s} {v if v is not None else 'not run'}")
                continue
            st = _num(v.get("step_s"))
            floor = flops * 1e12 / dev.flops_per_s if flops else None
            ratio = st / floor if (st and floor) else None
            sheet_mfu = (flops * 1e12 / st / sheet.flops_per_s) if (st and flops and sheet) else None
            out.append(f"  B={b} {ck:7s} {side:9s} {_fmt(_num(v.get('samples_per_s')), '.0f')} samples/s, step "
                       f"{_fmt(st, '.4f')} s / floor {_fmt(floor, '.4f')} s = {_fmt(ratio)}x  (MFU "
                       f"{_fmt(100 / ratio if ratio else None, '.1f')}% at the floors' rate, "
                       f"{_fmt(100 * sheet_mfu if sheet_mfu else None, '.1f')}% of the datasheet's)")
            prof = v.get("profile")
            if isinstance(prof, dict) and prof.get("attention"):
                kern = ", ".join(f"{a.get('name', '?')[:60]} x{a.get('calls')}" for a in prof["attention"][:4])
                out.append(f"      attention that ran ({prof.get('timer')} time): {kern}")
        sp = _num(r.get("speedup"))
        out.append(f"  B={b} {ck:7s} speedup bmclip / open_clip: {_fmt(sp) + 'x' if sp else 'n/a'}")
        if first and not r.get("grad_checkpointing"):
            first = False
            bm = r.get("bmclip") if isinstance(r.get("bmclip"), dict) else {}
            st = _num(bm.get("step_s"))
            mfu = flops * 1e12 / st / dev.flops_per_s if (st and flops) else None
            targets.append((f"train B={b}: samples/s vs open_clip", _fmt(sp) + "x" if sp else "missing", ">= 1.5x",
                            None if sp is None else sp >= 1.5))
            label = "measured peak" if "measured" in dev.source else "datasheet peak"
            targets.append((f"train B={b}: MFU ({label})", _fmt(100 * mfu, ".1f") + "%" if mfu else "missing",
                            ">= 45%", None if mfu is None else mfu >= MFU_TARGET))
    if first:
        targets.append(("train: samples/s vs open_clip", "missing", ">= 1.5x", None))
        targets.append(("train: MFU (measured peak)", "missing", ">= 45%", None))


def _summary_loss(run, dev, sheet, out, targets):
    path, d = _first_json(run, "bench_loss.json", "bench_loss/*.json", "bench_loss*.json")
    out.append("")
    if d is None:
        out.append("[loss] no bench_loss JSON")
        for t, g in (("loss B=32k: time / 5-pass floor", "<= 1.3x"), ("loss B=32k: time vs open_clip", "<= 0.65x"),
                     ("loss B=32k: peak memory vs open_clip", "<= 1/50"), ("loss B=1M fits", "ok")):
            targets.append((t, "missing", g, None))
        return
    out.append(f"[loss] {path.name}{' (interrupted)' if d.get('meta', {}).get('interrupted') else ''}")
    rows = [r for r in d.get("rows", []) if isinstance(r, dict)]
    by = {(r.get("impl"), r.get("B")): r for r in rows}
    for r in rows:
        B, D, impl = r.get("B"), r.get("D") or 512, r.get("impl")
        t = _num(r.get("time_ms"))
        if not isinstance(B, int):
            continue
        eb = 4 if "32" in str(r.get("dtype", "")) else 2  # fp32 rows: 4-byte traffic; the rate stays bf16's
        fl = open_clip_loss_floor(B, D, dev, elem_bytes=eb, logit_bytes=eb) if impl in ("open_clip", "plain_torch") \
            else loss_floor(B, D, dev, elem_bytes=eb)
        ratio = fl.ratio(t / 1e3) if t else None
        out.append(f"  B={B:>8} {str(impl):14s} {r.get('dtype', '')!s:5s} {_fmt(t, '.3f')} ms / floor "
                   f"{fl.floor_s * 1e3:.3f} ms = {_fmt(ratio)}x  peak {_fmt(_num(r.get('peak_mem_mb')), '.1f')} MB"
                   f"  {r.get('status', '')}")
    ours = by.get(("bmclip_triton", 32768), {})
    oc = by.get(("open_clip", 32768), {})
    t_ours, t_oc = _num(ours.get("time_ms")), _num(oc.get("time_ms"))
    d32 = ours.get("D") or 512
    r_floor = loss_floor(32768, d32, dev).ratio(t_ours / 1e3) if t_ours else None
    targets.append(("loss B=32k: time / 5-pass floor (measured peak)", _fmt(r_floor) + "x" if r_floor else "missing",
                    "<= 1.3x", None if r_floor is None else r_floor <= 1.3))
    r_oc = t_ours / t_oc if (t_ours and t_oc) else None
    targets.append(("loss B=32k: time vs open_clip", _fmt(r_oc, ".3f") + "x" if r_oc else "missing", "<= 0.65x",
                    None if r_oc is None else r_oc <= 0.65))
    m_ours, m_oc = _num(ours.get("peak_mem_mb")), _num(oc.get("peak_mem_mb"))
    r_m = m_ours / m_oc if (m_ours and m_oc) else None
    targets.append(("loss B=32k: peak memory vs open_clip", f"1/{1 / r_m:.0f}" if r_m else "missing", "<= 1/50",
                    None if r_m is None else r_m <= 1 / 50))
    big = by.get(("bmclip_triton", 1 << 20), {})
    ok = big.get("status") == "ok" and _num(big.get("time_ms")) is not None
    targets.append(("loss B=1M rows on one GPU", "ok" if ok else (big.get("status") or "missing"), "ok",
                    True if ok else (False if big else None)))


def _summary_attention(run, dev, sheet, out, targets):
    path, d = _first_json(run, "bench_attention.json", "bench_attention/*.json")
    out.append("")
    if d is None:
        out.append("[attention] no bench_attention JSON")
        targets.append(("attention ViT fwd+bwd vs fastest SDPA", "missing", ">= 1.0x", None))
        targets.append(("text tower vs padded-to-256 SDPA", "missing", ">= 1.8x", None))
        return
    env = d.get("env", {})
    out.append(f"[attention] {path.name}{' (interrupted)' if env.get('interrupted') else ''}")
    cfg = _preset()
    rows = [r for r in d.get("rows", []) if isinstance(r, dict)]
    for r in rows:
        sec, meth = r.get("section"), r.get("method")
        fb = _num(r.get("fwd_bwd_ms"))
        if "skipped" in r:
            out.append(f"  {sec:10s} {meth:26s} skipped ({r['skipped']})")
            continue
        if fb is None:
            continue
        if sec == "vit":
            b, s, h, hd = r.get("shape") or (256, 197, 12, 64)
            fl = attention_floor([s] * b, h, hd, dev, name="vit")
        elif sec == "text_attn":
            n = int(r.get("n_captions") or 256)
            fl = attention_floor(expected_lengths(n - n % 2), 12, 64, dev, name="text")
        elif sec == "text_tower":
            n = int(r.get("n_captions") or 256)
            m1, m2 = length_moments(caption_lengths())
            flops = 3 * n * text_forward_flops(cfg, m1, m2)["total"]
            fl = Floor("text tower (unpadded FLOPs)", flops, 0.0, dev)
        else:
            continue
        out.append(f"  {sec:10s} {meth:26s} fwd+bwd {fb:9.3f} ms / floor {fl.floor_s * 1e3:8.4f} ms = "
                   f"{_fmt(fl.ratio(fb / 1e3))}x")
    vit = {r["method"]: r["fwd_bwd_ms"] for r in rows if r.get("section") == "vit" and _num(r.get("fwd_bwd_ms"))}
    sdpa = [v for k, v in vit.items() if str(k).startswith("sdpa_")]
    tri = vit.get("triton")
    sp = min(sdpa) / tri if (tri and sdpa) else None
    targets.append(("attention ViT fwd+bwd vs fastest SDPA", _fmt(sp) + "x" if sp else "missing", ">= 1.0x",
                    None if sp is None else sp >= 1.0))
    tow = {r["method"]: r["fwd_bwd_ms"] for r in rows if r.get("section") == "text_tower" and _num(r.get("fwd_bwd_ms"))}
    un = tow.get("triton_unpadded")
    pad = tow.get("sdpa_padded_to_context")
    sp2 = pad / un if (un and pad) else None
    targets.append(("text tower vs padded-to-256 SDPA", _fmt(sp2) + "x" if sp2 else "missing", ">= 1.8x",
                    None if sp2 is None else sp2 >= 1.8))


def _summary_fused(run, dev, sheet, out, targets):
    path, d = _first_json(run, "bench_fused_ops.json", "bench_fused_ops/*.json")
    out.append("")
    if d is None:
        out.append("[fused ops] no bench_fused_ops JSON")
        return
    out.append(f"[fused ops] {path.name}{' (interrupted)' if d.get('interrupted') else ''} (memory-bound: floor = "
               f"credited bytes / {dev.hbm_gbps:.0f} GB/s)")
    for r in d.get("rows", []):
        g = _num(r.get("fwd_bwd_gbps")) if isinstance(r, dict) else None
        if g:
            out.append(f"  {r.get('shape')!s:5s} {r.get('case')!s:10s} {r.get('method')!s:8s} fwd+bwd "
                       f"{_fmt(_num(r.get('fwd_bwd_ms')), '.3f')} ms, {g:.0f} GB/s: measured / floor = "
                       f"{dev.hbm_gbps / g:.2f}x")


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-tflops", type=float, help="measured bf16 matmul TFLOP/s (replaces the datasheet's)")
    ap.add_argument("--hbm-gbps", type=float, help="measured copy bandwidth, GB/s (replaces the datasheet's)")
    ap.add_argument("--peak-json", type=Path, help="read both measured figures from this --measure JSON")
    ap.add_argument("--measure", action="store_true", help="GPU: measure both figures first (and --out them)")
    ap.add_argument("--out", type=Path, help="with --measure: write the measured figures here (JSON)")
    ap.add_argument("--summary", type=Path, metavar="RUN_DIR", help="print measured / floor for a gpu_suite run")
    ap.add_argument("--batch", type=int, default=512, help="training batch (the logits term per sample)")
    args = ap.parse_args(argv)

    if args.summary:
        print(summary_report(args.summary))
        return 0
    name, mt, bw = None, args.peak_tflops, args.hbm_gbps
    if args.measure:
        rec = measure(str(args.out) if args.out else None)
        print(json.dumps(rec))
        name, mt, bw = rec["device"], rec["matmul_bf16_tflops"], rec["copy_gbps"]
    elif args.peak_json:
        rec = _load(args.peak_json) or {}
        name, mt, bw = rec.get("device"), _num(rec.get("matmul_bf16_tflops")), _num(rec.get("copy_gbps"))
    reports = [floors_report(dev, batch=args.batch) for dev in DEVICES.values()]
    if mt is not None or bw is not None:
        if _known(name):
            bases = [device_from(name)]
        elif mt is not None and bw is not None:
            bases = [Device(name or "this card", mt, bw, "measured")]
        else:
            bases = list(DEVICES.values())
        where = f"measured{' on ' + name if name else ''}" + ("" if (mt and bw) else "; the other from the datasheet")
        for base in bases:
            dev = replace(base, name=f"{base.name} at measured rates", bf16_tflops=mt or base.bf16_tflops,
                          hbm_gbps=bw or base.hbm_gbps, source=where)
            reports.append(floors_report(dev, batch=args.batch))
    print("\n\n".join(reports))
    return 0


def _known(name: str | None) -> bool:
    try:
        device_from(name)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
