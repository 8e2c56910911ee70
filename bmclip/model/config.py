"""Typed model configurations and the named presets (the released BiomedCLIP architecture and friends)."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from bmclip.config_dict import update_from_dict
from bmclip.errors import ConfigError, is_int
from bmclip.model.attention import check_backend

# Attention backend of both towers unless a tower sets its own: "auto" (per tower and device, see
# bmclip.model.attention.resolve_backend) or a name registered in bmclip.model.attention ("sdpa", "triton",
# "xformers").
DEFAULT_ATTN_BACKEND = "auto"


@dataclass
class VisionConfig:
    """ViT image tower (timm ``vit_base_patch16_224`` layout: pre-norm blocks, CLS token, CLS pooling)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    ln_eps: float = 1e-6
    # FLIP-style patch dropout: fraction of patch tokens dropped per image in training (CLS always kept).
    patch_dropout: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        _positive(self, "vision", ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim"))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size={self.image_size} is not a multiple of vision.patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise ConfigError(f"vision.width={self.width} is not divisible by vision.heads={self.heads}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"vision.patch_dropout={self.patch_dropout} must be in [0, 1)")
        if not self.ln_eps > 0:
            raise ConfigError(f"vision.ln_eps={self.ln_eps} must be > 0")


@dataclass
class TextConfig:
    """BERT text tower (PubMedBERT layout: post-norm, token-type embeddings), pooled at [CLS]."""

    vocab_size: int = 30522
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    context_length: int = 256
    pad_id: int = 0
    ln_eps: float = 1e-12
    # Hidden size of the 2-layer MLP text projection (released: (768 + 512) // 2 = 640).
    proj_hidden: int = 640
    # BERT hidden dropout (embeddings and each sub-layer output) in training; 0 keeps train == eval.
    dropout: float = 0.0

    def validate(self) -> None:
        _positive(
            self,
            "text",
            (
                "vocab_size",
                "width",
                "layers",
                "heads",
                "mlp_dim",
                "max_positions",
                "type_vocab_size",
                "context_length",
                "proj_hidden",
            ),
        )
        if self.width % self.heads:
            raise ConfigError(f"text.width={self.width} is not divisible by text.heads={self.heads}")
        if self.context_length > self.max_positions:
            raise ConfigError(
                f"text.context_length={self.context_length} exceeds text.max_positions={self.max_positions}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"text.pad_id={self.pad_id} is outside the vocabulary (size {self.vocab_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"text.dropout={self.dropout} must be in [0, 1)")
        if not self.ln_eps > 0:
            raise ConfigError(f"text.ln_eps={self.ln_eps} must be > 0")


@dataclass
class ModelConfig:
    """A whole BiomedCLIP model: both towers, the shared embedding size and the logit scale/bias."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # The learned logit scale starts at exp(init_logit_scale) (the parameter holds its log, as open_clip's); a
    # bias parameter exists when init_logit_bias is set. Training takes both from the loss (bmclip.train.losses).
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    attn_backend: str = DEFAULT_ATTN_BACKEND
    # Per-tower overrides of attn_backend (None: use attn_backend); attention backends never change parameter
    # names, so checkpoints load whatever these say.
    image_attn_backend: str | None = None
    text_attn_backend: str | None = None
    grad_checkpointing: bool = False
    # Triton LayerNorm (fused with the residual adds) and fc1 bias + GELU in both towers
    # (bmclip.kernels.fused_ops); parameter names and checkpoints are the same either way.
    fused_ops: bool = False

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        if not isinstance(self.vision, VisionConfig):
            raise ConfigError(f"vision must be a VisionConfig, got {type(self.vision).__name__}")
        if not isinstance(self.text, TextConfig):
            raise ConfigError(f"text must be a TextConfig, got {type(self.text).__name__}")
        _positive(self, "", ("embed_dim",))
        if not isinstance(self.fused_ops, bool):
            raise ConfigError(f"fused_ops={self.fused_ops!r} must be a bool")
        self.vision.validate()
        self.text.validate()
        check_backend(self.attn_backend)
        for key in ("image_attn_backend", "text_attn_backend"):
            name = getattr(self, key)
            if name is not None:
                try:
                    check_backend(name)
                except ConfigError as e:
                    raise ConfigError(f"{key}: {e}") from None

    def tower_attn_backend(self, tower: str) -> str:
        """The attention setting of tower "image" or "text": its override, else ``attn_backend``."""
        if tower not in ("image", "text"):
            raise ConfigError(f"tower must be 'image' or 'text', got {tower!r}")
        override = self.image_attn_backend if tower == "image" else self.text_attn_backend
        return self.attn_backend if override is None else override

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (JSON-serialisable) that ``from_dict`` turns back into an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a nested dict; unknown keys raise ConfigError naming the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        cfg = update_from_dict(cls(), copy.deepcopy(d), parse_strings=False)
        cfg.validate()
        return cfg


def _positive(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for n in names:
        v = getattr(obj, n)
        if not is_int(v) or v <= 0:
            key = f"{prefix}.{n}" if prefix else n
            raise ConfigError(f"{key}={v!r} must be a positive integer")
        setattr(obj, n, int(v))


# --------------------------------------------------------------------------------------------- presets


def _b16(image_size: int) -> ModelConfig:
    return ModelConfig(vision=VisionConfig(image_size=image_size))


def _ablation(width: int, heads: int) -> ModelConfig:
    # The paper's ViT-S/16 and ViT-M/16 ablations keep PubMedBERT and change only the image tower.
    return ModelConfig(vision=VisionConfig(width=width, heads=heads, mlp_dim=4 * width))


def _tiny() -> ModelConfig:
    # Small enough that the CPU demo trains in seconds; vocab matches the bundled tokenizer's size bound.
    return ModelConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=2, heads=4, mlp_dim=512),
        text=TextConfig(
            vocab_size=4096,
            width=128,
            layers=2,
            heads=4,
            mlp_dim=512,
            max_positions=64,
            context_length=64,
            proj_hidden=(128 + 64) // 2,
        ),
    )


_PRESETS = {
    "biomedclip-vit-b16-224": lambda: _b16(224),
    "biomedclip-vit-b16-384": lambda: _b16(384),
    "biomedclip-vit-s16-224": lambda: _ablation(384, 6),
    "biomedclip-vit-m16-224": lambda: _ablation(512, 8),
    "tiny": _tiny,
}


def list_presets() -> list[str]:
    """Names accepted by ``get_preset`` / ``create_model``."""
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset; unknown names raise ConfigError."""
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(_PRESETS)})") from None
    cfg = factory()
    cfg.validate()
    return cfg
