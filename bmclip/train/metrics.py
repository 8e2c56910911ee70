"""Observability: JSONL log lines, TensorBoard (when installed), FLOP counting / MFU, PNG curves.

MFU = achieved model FLOP/s / the card's bf16 dense peak. Model FLOPs are counted from the architecture
(matmuls only, the convention of the PaLM/nanoGPT MFU definitions): forward = patch embedding + per
transformer layer ``8·T·d² + 4·T²·d + 4·T·d·m`` (QKV, scores, weighted sum, output projection, MLP) +
the projection heads + the logits matrix; training = 3 × forward. The image tower counts only the tokens
that survive patch dropout (+ CLS); the text tower counts only the real, unpadded tokens of each caption.
Gradient-checkpointing recompute and GradCache's extra no-grad forward are NOT counted (they are
overhead, not model FLOPs), so MFU is honest about them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Dense bf16 tensor-core peaks, TFLOP/s (NVIDIA datasheets; SXM parts). Matched by substring of the
# CUDA device name, first match wins (so "H100 PCIe" can precede "H100").
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # H100 SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
]


def peak_tflops_for(device_name: str) -> float | None:
    """bf16 dense peak (TFLOP/s) for a CUDA device name from the table above, or None when unknown."""
    for key, val in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return val
    return None


def _layer_flops(tokens: float, width: int, mlp: int) -> float:
    return 8.0 * tokens * width**2 + 4.0 * tokens**2 * width + 4.0 * tokens * width * mlp


def kept_patches(num_patches: int, patch_dropout: float) -> int:
    """Patches kept by FLIP patch dropout (open_clip's rule: max(1, int(n · (1 - p))))."""
    if patch_dropout <= 0:
        return num_patches
    return max(1, int(num_patches * (1.0 - patch_dropout)))


def image_forward_flops(cfg, patch_dropout: float = 0.0) -> float:
    """Forward FLOPs of the image tower for ONE image (ModelConfig ``cfg``; patch dropout applied)."""
    v = cfg.vision
    n = (v.image_size // v.patch_size) ** 2
    f = 2.0 * n * (3 * v.patch_size**2) * v.width  # patch embedding (before dropout)
    t = 1 + kept_patches(n, patch_dropout)
    f += v.layers * _layer_flops(t, v.width, v.mlp_dim)
    f += 2.0 * v.width * cfg.embed_dim  # projection of the pooled token
    return f


def text_forward_flops(cfg, tokens: float) -> float:
    """Forward FLOPs of the text tower for ONE caption of ``tokens`` real tokens (incl. [CLS]/[SEP])."""
    t = cfg.text
    f = t.layers * _layer_flops(tokens, t.width, t.mlp_dim)
    hidden = getattr(t, "proj_hidden", 0) or 0
    if hidden:
        f += 2.0 * t.width * hidden + 2.0 * hidden * cfg.embed_dim  # MLP projection head
    else:
        f += 2.0 * t.width * cfg.embed_dim
    return f


def train_step_flops(cfg, *, batch: int, text_token_counts, patch_dropout: float = 0.0,
                     logit_columns: int | None = None) -> float:
    """Model FLOPs of one training step on ``batch`` rows: 3 × forward, unpadded text tokens.

    ``text_token_counts``: per-caption real token counts (length ``batch``); the quadratic attention
    term is per caption, so lengths enter as sum and sum of squares rather than an average.
    ``logit_columns``: columns of the logits matrix these rows meet (the global batch under a sharded
    loss; default ``batch``).
    """
    counts = [float(c) for c in text_token_counts]
    if len(counts) != batch:
        raise ValueError(f"text_token_counts has {len(counts)} entries for batch {batch}")
    t = cfg.text
    s1, s2 = sum(counts), sum(c * c for c in counts)
    text = t.layers * (8.0 * s1 * t.width**2 + 4.0 * s2 * t.width + 4.0 * s1 * t.width * t.mlp_dim)
    text += batch * (text_forward_flops(cfg, 0.0))  # projection heads (0 tokens -> head FLOPs only)
    fwd = batch * image_forward_flops(cfg, patch_dropout) + text
    fwd += 2.0 * batch * (logit_columns or batch) * cfg.embed_dim  # logits = image_features @ text_features.T
    return 3.0 * fwd


class MetricsLogger:
    """One JSON object per line in ``OUT/metrics.jsonl`` (+ TensorBoard scalars when available), rank 0 only."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only (documented)
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must contain "step"); floats that are not finite are written as null."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, sort_keys=True) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = int(record["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        """Close the files (idempotent)."""
        if not self.enabled or self._f.closed:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a kill is ignored)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def plot_curves(records: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``loss.png`` (train loss vs step) and ``recall.png`` (val R@1/5 vs step when logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    train = [r for r in records if r.get("kind", "train") == "train" and r.get("loss") is not None]
    # After a resume, steps may be logged twice; keep the last record per step.
    by_step = {r["step"]: r for r in train}
    steps = sorted(by_step)
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [by_step[s]["loss"] for s in steps], lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("contrastive loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / "loss.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    val = {r["step"]: r for r in records if r.get("kind") == "val"}
    if val:
        vs = sorted(val)
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "text_to_image_R@5"):
            ys = [val[s].get(key) for s in vs]
            if any(y is not None for y in ys):
                ax.plot(vs, ys, marker="o", label=key)
        chance = val[vs[-1]].get("chance_R@1")
        if chance is not None:
            ax.axhline(chance, color="gray", ls="--", label="chance R@1")
        ax.set_xlabel("step")
        ax.set_ylabel("recall")
        ax.set_title("validation retrieval")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / "recall.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written
