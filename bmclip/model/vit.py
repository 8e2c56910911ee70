"""ViT image tower in timm's ``vit_base_patch16_224`` layout, plus BiomedCLIP's linear projection."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bmclip.errors import ConfigError, DataError
from bmclip.model.attention import resolve_backend
from bmclip.model.config import VisionConfig
from bmclip.model.layers import Mlp, SelfAttention, fused_layer_norm, init_linear_


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    ``fused_ops`` (plain attribute): Triton LayerNorms, the second one fused with the residual add.
    """

    def __init__(self, cfg: VisionConfig, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg.width, cfg.heads, backend, tower="image")
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)
        self.fused_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, W) -> (B, L, W)."""
        if self.fused_ops:
            # norm2 gets the attention output as x, so its output has the attention's dtype (bf16 under
            # autocast, what fc1 consumes) while the sum keeps the stream's dtype.
            h, x = fused_layer_norm(self.norm2, self.attn(fused_layer_norm(self.norm1, x)), residual=x)
            return x + self.mlp(h)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Images (B, 3, H, W) normalised -> CLS features projected to (B, embed_dim)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList([ViTBlock(cfg, backend) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.grad_checkpointing = False
        self.fused_ops = False  # the final norm through the Triton LayerNorm (blocks have their own flag)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-style init: normal (std 0.02) weights, tiny CLS token, width^-0.5 projection."""
        init_linear_(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.proj.weight, std=self.cfg.width**-0.5)

    @torch.no_grad()
    def set_image_size(self, image_size: int) -> None:
        """Resample the learned patch position grid (bicubic) for a new input size; CLS position kept.

        This is how a 224-px model continues training or is evaluated at 384 px.
        """
        p = self.cfg.patch_size
        if not isinstance(image_size, int) or image_size <= 0 or image_size % p:
            raise ConfigError(f"vision.image_size={image_size!r} must be a positive multiple of patch_size={p}")
        old, new = self.cfg.image_size // p, image_size // p
        if new != old:
            cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
            w = grid.shape[-1]
            grid = grid.float().reshape(1, old, old, w).permute(0, 3, 1, 2)
            # antialias only acts when shrinking the grid; it avoids aliasing the learned pattern then.
            grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=True)
            grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, w).to(self.pos_embed.dtype)
            self.pos_embed = nn.Parameter(torch.cat([cls_pos, grid], dim=1), requires_grad=self.pos_embed.requires_grad)
        self.cfg.image_size = image_size

    def patch_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Keep a random subset of the (B, N, W) patch tokens per image (training only, FLIP-style)."""
        p = self.cfg.patch_dropout
        if not self.training or p <= 0.0:
            return x
        b, n, w = x.shape
        keep = max(1, int(n * (1.0 - p)))
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, w))

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> final-normed tokens (B, 1 + kept patches, W); token 0 is CLS."""
        s = self.cfg.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise DataError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, W)
        x = x + self.pos_embed[:, 1:]
        x = self.patch_dropout(x)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return fused_layer_norm(self.norm, x) if self.fused_ops else self.norm(x)

    def attn_backend_for(self, device: torch.device | str) -> str:
        """The attention backend this tower runs on ``device`` (its setting, "auto" resolved)."""
        setting = self.blocks[0].attn.attn_backend if len(self.blocks) else "sdpa"
        return resolve_backend(setting, "image", device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float normalised -> (B, embed_dim) unnormalised."""
        return self.proj(self.forward_tokens(images)[:, 0])
