"""Contrastive losses by name, and the learned logit scale / bias they train.

``train.loss.kind`` names an entry of :data:`LOSSES`. An entry builds its loss (a ``bmclip.kernels`` module
called as ``loss(image_features, text_features, logit_scale, logit_bias)``, each rank holding its own rows of
the global batch) and declares the logit scale and bias a model trained with it starts from; the trainer
writes those into the model config, so the model's parameters are initialised from the entry.

:class:`LogitScale` is the one place that knows how the temperature is stored and kept in range: the model
holds ``log(scale)`` (as open_clip); after every optimizer step it is clamped to ``[0, log(max_scale)]``;
logs report ``exp`` of it (and the bias when the model has one).

A new loss variant is one :func:`register_loss` call (here or in user code before ``train``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bmclip.errors import ConfigError
from bmclip.kernels import ClipLoss, SigLipLoss
from bmclip.train.gradcache import LossFn


@dataclass(frozen=True)
class LossEntry:
    """One registered loss: its name, how to build it, and the logit scale/bias it starts from.

    ``factory(rank=, world_size=, backend=)`` returns the loss callable; ``init_logit_scale`` is the LOG of
    the initial scale; ``init_logit_bias`` None means the model has no bias parameter.
    """

    name: str
    summary: str
    factory: Callable[..., LossFn]
    init_logit_scale: float
    init_logit_bias: float | None = None

    def build(self, *, rank: int = 0, world_size: int = 1, backend: str = "auto") -> LossFn:
        """The loss of rank ``rank`` of ``world_size`` on kernel backend ``backend`` (auto | triton | torch)."""
        return self.factory(rank=rank, world_size=world_size, backend=backend)

    def model_overrides(self) -> dict:
        """The ModelConfig fields this loss decides (``create_model(preset, **overrides)``)."""
        return {"init_logit_scale": self.init_logit_scale, "init_logit_bias": self.init_logit_bias}


LOSSES: dict[str, LossEntry] = {}


def register_loss(entry: LossEntry) -> LossEntry:
    """Add ``entry`` under ``entry.name`` (a name registered twice is an error); returns it."""
    if entry.name in LOSSES:
        raise ValueError(f"loss {entry.name!r} is already registered")
    LOSSES[entry.name] = entry
    return entry


def loss_names() -> list[str]:
    """The names ``loss.kind`` accepts, sorted."""
    return sorted(LOSSES)


def get_loss(name: str) -> LossEntry:
    """The entry registered as ``name``; an unknown name is a ConfigError listing the registered ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"loss.kind: unknown loss {name!r}; registered losses: {', '.join(loss_names())}") from None


def _clip(*, rank: int, world_size: int, backend: str) -> nn.Module:
    # local_loss: each rank's rows against all columns; gather_with_grad: the gradient reaches every rank's rows
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size, backend=backend)


def _siglip(*, rank: int, world_size: int, backend: str) -> nn.Module:
    return SigLipLoss(rank=rank, world_size=world_size, backend=backend)


register_loss(LossEntry(
    "clip", "CLIP InfoNCE over the global batch (softmax both directions); temperature 0.07, no bias",
    _clip, init_logit_scale=math.log(1 / 0.07), init_logit_bias=None))
# Zhai et al. 2023 (SigLIP): t' = log 10, b = -10, so that the many negatives start near zero loss.
register_loss(LossEntry(
    "siglip", "SigLIP pairwise sigmoid loss over the global batch; learned scale (from 10) and bias (from -10)",
    _siglip, init_logit_scale=math.log(10.0), init_logit_bias=-10.0))


class LogitScale:
    """Clamp and read out a model's learned logit scale (stored as its log) and bias.

    ``max_scale`` bounds ``exp(logit_scale)`` (100 as in CLIP); the lower bound is scale 1 (log 0).
    """

    def __init__(self, max_scale: float = 100.0):
        if not max_scale > 0:
            raise ConfigError(f"loss.max_logit_scale: must be > 0 (got {max_scale})")
        self.max_scale = float(max_scale)
        self.max_log = math.log(max_scale)

    @torch.no_grad()
    def clamp_(self, model: nn.Module) -> None:
        """Clamp ``model.logit_scale`` (the bare model's parameter, in place) to ``[0, log(max_scale)]``."""
        model.logit_scale.clamp_(0, self.max_log)

    @staticmethod
    def readout(model: nn.Module) -> dict:
        """``{"logit_scale": exp(log scale)}`` plus ``"logit_bias"`` when the model has one (for the logs)."""
        out = {"logit_scale": float(model.logit_scale.detach().float().exp())}
        if getattr(model, "logit_bias", None) is not None:
            out["logit_bias"] = float(model.logit_bias.detach().float())
        return out
