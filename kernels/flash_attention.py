"""Flash attention (padded and variable-length) behind one call: Triton kernels, PyTorch SDPA, or xformers.

Layouts follow flash-attn: padded ``(batch, seqlen, nheads, headdim)``, or varlen ``(total_tokens, nheads,
headdim)`` with ``cu_seqlens`` (int32, ``batch + 1``, cumulative sequence starts). Keys and values share
the queries' sequence boundaries (self-attention).

This module holds the input checks, the backend dispatch, the autograd Function of the Triton path and the
SDPA / xformers paths; the Triton kernels, their autotune configurations and launchers live in
``bmclip.kernels.flash_attention_triton``. ``_BWD_DQ_MODE`` selects the Triton backward ("separate": a dQ
kernel, 7 matmuls per block pair, deterministic; "atomic": dQ accumulated with fp32 atomics in the dK/dV
kernel, 5 matmuls per block pair, as FlashAttention-2). "separate" stays the default until a GPU run of
``benchmarks/bench_attention.py`` shows the atomic one is faster.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import flash_attention_triton as _fat
from ._triton_utils import HAS_TRITON, BackendUnavailable, is_interpreted, triton_available_for

__all__ = ["BWD_DQ_MODES", "FlashAttentionUnavailable", "flash_attention", "resolve_backend", "triton_usable_on"]

_BACKENDS = ("auto", "triton", "sdpa", "xformers")
BWD_DQ_MODES = _fat.BWD_DQ_MODES
# How the Triton backward computes dQ (see the module docstring); read at every backward call.
_BWD_DQ_MODE = "separate"


# An explicitly requested backend cannot run here (no Triton/CUDA/interpreter, no xformers, ...): the one
# exception type of bmclip.kernels, under the name this module has always exported.
FlashAttentionUnavailable = BackendUnavailable


class _TritonFlashAttention(torch.autograd.Function):
    """Autograd wrapper over the Triton kernels, on varlen-shaped views ``(total, nheads, headdim)``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, batch, padded_seqlen, max_seqlen, causal, sm_scale):
        o, lse = _fat.forward(q, k, v, cu_seqlens, batch, padded_seqlen, max_seqlen, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.shape_info = (batch, padded_seqlen, max_seqlen, bool(causal), sm_scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        batch, padded_seqlen, max_seqlen, causal, sm_scale = ctx.shape_info
        dq, dk, dv = _fat.backward(do, q, k, v, o, lse, cu_seqlens, batch, padded_seqlen, max_seqlen, causal,
                                   sm_scale, _BWD_DQ_MODE)
        return dq, dk, dv, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Input checks shared by every backend


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"flash_attention: backend must be one of {_BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"flash_attention: q, k, v must have the same shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention: dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("flash_attention: q, k, v must be on the same device")
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attention: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
                                          and softmax_scale > 0):
        raise ValueError(f"flash_attention: softmax_scale must be a positive finite number, got {softmax_scale!r}")
    if q.dim() in (3, 4) and q.shape[-1] < 1:  # other ranks get the layout error below
        raise ValueError(f"flash_attention: head dim (q's last dimension) must be at least 1, got shape "
                         f"{tuple(q.shape)}")
    if cu_seqlens is None:
        if q.dim() != 4:
            raise ValueError("flash_attention: without cu_seqlens q must be (batch, seqlen, nheads, headdim), got "
                             f"shape {tuple(q.shape)}")
        if max_seqlen is not None:
            raise ValueError("flash_attention: max_seqlen is only meaningful with cu_seqlens (varlen layout)")
        return None
    if q.dim() != 3:
        raise ValueError("flash_attention: with cu_seqlens q must be (total_tokens, nheads, headdim), got shape "
                         f"{tuple(q.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("flash_attention: cu_seqlens must be a 1-D torch.int32 tensor")
    if cu_seqlens.numel() < 2:
        raise ValueError("flash_attention: cu_seqlens needs at least 2 entries (batch + 1)")
    if cu_seqlens.device != q.device:
        raise ValueError(f"flash_attention: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if max_seqlen is None:
        # One host sync; callers that know max_seqlen (the model does) skip it and this validation.
        cu_host = cu_seqlens.cpu()
        lens = cu_host[1:] - cu_host[:-1]
        if int(cu_host[0]) != 0 or int(cu_host[-1]) != q.shape[0] or bool((lens < 0).any()):
            raise ValueError("flash_attention: cu_seqlens must start at 0, be non-decreasing and end at "
                             f"total_tokens={q.shape[0]}, got {cu_host.tolist()[:8]}...")
        max_seqlen = int(lens.max())
    elif not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"flash_attention: max_seqlen must be a non-negative int, got {max_seqlen!r}")
    return max_seqlen


# ---------------------------------------------------------------------------------------------------
# Backends


def _triton_unavailable_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``q`` here, or None if they can."""
    if not HAS_TRITON:
        ok, reason = triton_available_for(None, q)  # says that Triton is not importable, and why
        return reason
    ok, reason = triton_available_for(_fat._attn_fwd_kernel, q)
    if not ok:
        return reason
    if is_interpreted(_fat._attn_fwd_kernel) and q.dtype == torch.bfloat16:
        return "bfloat16 tl.dot is not reliable under the Triton CPU interpreter (use fp16/fp32, or a GPU)"
    return None


def _flash_triton(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    reason = _triton_unavailable_reason(q)
    if reason is not None:
        raise FlashAttentionUnavailable(f"flash_attention(backend='triton') cannot run: {reason}")
    if q.shape[-1] > _fat.MAX_HEADDIM:
        raise ValueError(f"flash_attention(backend='triton'): head dim {q.shape[-1]} > {_fat.MAX_HEADDIM}")
    # The kernels index the head dim with unit stride; other strides are free (e.g. views of a fused qkv).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if cu_seqlens is None:
        batch, seqlen, nheads, head_dim = q.shape
        flat = [t.reshape(batch * seqlen, nheads, head_dim) for t in (q, k, v)]
        o = _TritonFlashAttention.apply(*flat, None, batch, seqlen, seqlen, causal, scale)
        return o.view(batch, seqlen, nheads, head_dim)
    batch = cu_seqlens.numel() - 1
    # The kernels read sequence bounds at CU + b: a strided 1-D view (validated on its true values) must not
    # reach them as-is.
    cu_seqlens = cu_seqlens.contiguous()
    return _TritonFlashAttention.apply(q, k, v, cu_seqlens, batch, 0, max_seqlen, causal, scale)


def _varlen_pad_index(cu_seqlens: torch.Tensor, max_seqlen: int):
    """(token positions in the padded (batch*max_seqlen) grid, key-valid mask (batch, max_seqlen))."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    batch = lens.numel()
    pos = torch.arange(max_seqlen, device=cu.device)
    valid = pos[None, :] < lens[:, None]
    flat_index = (torch.arange(batch, device=cu.device)[:, None] * max_seqlen + pos[None, :])[valid]
    return flat_index, valid


def _flash_sdpa(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    if cu_seqlens is None:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal, scale=scale)
        return o.transpose(1, 2)
    # Varlen via one padded SDPA call with a key mask: pad rows attend to real keys (no all-masked row,
    # hence no NaN) and are dropped again; real rows never see pad keys.
    total, nheads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    if total == 0 or max_seqlen == 0:
        # Nothing to attend over (no tokens, or rows beyond max_seqlen, which are not computed): zeros that stay
        # on the autograd graph of q, k and v, as the Triton path's output does (masked_fill, not * 0: no NaN
        # from non-finite inputs, and zero gradients).
        return (q + k + v).masked_fill(torch.ones((), dtype=torch.bool, device=q.device), 0)
    flat_index, valid = _varlen_pad_index(cu_seqlens, max_seqlen)

    def pad(t):
        out = t.new_zeros((batch * max_seqlen, nheads, head_dim))
        out = out.index_copy(0, flat_index, t)
        return out.view(batch, max_seqlen, nheads, head_dim).transpose(1, 2)

    mask = valid[:, None, None, :]
    if causal:
        pos = torch.arange(max_seqlen, device=q.device)
        mask = mask & (pos[None, None, None, :] <= pos[None, None, :, None])
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(batch * max_seqlen, nheads, head_dim).index_select(0, flat_index)


def _flash_xformers(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    try:  # xformers is optional: imported only when this backend is asked for
        import xformers.ops as xops
        from xformers.ops import fmha
    except ImportError as e:
        raise FlashAttentionUnavailable("flash_attention(backend='xformers') cannot run: xformers is not installed "
                           f"({e})") from e
    if not q.is_cuda:
        raise FlashAttentionUnavailable("flash_attention(backend='xformers') cannot run: xformers' "
                                        "memory_efficient_attention "
                           f"has no kernels for {q.device} tensors (needs CUDA)")
    return _xformers_call(xops.memory_efficient_attention, fmha.attn_bias, q, k, v, cu_seqlens, causal, scale)


def _xformers_call(mea, attn_bias, q, k, v, cu_seqlens, causal, scale):
    """Our layouts as one ``memory_efficient_attention`` call (``mea``; ``attn_bias``: xformers.ops.fmha.attn_bias).

    xformers takes ``[B, M, H, K]`` (= our padded layout) and a bias object: ``LowerTriangularMask`` for causal;
    varlen goes in as batch 1 with the sequences concatenated and a block-diagonal (causal) mask built from
    the sequence lengths. Split out so tests can check this mapping without CUDA kernels.
    """
    if cu_seqlens is None:
        bias = attn_bias.LowerTriangularMask() if causal else None
        return mea(q, k, v, attn_bias=bias, scale=scale)
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    mask_cls = attn_bias.BlockDiagonalCausalMask if causal else attn_bias.BlockDiagonalMask
    bias = mask_cls.from_seqlens(seqlens)
    o = mea(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_bias=bias, scale=scale)
    return o.squeeze(0)


def triton_usable_on(device: torch.device | str) -> bool:
    """Whether compiled Triton kernels can run on ``device`` (a CUDA device, Triton importable and not in
    interpreter mode); what ``backend="auto"`` asks before choosing Triton."""
    if torch.device(device).type != "cuda" or not HAS_TRITON:
        return False
    return not is_interpreted(_fat._attn_fwd_kernel)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ("triton" or "sdpa") that ``backend="auto"`` picks for tensors on ``device``."""
    if backend != "auto":
        return backend
    return "triton" if triton_usable_on(device) else "sdpa"


def flash_attention(q, k, v, *, cu_seqlens=None, max_seqlen=None, causal=False, softmax_scale=None,
                    backend="auto"):
    """Softmax attention: q/k/v (B, S, H, D) -> (B, S, H, D), or varlen (T, H, D) + int32 cu_seqlens -> (T, H, D).

    fp16/bf16/fp32; ``softmax_scale`` defaults to 1/sqrt(D); ``backend`` is "triton", "sdpa", "xformers"
    or "auto" (Triton on CUDA, SDPA otherwise). An explicit backend runs or raises, never falls back.
    ``max_seqlen`` (varlen only) skips a host sync and the validation of ``cu_seqlens`` when given; it must
    then be at least the longest sequence (as in flash-attn, rows beyond it are not computed).
    """
    max_seqlen = _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, backend)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        return _flash_triton(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if backend == "sdpa":
        return _flash_sdpa(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return _flash_xformers(q, k, v, cu_seqlens, max_seqlen, causal, scale)
