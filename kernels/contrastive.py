"""Memory-linear contrastive losses: CLIP InfoNCE and SigLIP — input checks, backend dispatch, single-device autograd.

Neither backend ever holds the B×B logit matrix. Both work on a *block*: rows ``A`` (M, D) against
columns ``C`` (N, D) with logits ``x_ij = s·A_i·C_j + b`` and positives at ``j = i + off``. The
single-device loss is the square block (A = image, C = text, off = 0); a rank under torch.distributed
works on its own image rows against the gathered text (off = rank·local_batch), see ``contrastive_dist.py``.

CLIP, with row / column log-sum-exps ``r_i = LSE_j x_ij``, ``c_j = LSE_i x_ij``::

    L  = (1/2B) [Σ_i (r_i − x_ii) + Σ_j (c_j − x_jj)]
    dL/dx_ij = α_i (P^row_ij − δ_ij) + γ_j (P^col_ij − δ_ij),  α = γ = 1/(2B)

SigLIP, with z_ij = +1 on positives and −1 elsewhere::

    L  = (1/B) Σ_ij softplus(−z_ij x_ij),      dL/dx_ij = −z_ij σ(−z_ij x_ij) / B

and for both dA = s·dX·C, dC = s·dXᵀ·A, ds = Σ dX_ij·(A_i·C_j), db = Σ dX_ij.

Backends: ``contrastive_triton.py`` (Triton kernels: 5 GEMM-equivalent passes over B×B×D for forward +
backward where one program holds all of D, see there and ``loss_work``) and ``contrastive_torch.py``
(chunked torch). Dtypes: fp32 features use exact fp32 math (IEEE dots); fp16/bf16 features (what a
bf16-autocast trainer hands over) are multiplied on tensor cores with fp32 accumulation. The loss is
fp32 and the feature gradients come back in the features' dtype. float64 features (single device only)
run on the torch backend in float64 math and give a float64 loss, as open_clip's losses do: ``"auto"``
picks torch for them and an explicit ``"triton"`` raises ``BackendUnavailable`` (the kernels are fp32/16-bit).
"""

from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, BackendUnavailable, is_interpreted, require_triton, triton_available_for
from .contrastive_torch import CLIP, SIGLIP, positives_fp32
from .contrastive_torch import torch_backward as _torch_backward
from .contrastive_torch import torch_forward as _torch_forward
from .contrastive_triton import _fwd_kernel as _triton_probe_kernel
from .contrastive_triton import tri_backward as _tri_backward
from .contrastive_triton import tri_forward as _tri_forward

__all__ = ["clip_loss", "siglip_loss", "BACKENDS", "CLIP", "SIGLIP", "block_forward", "block_backward", "positives"]

BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        bad = sorted({str(t.dtype) for t in tensors if t.dtype not in _TRITON_DTYPES})
        if bad:
            raise BackendUnavailable(f"contrastive loss backend='triton' cannot run here: its kernels take "
                                     f"float32/float16/bfloat16 features, got {', '.join(bad)}; use "
                                     "backend='torch' (or 'auto') for float64")
        require_triton(_triton_probe_kernel, *tensors, what="contrastive loss backend='triton'")
        return "triton"
    # auto: Triton on CUDA (compiled, not interpreted) for the dtypes it takes, torch otherwise
    if any(t.dtype not in _TRITON_DTYPES for t in tensors):
        return "torch"
    if all(t.device.type == "cuda" for t in tensors) and HAS_TRITON and not is_interpreted(_triton_probe_kernel):
        ok, _ = triton_available_for(_triton_probe_kernel, *tensors)
        if ok:
            return "triton"
    return "torch"


def _no_autocast(t: torch.Tensor):
    # The fp32 math here must not be re-cast by an enclosing torch.autocast region (a bf16 logit matmul
    # in the torch backend would cost ~3 digits); inputs keep their own dtypes.
    return torch.autocast(device_type=t.device.type, enabled=False)


def block_forward(A, C, scale, bias, off, loss, need_col, backend):
    """Per-block forward stats: CLIP → (row LSE (M,), column LSE over these rows (N,)); SigLIP → (row sums, None)."""
    with _no_autocast(A):
        if backend == "triton":
            return _tri_forward(A, C, scale, bias, off, loss, need_col)
        return _torch_forward(A, C, scale, bias, off, loss, need_col)


def block_backward(A, C, scale, bias, off, loss, row_lse, col_lse, row_coef, col_coef, sig_coef, out_dtype,
                   backend):
    """Per-block gradients → (dA (M, D), dC (N, D), d scale (), d bias ()) given dL/dx coefficients."""
    fn = _tri_backward if backend == "triton" else _torch_backward
    with _no_autocast(A):
        return fn(A, C, scale, bias, off, loss, row_lse, col_lse, row_coef, col_coef, sig_coef, out_dtype)


def positives(A, C, scale, bias, off):
    """Positive logits x_{i, i+off} (M,) in fp32 (C must hold rows off .. off+M−1)."""
    with _no_autocast(A):
        return positives_fp32(A, C, scale, bias, off)


def check_features(image_features, text_features, name="clip_loss"):
    """Validate (B, D) feature pairs (float32/float16/bfloat16/float64); return them cast to one common dtype."""
    for nm, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {nm} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {nm} must be 2-D (B, D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: {nm} dtype must be float32/float16/bfloat16/float64, got {t.dtype}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"{name}: image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same (B, D)")
    if image_features.shape[0] < 1 or image_features.shape[1] < 1:
        raise ValueError(f"{name}: need B >= 1 and D >= 1, got {tuple(image_features.shape)}")
    if image_features.device != text_features.device:
        raise ValueError(f"{name}: features on different devices ({image_features.device} vs "
                         f"{text_features.device})")
    dt = torch.promote_types(image_features.dtype, text_features.dtype)
    return image_features.to(dt), text_features.to(dt)


