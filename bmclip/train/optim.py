"""AdamW with open_clip's parameter groups and a cosine learning-rate schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from bmclip.errors import ConfigError

# Free ``nn.Parameter`` embedding tables (ViT position embedding, class token) are found by these name parts
# (``decay_embeddings=False``); parameters of Linear / Conv layers never are.
_EMBEDDING_NAME_PARTS = ("pos", "cls", "class", "embed", "token", "logit")


def no_decay_names(model: nn.Module, *, decay_embeddings: bool = True) -> set[str]:
    """Parameter names exempt from weight decay.

    By default open_clip_train's rule, the one BiomedCLIP was trained with: every parameter with fewer than 2
    dimensions (LayerNorm gains and biases, Linear biases, logit_scale, logit_bias) is exempt, and every other one,
    embedding tables, the ViT position embedding and class token included, is decayed. (open_clip_train's rule,
    ``p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n``, names no 2+-dim parameter of a
    bmclip model, nor of the open_clip model it exports to.)

    ``decay_embeddings=False`` (timm-style) also exempts the embedding tables: every ``nn.Embedding`` weight and the
    free ``nn.Parameter`` tables such as the ViT position embedding and class token. Projection matrices, the
    patch-embedding conv included, are decayed either way.
    """
    out = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.ndim < 2:
                out.add(full)
            elif decay_embeddings:
                continue
            elif isinstance(mod, nn.Embedding) or (not isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv1d)) and any(
                    s in p_name for s in _EMBEDDING_NAME_PARTS)):
                out.add(full)
    return out


def param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything in ``no_decay_names`` (weight_decay 0)."""
    exempt = no_decay_names(model, decay_embeddings=decay_embeddings)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg, device_type: str) -> torch.optim.AdamW:
    """AdamW(β=(beta1, beta2), eps, lr) over ``param_groups`` (``cfg.decay_embeddings``); fused kernel on CUDA
    when requested."""
    kwargs = {}
    if device_type == "cuda" and cfg.fused:
        kwargs["fused"] = True
    groups = param_groups(model, cfg.weight_decay, decay_embeddings=cfg.decay_embeddings)
    return torch.optim.AdamW(groups, lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def check_resume_grouping(saved_config: dict | None, cfg) -> None:
    """ConfigError when a checkpoint's optimizer state has other parameter groups than ``cfg`` (an OptimSection)
    builds: its ``optim.decay_embeddings`` differs. ``saved_config`` is the checkpoint's training config dict;
    one saved before the key existed exempted the embedding tables (``false``). AdamW's state cannot be loaded
    into groups of other sizes, so this says which value resumes it."""
    saved = (saved_config or {}).get("optim")
    if not isinstance(saved, dict):
        return  # no saved optimizer config: nothing to compare
    theirs = bool(saved.get("decay_embeddings", False))
    if theirs != bool(cfg.decay_embeddings):
        t, o = str(theirs).lower(), str(bool(cfg.decay_embeddings)).lower()
        raise ConfigError(f"optim.decay_embeddings: the checkpoint's optimizer state was saved with "
                          f"optim.decay_embeddings={t} (other weight-decay groups than {o} here); resume it with "
                          f"--optim.decay_embeddings={t}, or start afresh with --resume=none")


def cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """LR for optimizer step ``step`` (0-based): linear warm-up to base_lr, then cosine to min_lr.

    Matches open_clip's ``cosine_lr``: during warm-up lr = base_lr * (step + 1) / warmup_steps; after it,
    e = step - warmup, es = total - warmup, lr = min_lr + 0.5 * (1 + cos(pi * e / es)) * (base_lr - min_lr).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    es = total_steps - warmup_steps
    if es <= 0:
        return base_lr
    e = min(step - warmup_steps, es)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * e / es)) * (base_lr - min_lr)


class CosineSchedule:
    """Stateless-by-construction scheduler: the LR is a pure function of the step (exact on resume)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, warmup_steps: int,
                 total_steps: int, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.base_lr, self.warmup_steps = base_lr, warmup_steps
        self.total_steps, self.min_lr = total_steps, min_lr
        self.step_num = 0

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based optimizer step ``step``."""
        return cosine_lr(step, base_lr=self.base_lr, warmup_steps=self.warmup_steps,
                         total_steps=self.total_steps, min_lr=self.min_lr)

    def set_step(self, step: int) -> float:
        """Write the LR of ``step`` into every param group; returns it."""
        self.step_num = step
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"step_num": self.step_num, "base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "min_lr": self.min_lr}

    def load_state_dict(self, sd: dict) -> None:
        self.step_num = int(sd["step_num"])

