"""The BiomedCLIP model: ViT image tower + BERT text tower + learnable logit scale (and optional bias)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bmclip.config_dict import update_from_dict
from bmclip.errors import ConfigError
from bmclip.model.attention import check_backend
from bmclip.model.bert import BertEmbeddings, BertLayer, BertTextEncoder
from bmclip.model.config import ModelConfig, get_preset
from bmclip.model.layers import Mlp, SelfAttention
from bmclip.model.vit import VisionTransformer, ViTBlock

# Modules with a ``fused_ops`` attribute (Triton LayerNorm / bias-GELU); set_fused_ops flips them all.
_FUSED_OPS_MODULES = (ViTBlock, VisionTransformer, BertEmbeddings, BertLayer, Mlp)


class BiomedCLIP(nn.Module):
    """BiomedCLIP: ``encode_image``/``encode_text`` as in open_clip; ``forward`` returns normalised features."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTransformer(config.vision, config.embed_dim, config.tower_attn_backend("image"))
        self.text = BertTextEncoder(config.text, config.embed_dim, config.tower_attn_backend("text"))
        # Holds the LOG of the temperature scale, as open_clip does.
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        else:
            self.logit_bias = None
        self.set_grad_checkpointing(config.grad_checkpointing)
        self.set_fused_ops(config.fused_ops)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images float (B, 3, H, W), normalised with IMAGE_MEAN/IMAGE_STD -> (B, embed_dim) unnormalised."""
        return self.visual(images)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 (B, L), 0 = padding -> (B, embed_dim) unnormalised."""
        return self.text(input_ids)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> dict[str, Any]:
        """-> dict(image_features (B, D) L2-normalised, text_features (B', D) L2-normalised,
        logit_scale = exp(self.logit_scale) scalar, logit_bias scalar tensor or None)."""
        return {
            "image_features": F.normalize(self.encode_image(images), dim=-1),
            "text_features": F.normalize(self.encode_text(input_ids), dim=-1),
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }

    def set_image_size(self, image_size: int) -> None:
        """Use the model at a new input resolution: resamples the ViT position grid, updates the config.

        Replaces the ``visual.pos_embed`` Parameter: call it before building the optimizer.
        """
        self.visual.set_image_size(image_size)
        self.config.vision.image_size = image_size

    def set_attn_backend(self, name: str, tower: str | None = None) -> None:
        """Route attention through backend ``name`` ("auto" or a registered name; ConfigError if unknown).

        ``tower=None`` sets both towers (``config.attn_backend``, clearing the per-tower overrides);
        ``tower="image"`` or ``"text"`` sets only that tower's override. Parameter names never change.
        """
        check_backend(name)
        if tower is None:
            modules, self.config.image_attn_backend, self.config.text_attn_backend = self, None, None
            self.config.attn_backend = name
        elif tower in ("image", "text"):
            modules = self.visual if tower == "image" else self.text
            setattr(self.config, f"{tower}_attn_backend", name)
        else:
            raise ConfigError(f"tower must be None, 'image' or 'text', got {tower!r}")
        for m in modules.modules():
            if isinstance(m, SelfAttention):
                m.attn_backend = name

    def attn_backends(self, device: torch.device | str | None = None) -> dict[str, str]:
        """{"image": backend, "text": backend} that the towers run on ``device`` (default: the parameters')."""
        if device is None:
            device = self.logit_scale.device
        return {"image": self.visual.attn_backend_for(device), "text": self.text.attn_backend_for(device)}

    def set_fused_ops(self, enabled: bool = True) -> None:
        """Run every LayerNorm (fused with its residual add) and MLP bias+GELU of both towers through the
        Triton kernels (bmclip.kernels.fused_ops), or back through torch. Parameter names never change;
        with ``enabled`` a forward pass raises ConfigError where Triton cannot run (CPU without
        TRITON_INTERPRET=1)."""
        for m in self.modules():
            if isinstance(m, _FUSED_OPS_MODULES):
                m.fused_ops = bool(enabled)
        self.config.fused_ops = bool(enabled)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer block in backward (training only) to save activation memory."""
        self.visual.grad_checkpointing = bool(enabled)
        self.text.grad_checkpointing = bool(enabled)
        self.config.grad_checkpointing = bool(enabled)

    def num_params(self) -> int:
        """Number of parameters (elements)."""
        return sum(p.numel() for p in self.parameters())


def create_model(preset_or_config: str | ModelConfig | dict = "biomedclip-vit-b16-224", **overrides) -> BiomedCLIP:
    """Build a freshly initialised BiomedCLIP from a preset name, a ModelConfig or a config dict.

    ``overrides`` replace top-level ModelConfig fields; ``vision=``/``text=`` dicts update those
    sub-configs key by key (e.g. ``vision={"patch_dropout": 0.5}``).
    """
    if isinstance(preset_or_config, str):
        cfg = get_preset(preset_or_config)
    elif isinstance(preset_or_config, ModelConfig):
        cfg = copy.deepcopy(preset_or_config)
    elif isinstance(preset_or_config, dict):
        cfg = ModelConfig.from_dict(preset_or_config)
    else:
        raise ConfigError(f"expected a preset name, ModelConfig or dict, got {type(preset_or_config).__name__}")
    cfg = update_from_dict(cfg, overrides, parse_strings=False)
    cfg.validate()
    return BiomedCLIP(cfg)
