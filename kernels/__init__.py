"""Triton kernels for CLIP training (contrastive loss, flash attention, fused LayerNorm / bias-GELU); imports only
torch and triton."""

from ._triton_utils import BackendUnavailable
from .contrastive import clip_loss, siglip_loss
from .flash_attention import flash_attention
from .fused_ops import bias_gelu, layer_norm
from .losses import ClipLoss, SigLipLoss

__all__ = ["BackendUnavailable", "clip_loss", "siglip_loss", "ClipLoss", "SigLipLoss", "flash_attention", "layer_norm",
           "bias_gelu"]
