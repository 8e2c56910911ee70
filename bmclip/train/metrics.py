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

import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bmclip.io import atomic_write_text

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


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GiB: CUDA allocator peak on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # VmHWM belongs to this address space; ru_maxrss survives exec on Linux, so a process started by a
    # bigger one (torchrun's agent, pytest) would report its parent's peak when that was higher.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB


class ThroughputMeter:
    """Training throughput over the window of steps since the last :meth:`read`.

    Per step the loop reports the seconds it waited for data (:meth:`add_data_wait`), the step's batch
    (:meth:`add_step`: the rows and real text tokens of THIS rank, whose model FLOPs are counted against
    ``global_batch`` logit columns) and, for an applied update, its loss (:meth:`add_loss`). Time spent in
    :meth:`paused` blocks (validation, checkpoints) is not training time. :meth:`read` returns samples/s
    (global batches: every rank runs the same steps), the data-wait fraction, model TFLOP/s of this rank and
    MFU against ``peak_tflops`` (None when unknown), then starts a new window; ``total_s`` / ``total_samples``
    add up the windows read so far.
    """

    def __init__(self, model_config, *, global_batch: int, world_size: int = 1, patch_dropout: float = 0.0,
                 peak_tflops: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.mcfg = model_config
        self.global_batch, self.world_size = global_batch, world_size
        self.patch_dropout = patch_dropout
        self.peak_tflops = peak_tflops or None
        self.clock = clock
        self.total_s = 0.0  # training time of every window read so far (the run's, pauses excluded)
        self.total_samples = 0
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.t0 = self.clock()
        self.data_s = self.flops = self.loss_sum = 0.0
        self.samples = self.losses = 0

    def add_data_wait(self, seconds: float) -> None:
        self.data_s += seconds

    def add_step(self, text_token_counts) -> None:
        """One finished step whose rows on this rank have these real (unpadded) text token counts."""
        counts = list(text_token_counts)
        self.samples += self.global_batch
        self.flops += train_step_flops(self.mcfg, batch=len(counts), text_token_counts=counts,
                                       patch_dropout=self.patch_dropout, logit_columns=self.global_batch)

    def add_loss(self, loss: float) -> None:
        self.loss_sum += loss
        self.losses += 1

    @property
    def mean_loss(self) -> float | None:
        """Mean loss of the window's applied updates (None when every step was skipped)."""
        return self.loss_sum / self.losses if self.losses else None

    @contextlib.contextmanager
    def paused(self):
        """Time inside this block does not count as training time."""
        t = self.clock()
        try:
            yield
        finally:
            self.t0 += self.clock() - t

    def read(self) -> dict:
        """The window's rates (see the class docstring); starts a new window."""
        dt = max(self.clock() - self.t0, 1e-12)
        self.total_s += dt
        self.total_samples += self.samples
        sps = self.samples / dt
        tflops = self.flops / dt / 1e12
        out = {"samples_per_s": sps, "samples_per_s_per_gpu": sps / self.world_size,
               "data_wait_frac": self.data_s / dt, "tflops_per_gpu": tflops,
               "mfu": tflops / self.peak_tflops if self.peak_tflops else None}
        self.reset()
        return out


def trim_jsonl(path: str | os.PathLike, step: int) -> int:
    """Drop rows past ``step`` (and a torn last line) from a metrics.jsonl; returns the rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    rows = read_jsonl(path)
    keep = [r for r in rows if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    with open(path, "rb") as f:
        torn = not f.read().endswith(b"\n") and path.stat().st_size > 0
    if len(keep) == len(rows) and not torn:
        return 0
    atomic_write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), path)
    return len(rows) - len(keep)


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
                # optional dependency: tensorboard
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
    # start-up cost: matplotlib (~0.3 s) loads only when curves are plotted; Agg is chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg"): no display is needed

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
