"""Building blocks shared by both towers: multi-head self-attention (fused qkv) and the 2-layer MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bmclip.errors import ConfigError
from bmclip.model.attention import attention


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` Linear(W, 3W), the attention switch, ``out`` Linear(W, W).

    The backend is a plain attribute (``attn_backend``: a registered name or "auto") so switching it never
    changes parameter names; ``tower`` ("image" or "text") is what "auto" decides for.
    """

    def __init__(self, width: int, heads: int, backend: str = "sdpa", dropout: float = 0.0, tower: str = "image"):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.attn_backend = backend
        self.tower = tower
        self.dropout = dropout

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, W) -> q, k, v each (B, H, L, dh) (views of one qkv projection).

        ``unbind`` rather than three indexings: its backward stacks the three gradients in one op, where
        ``qkv[i]`` would give three zero-filled ``select_backward`` buffers and two in-place adds per layer.
        """
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, W) float, key_padding_mask bool (B, L) True = real token -> (B, L, W)."""
        b, n, w = x.shape
        q, k, v = self.split_heads(x)
        o = attention(
            q,
            k,
            v,
            backend=self.attn_backend,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
            tower=self.tower,
        )
        return self.out(o.transpose(1, 2).reshape(b, n, w))


def _fused_ops():
    # start-up cost: bmclip.kernels imports Triton and torch._dynamo (~1 s); unfused models never need them
    from bmclip.kernels import fused_ops

    return fused_ops


def fused_layer_norm(norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None = None):
    """``norm``'s parameters through the Triton LayerNorm: x (..., W) -> (..., W) in x's dtype, or with
    ``residual`` (same shape) -> (norm(x + residual), x + residual). ConfigError if Triton cannot run here."""
    fo = _fused_ops()
    try:
        return fo.layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual, backend="triton")
    except fo.FusedOpsUnavailable as e:
        raise ConfigError(f"fused_ops=True: {e}") from e


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, as in timm ViT and BERT.

    ``fused_ops`` (plain attribute, parameter names unchanged): fc1 without its bias, then the Triton
    bias + GELU kernel (the bias gradient is reduced in the GELU backward pass instead of a separate one).
    """

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.fused_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., W) -> (..., W)."""
        if self.fused_ops:
            fo = _fused_ops()
            try:
                h = fo.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, backend="triton")
            except fo.FusedOpsUnavailable as e:
                raise ConfigError(f"fused_ops=True: {e}") from e
            return self.fc2(h)
        return self.fc2(F.gelu(self.fc1(x)))


def init_linear_(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) weights and zero biases for every Linear/Conv2d, unit LayerNorms, below module.

    Plain normal rather than torch's trunc_normal_, whose rejection loop takes seconds per tensor on CPU.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
