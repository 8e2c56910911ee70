"""BERT text tower (PubMedBERT layout, post-norm), pooled as the last hidden state of [CLS], plus
BiomedCLIP's MLP projection.

Each layer is kept as separate clean modules (``attn.qkv``, ``attn.out``, ``norm1``, ``mlp.fc1``,
``mlp.fc2``, ``norm2``) that act on the last dimension only, so the same parameters can also run
on packed (unpadded) tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bmclip.errors import DataError
from bmclip.model.attention import resolve_backend
from bmclip.model.config import TextConfig
from bmclip.model.layers import Mlp, SelfAttention, fused_layer_norm, init_linear_
from bmclip.model.unpad import UNPADDED_BACKENDS, bert_tokens_unpadded, cls_of_packed


class BertEmbeddings(nn.Module):
    """word + token-type(0) + position embeddings, then LayerNorm (and dropout in training)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_id)
        self.position = nn.Embedding(cfg.max_positions, cfg.width)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fused_ops = False  # plain attribute: the position add + norm as one Triton LayerNorm

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids and position_ids int64 of the same shape (...) -> (..., W)."""
        # Same summation order as HF BERT ((word + type) + position) so fp32 results agree closely.
        x = self.word(input_ids) + self.token_type.weight[0]
        if self.fused_ops:
            return self.dropout(fused_layer_norm(self.norm, x, residual=self.position(position_ids))[0])
        x = x + self.position(position_ids)
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """Post-norm layer: x = norm1(x + attn(x)); x = norm2(x + mlp(x)).

    ``fused_ops`` (plain attribute): both residual adds fused into Triton LayerNorms.
    """

    def __init__(self, cfg: TextConfig, backend: str):
        super().__init__()
        self.attn = SelfAttention(cfg.width, cfg.heads, backend, tower="text")
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fused_ops = False

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, W), key_padding_mask bool (B, L) True = real token, or None -> (B, L, W)."""
        return self.finish(x, self.attn(x, key_padding_mask))

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Everything after the attention: x and attn_out (..., W) -> norm2(h + mlp(h)), h = norm1(x + attn_out).

        Acts on the last dim only, so the packed (unpadded) tower runs it on (total_tokens, W) as well.
        """
        if self.fused_ops:
            # The stream is passed as x so the outputs keep the stream's dtype (fp32 under autocast, as
            # torch's autocast LayerNorm gives); the returned sums are not needed in a post-norm layer.
            x = fused_layer_norm(self.norm1, x, residual=self.dropout(attn_out))[0]
            return fused_layer_norm(self.norm2, x, residual=self.dropout(self.mlp(x)))[0]
        x = self.norm1(x + self.dropout(attn_out))
        return self.norm2(x + self.dropout(self.mlp(x)))


class TextProjection(nn.Module):
    """Linear(W -> hidden, no bias) -> GELU -> Linear(hidden -> embed_dim, no bias)."""

    def __init__(self, width: int, hidden: int, embed_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W) -> (B, embed_dim)."""
        return self.fc2(F.gelu(self.fc1(x)))


class BertTextEncoder(nn.Module):
    """Token ids (B, L) int64 with pad_id padding -> [CLS] features projected to (B, embed_dim)."""

    def __init__(self, cfg: TextConfig, embed_dim: int, backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList([BertLayer(cfg, backend) for _ in range(cfg.layers)])
        self.proj = TextProjection(cfg.width, cfg.proj_hidden, embed_dim)
        self.grad_checkpointing = False
        # Drop trailing columns that are padding in every row before running the encoder: exact (those
        # keys are masked anyway) and it saves the work on short captions padded to the context length.
        self.trim_padding = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT-style init: normal/trunc-normal (std 0.02), zero padding embedding row."""
        init_linear_(self)
        for emb in (self.embeddings.word, self.embeddings.position, self.embeddings.token_type):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.embeddings.word.weight[self.cfg.pad_id].zero_()
        nn.init.normal_(self.proj.fc1.weight, std=self.cfg.width**-0.5)
        nn.init.normal_(self.proj.fc2.weight, std=self.cfg.proj_hidden**-0.5)

    def _mask_and_trim(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = input_ids != self.cfg.pad_id
        # Position 0 ([CLS]) is always attended, so a row of pure padding yields finite features
        # instead of NaN from a fully masked softmax row.
        mask[:, 0] = True
        # Under torch.compile the data-dependent trim would break the graph and recompile for every new
        # length, so compiled code keeps the full (masked) context instead.
        if not self.trim_padding or torch.compiler.is_compiling() or input_ids.shape[0] == 0:
            return input_ids, mask
        # One host sync for both facts: real tokens per row and which columns hold any real token.
        b = input_ids.shape[0]
        host = torch.cat([mask.sum(dim=1), mask.any(dim=0).long()]).tolist()
        counts, col_any = host[:b], host[b:]
        last = max(i for i, v in enumerate(col_any) if v) + 1
        input_ids, mask = input_ids[:, :last], mask[:, :last]
        if all(c == last for c in counts):
            mask = None  # no padding left: lets SDPA pick its fastest (mask-free) kernel
        return input_ids, mask

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise DataError(
                f"expected input_ids of shape (B, L) and integer dtype, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if input_ids.shape[1] > self.cfg.max_positions:
            raise DataError(f"input_ids length {input_ids.shape[1]} exceeds max_positions={self.cfg.max_positions}")
        if input_ids.shape[1] == 0:
            raise DataError("input_ids has zero length (expected at least the [CLS] token)")
        return input_ids.long()

    def forward_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 -> last hidden states (B, L', W), L' <= L after trimming all-padding columns."""
        input_ids, mask = self._mask_and_trim(self._check_ids(input_ids))
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embeddings(input_ids, pos)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def attn_backend_for(self, device: torch.device | str) -> str:
        """The attention backend this tower runs on ``device`` (its setting, "auto" resolved)."""
        setting = self.layers[0].attn.attn_backend if len(self.layers) else "sdpa"
        return resolve_backend(setting, "text", device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) int64, pad_id = padding -> (B, embed_dim) unnormalised."""
        backend = self.attn_backend_for(input_ids.device)
        if backend in UNPADDED_BACKENDS:
            # Flash backends run unpadded: only real tokens are packed and computed, [CLS] read at the end.
            input_ids = self._check_ids(input_ids)
            mask = input_ids != self.cfg.pad_id
            mask[:, 0] = True  # same rule as _mask_and_trim: [CLS] is always a real token
            x, packed = bert_tokens_unpadded(self, input_ids, mask, backend)
            return self.proj(cls_of_packed(x, packed))
        return self.proj(self.forward_tokens(input_ids)[:, 0])