def as_scalar_tensor(v, like: torch.Tensor, what: str):
    """logit_scale / logit_bias as a tensor on the features' device (python floats become constants)."""
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        try:
            v = float(v)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what} must be a tensor or a number, got {type(v).__name__}") from exc
        return torch.tensor(v, dtype=torch.float32, device=like.device)
    if v.numel() != 1:
        raise ValueError(f"{what} must hold a single value, got shape {tuple(v.shape)}")
    if v.device != like.device:
        raise ValueError(f"{what} is on {v.device} but the features are on {like.device}")
    return v


def _grad_like(g: torch.Tensor | None, ref: torch.Tensor | None, needed: bool):
    if ref is None or not needed or g is None:
        return None
    return g.reshape(ref.shape).to(ref.dtype)


# The loss autograd functions all take (img, txt, scale, bias, ...) with an optional bias; these keep the
# save / restore / gradient bookkeeping for that signature in one place.
def _save_inputs(ctx, img, txt, scale, bias, *extra) -> None:
    """save_for_backward(img, txt, scale, bias, *extra), a placeholder standing in for an absent bias."""
    ctx.save_for_backward(img, txt, scale, bias if bias is not None else scale, *extra)
    ctx.has_bias = bias is not None


def _saved_inputs(ctx) -> tuple:
    """What _save_inputs stored: (img, txt, scale, bias or None, *extra)."""
    img, txt, scale, bias, *extra = ctx.saved_tensors
    return (img, txt, scale, bias if ctx.has_bias else None, *extra)


def _scale_bias_grads(ctx, ds, db, scale, bias) -> tuple:
    """Gradients for the scale and bias inputs (positions 2 and 3), None where not needed."""
    return (_grad_like(ds, scale, ctx.needs_input_grad[2]),
            _grad_like(db, bias, ctx.has_bias and ctx.needs_input_grad[3]))


# ----------------------------------------------------------------------------------------------------
# Autograd functions (single device)
# ----------------------------------------------------------------------------------------------------
class _ClipLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, backend):
        B = img.shape[0]
        row, col = block_forward(img, txt, scale, bias, 0, CLIP, True, backend)
        pos = positives(img, txt, scale, bias, 0)
        loss = (row.sum() + col.sum() - 2.0 * pos.sum()) / (2.0 * B)
        _save_inputs(ctx, img, txt, scale, bias, row, col)
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias, row, col = _saved_inputs(ctx)
        B = img.shape[0]
        coef = (g.detach().to(row.dtype).reshape(1) / (2.0 * B)).expand(B).contiguous()
        dI, dT, ds, db = block_backward(img, txt, scale, bias, 0, CLIP, row, col, coef, coef, None, img.dtype,
                                        ctx.backend)
        return (dI if ctx.needs_input_grad[0] else None, dT if ctx.needs_input_grad[1] else None,
                *_scale_bias_grads(ctx, ds, db, scale, bias), None)


class _SigLipLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, backend):
        B = img.shape[0]
        row, _ = block_forward(img, txt, scale, bias, 0, SIGLIP, False, backend)
        _save_inputs(ctx, img, txt, scale, bias)
        ctx.backend = backend
        return row.sum() / B

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias = _saved_inputs(ctx)
        B = img.shape[0]
        coef = g.detach().to(torch.float64 if img.dtype == torch.float64 else torch.float32).reshape(()) / B
        dI, dT, ds, db = block_backward(img, txt, scale, bias, 0, SIGLIP, None, None, None, None, coef, img.dtype,
                                        ctx.backend)
        return (dI if ctx.needs_input_grad[0] else None, dT if ctx.needs_input_grad[1] else None,
                *_scale_bias_grads(ctx, ds, db, scale, bias), None)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, backend="auto"):
    """Symmetric CLIP InfoNCE loss of (B, D) features, never forming B×B: an fp32 scalar for fp32/fp16/bf16
    features, a float64 one for float64 features (torch backend).

    Mean of the image→text and text→image cross-entropies of ``logit_scale·I·Tᵀ (+ logit_bias)`` with
    positives on the diagonal; ``logit_scale`` is the already-exponentiated scale (tensor or float).
    Gradients flow to both feature tensors, the scale and the bias. ``backend``: "triton", "torch" or
    "auto" (Triton on CUDA, torch otherwise); "triton" raises RuntimeError where it cannot run.
    """
    img, txt = check_features(image_features, text_features, "clip_loss")
    scale = as_scalar_tensor(logit_scale, img, "logit_scale")
    bias = as_scalar_tensor(logit_bias, img, "logit_bias")
    be = _resolve_backend(backend, img, txt)
    return _ClipLossFn.apply(img, txt, scale, bias, be)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend="auto"):
    """Sigmoid (SigLIP) loss (fp32 scalar): Σ_ij −logσ(z_ij·(s·I_i·T_j + b)) / B, z = +1 on the diagonal.

    (B, D) fp32/fp16/bf16 features (fp32 loss) or float64 ones (float64 loss); ``logit_bias`` may be None (no
    bias). Same backends and dtypes as ``clip_loss``.
    """
    img, txt = check_features(image_features, text_features, "siglip_loss")
    scale = as_scalar_tensor(logit_scale, img, "logit_scale")
    bias = as_scalar_tensor(logit_bias, img, "logit_bias")
    be = _resolve_backend(backend, img, txt)
    return _SigLipLossFn.apply(img, txt, scale, bias, be)
