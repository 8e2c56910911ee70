"""Triton kernels for CLIP training (contrastive loss, flash attention); imports only torch and triton."""

from .contrastive import clip_loss, siglip_loss
from .flash_attention import flash_attention
from .losses import ClipLoss, SigLipLoss

__all__ = ["clip_loss", "siglip_loss", "ClipLoss", "SigLipLoss", "flash_attention"]
