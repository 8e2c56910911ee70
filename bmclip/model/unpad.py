"""Flash-attention backends for the attention switch, and the unpadded (packed-token) BERT text tower.

``register_flash_backends()`` adds ``"triton"`` and ``"xformers"`` to ``bmclip.model.attention``'s registry
(padded ``(B, H, L, dh)`` calls, as the ViT makes them). With either backend the text tower runs
**unpadded**: the batch's real tokens are packed once into ``(total_tokens, W)`` (``cu_seqlens`` from the
padding mask), embeddings and every layer (attention in flash-attn's varlen layout, MLP, LayerNorms) run on
packed tokens, and each caption's [CLS] (its first packed token) is taken at the end. No FLOPs are spent on
padding, and the parameters are the very same modules, so checkpoints do not depend on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bmclip.errors import ConfigError
from bmclip.model.attention import register_backend

# Backends served by bmclip.kernels.flash_attention; the text tower runs packed with these.
FLASH_BACKENDS = ("triton", "xformers")
UNPADDED_BACKENDS = FLASH_BACKENDS


def _flash(q, k, v, backend, **kwargs):
    # start-up cost: bmclip.kernels imports Triton and torch._dynamo (~1 s); only the flash backends need it
    from bmclip.kernels.flash_attention import FlashAttentionUnavailable, flash_attention

    try:
        return flash_attention(q, k, v, backend=backend, **kwargs)
    except FlashAttentionUnavailable as e:
        raise ConfigError(f"attn_backend={backend!r}: {e}") from e


@dataclass(frozen=True)
class PackedBatch:
    """Where a padded batch's real tokens sit once packed.

    indices: int64 (total_tokens,) positions of the real tokens in the flattened (B*L) batch, row-major;
    cu_seqlens: int32 (B + 1,) start of each sequence in the packed order; max_seqlen: longest sequence;
    batch, seqlen: the padded shape.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seqlen: int


def pack_padding_mask(mask: torch.Tensor) -> PackedBatch:
    """bool (B, L) True = real token -> PackedBatch (real tokens keep their row order and relative order)."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ConfigError(f"padding mask must be bool (B, L), got {tuple(mask.shape)} {mask.dtype}")
    lens = mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(lens.max()) if lens.numel() else 0
    return PackedBatch(indices, cu_seqlens, max_seqlen, mask.shape[0], mask.shape[1])


def unpack(x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Packed (total_tokens, ...) -> padded (B, L, ...) with zeros at padding positions."""
    out = x.new_zeros((packed.batch * packed.seqlen, *x.shape[1:]))
    out = out.index_copy(0, packed.indices, x)
    return out.view(packed.batch, packed.seqlen, *x.shape[1:])


def _switch_backend(name: str):
    """The attention-switch function for flash backend ``name``: (B, H, L, dh) q/k/v -> (B, H, L, dh)."""

    def fn(q, k, v, *, key_padding_mask=None, dropout_p=0.0):
        if dropout_p:
            raise ConfigError(f"attn_backend={name!r} has no attention dropout (got dropout_p={dropout_p}); "
                              "use attn_backend='sdpa' for attention dropout")
        b, h, n, dh = q.shape
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, dh) views, head dim still unit-stride
        if key_padding_mask is None:
            return _flash(qt, kt, vt, name).transpose(1, 2)
        # With padding: run only the real tokens (varlen) and put zeros at padded query rows. Real rows are
        # identical to SDPA with a key mask; padded rows differ (SDPA lets them attend), and nothing reads them.
        packed = pack_padding_mask(key_padding_mask)
        flat = [t.reshape(b * n, h, dh).index_select(0, packed.indices) for t in (qt, kt, vt)]
        o = _flash(*flat, name, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
        return unpack(o, packed).transpose(1, 2)

    fn.__name__ = f"flash_{name}"
    return fn


def register_flash_backends() -> None:
    """Register ``"triton"`` and ``"xformers"`` in the attention switch (idempotent)."""
    for name in FLASH_BACKENDS:
        register_backend(name, _switch_backend(name))


def packed_self_attention(attn, x: torch.Tensor, packed: PackedBatch, backend: str) -> torch.Tensor:
    """``SelfAttention`` ``attn`` on packed tokens: x (total_tokens, W) -> (total_tokens, W)."""
    t, w = x.shape
    q, k, v = attn.qkv(x).view(t, 3, attn.heads, attn.head_dim).unbind(1)
    o = _flash(q, k, v, backend, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
    return attn.out(o.reshape(t, w))


def packed_bert_layer(layer, x: torch.Tensor, packed: PackedBatch, backend: str) -> torch.Tensor:
    """``BertLayer`` ``layer`` (post-norm) on packed tokens: x (total_tokens, W) -> (total_tokens, W)."""
    return layer.finish(x, packed_self_attention(layer.attn, x, packed, backend))


def bert_tokens_unpadded(encoder, input_ids: torch.Tensor, mask: torch.Tensor,
                         backend: str) -> tuple[torch.Tensor, PackedBatch]:
    """``BertTextEncoder`` on packed tokens: int64 ids (B, L), bool mask (B, L) -> ((total, W), PackedBatch).

    Position ids are the tokens' original column indices, so the result equals the padded tower's real rows.
    """
    packed = pack_padding_mask(mask)
    b, n = input_ids.shape
    ids = input_ids.reshape(-1).index_select(0, packed.indices)
    pos = packed.indices % n
    x = encoder.embeddings(ids, pos)
    for layer in encoder.layers:
        if encoder.grad_checkpointing and encoder.training and torch.is_grad_enabled():
            x = checkpoint(packed_bert_layer, layer, x, packed, backend, use_reentrant=False)
        else:
            x = packed_bert_layer(layer, x, packed, backend)
    return x, packed


def cls_of_packed(x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Each sequence's first packed token (its [CLS]): (total, W) -> (B, W). Every sequence must be non-empty."""
    return x.index_select(0, packed.cu_seqlens[:-1].long())
