"""Fused LayerNorm (with an optional residual add) and bias + GELU as Triton kernels, forward and backward.

Both are memory-bound, so the point is fewer passes over HBM than torch eager:

* ``layer_norm(x, w, b, eps, residual=r)`` computes ``s = x + r`` and ``LayerNorm(s)`` in one pass (reads x
  and r, writes s and y) -- the pre-norm ``x = x + attn(...); h = norm2(x)`` pair and the post-norm
  ``norm(x + sublayer(x))`` of a transformer block. The backward pass writes dX (and the residual's grad)
  in one pass and reduces dW/dB through per-program partial sums ((programs, N) fp32, then one sum over
  programs), instead of torch's separate dX and dW/dB passes.
* ``bias_gelu(x, b)`` is ``GELU(x + b)`` for the output of a bias-free GEMM (the MLP's fc1): one read and
  one write forward; backward reads dY and x once and writes dX while reducing dB in the same pass (torch
  reads dX a second time for the bias gradient).

Statistics and arithmetic are fp32 whatever the storage dtype (fp32/fp16/bf16). With a residual, the sum
``s`` is rounded to ``torch.promote_types(x.dtype, residual.dtype)`` (what ``x + residual`` gives in torch)
and the LayerNorm is taken of that rounded sum, so ``y`` is exactly LayerNorm of the returned ``s``. Outputs
have x's dtype, as under autocast the consumer (a Linear) casts anyway; weights may be fp32 with bf16 x.

Exact GELU uses ``tl.math.erf``: libdevice's ``erff`` on the GPU (max error about 2 ulp) and ``math.erf``
under TRITON_INTERPRET=1 (checked by tests/test_fused_ops.py), so no hand-written erf approximation is needed.

This module holds the dispatch, the autograd Functions and the torch path; the Triton kernels, their launch
shapes and launchers are in ``bmclip.kernels.fused_ops_triton``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import fused_ops_triton as _fot
from ._triton_utils import HAS_TRITON, BackendUnavailable, is_interpreted, triton_available_for
from .fused_ops_triton import MAX_LN_WIDTH

__all__ = ["BACKENDS", "MAX_LN_WIDTH", "FusedOpsUnavailable", "bias_gelu", "layer_norm"]

BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH_ONLY_DTYPES = (torch.float64,)  # the torch backend also takes float64 (references in tests)
_GELU_APPROX = ("none", "tanh")


# backend='triton' was asked for but cannot run here: the one exception type of bmclip.kernels, under the name
# this module has always exported.
FusedOpsUnavailable = BackendUnavailable


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()



# ----------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------
class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        # The kernels read weight/bias at unit stride: a strided (N,) view (e.g. a column of a (N, 2) parameter)
        # is copied once here and saved so; autograd still hands the (N,) gradients back to the view.
        weight = weight.contiguous() if weight is not None else None
        bias = bias.contiguous() if bias is not None else None
        shape = x.shape
        x2 = _rows2d(x)
        r2 = _rows2d(residual) if residual is not None else None
        s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else None
        y, s, mean, rstd = _fot.ln_forward(x2, r2, weight, bias, eps, s_dtype)
        ctx.save_for_backward(s if s is not None else x2, weight, mean, rstd)
        ctx.meta = (shape, x.dtype, residual.dtype if residual is not None else None,
                    bias.dtype if bias is not None else None)
        ctx.set_materialize_grads(False)  # post-norm callers never use s: no zero tensor to read back
        if residual is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    @once_differentiable  # the kernels' gradients are not differentiable again: raise, never silently wrong
    def backward(ctx, dy, ds=None):
        s2, weight, mean, rstd = ctx.saved_tensors
        shape, x_dtype, r_dtype, b_dtype = ctx.meta
        need_dw = weight is not None and ctx.needs_input_grad[2]
        need_db = b_dtype is not None and ctx.needs_input_grad[3]
        if dy is None:
            dy = torch.zeros(shape, dtype=x_dtype, device=s2.device)
        ds2 = _rows2d(ds) if ds is not None else None
        dx, dr, dw, db = _fot.ln_backward(_rows2d(dy), ds2, s2, weight, mean, rstd, x_dtype, r_dtype, need_dw,
                                          need_db)
        dx = dx.view(shape)
        dr = dr.view(shape) if dr is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(b_dtype) if db is not None else None
        return dx, dr, dw, db, None


# torch.compile: dynamo cannot trace these launches (it fails inside Triton's launcher / interpreter), so the
# Triton path is an explicit graph break that runs eagerly; the torch backend stays traceable.
_ln_apply = torch.compiler.disable(_LayerNormFn.apply)


def _ln_torch(x, weight, bias, eps, residual):
    s = x + residual if residual is not None else x
    n = (x.shape[-1],)
    if all(t is None or t.dtype == s.dtype for t in (weight, bias)):
        y = F.layer_norm(s, n, weight, bias, eps)
    else:  # e.g. bf16 activations with fp32 parameters: normalise in fp32
        y = F.layer_norm(s.float(), n, None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)
    y = y.to(x.dtype)
    return (y, s) if residual is not None else y


def _check_float(name: str, t, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES + _TORCH_ONLY_DTYPES:
        raise ValueError(f"{fn}: {name} must be float32, float16 or bfloat16 (float64: torch backend), got {t.dtype}")


def _resolve(backend: str, kernel, tensors, fn: str, width: int, max_width: int | None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        ok, reason = triton_available_for(kernel, *tensors)  # checks HAS_TRITON before touching kernel
        if not ok:
            raise FusedOpsUnavailable(f"{fn}(backend='triton') cannot run: {reason}")
        if any(t.dtype not in _DTYPES for t in tensors):
            raise ValueError(f"{fn}(backend='triton'): float64 is not supported (fp32/fp16/bf16); use backend='torch'")
        if max_width is not None and width > max_width:
            raise ValueError(f"{fn}(backend='triton'): row width {width} > {max_width} (one row per block); "
                             "use backend='torch'")
        return "triton"
    # auto: compiled Triton on CUDA, torch otherwise (the interpreter is for tests, never chosen implicitly)
    if HAS_TRITON and not is_interpreted(kernel) and all(t.is_cuda for t in tensors):
        ok, _ = triton_available_for(kernel, *tensors)
        if ok and (max_width is None or width <= max_width) and all(t.dtype in _DTYPES for t in tensors):
            return "triton"
    return "torch"


def layer_norm(x, weight, bias, eps=1e-5, *, residual=None, backend="auto"):
    """LayerNorm over the last dim of x (..., N); with ``residual`` (same shape) returns (LN(x + r), x + r).

    x, residual: fp32/fp16/bf16; weight, bias: (N,) or None, any of those dtypes. Statistics in fp32; the output
    has x's dtype, the sum has ``torch.promote_types(x.dtype, residual.dtype)``. ``backend``: "triton" (runs or
    raises FusedOpsUnavailable), "torch" (plain torch) or "auto" (Triton on CUDA, torch otherwise).
    """
    fn = "layer_norm"
    _check_float("x", x, fn)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{fn}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    tensors = [x]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _check_float(name, p, fn)
        if p.shape != (n,):
            raise ValueError(f"{fn}: {name} must have shape ({n},), got {tuple(p.shape)}")
        tensors.append(p)
    if residual is not None:
        _check_float("residual", residual, fn)
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        tensors.append(residual)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}: eps must be a positive finite number, got {eps!r}")
    be = _resolve(backend, _fot._ln_fwd_kernel if HAS_TRITON else None, tensors, fn, n, MAX_LN_WIDTH)
    if be == "torch":
        return _ln_torch(x, weight, bias, float(eps), residual)
    return _ln_apply(x, residual, weight, bias, float(eps))


# ----------------------------------------------------------------------------------------------------
# bias + GELU
# ----------------------------------------------------------------------------------------------------
class _BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approx_tanh):
        bias = bias.contiguous()  # read at unit stride by the kernels (see _LayerNormFn.forward)
        shape = x.shape
        x2 = _rows2d(x)
        y = _fot.bias_gelu_forward(x2, bias, approx_tanh)
        ctx.save_for_backward(x2, bias)
        ctx.meta = (shape, approx_tanh)
        return y.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        shape, approx_tanh = ctx.meta
        dx, db = _fot.bias_gelu_backward(_rows2d(dy), x2, bias, approx_tanh, ctx.needs_input_grad[1])
        return dx.view(shape), db, None


_bias_gelu_apply = torch.compiler.disable(_BiasGeluFn.apply)  # see _ln_apply


def bias_gelu(x, bias, *, approximate="none", backend="auto"):
    """GELU(x + bias): x (..., N) fp32/fp16/bf16, bias (N,) -> (..., N) in x's dtype, computed in fp32.

    ``approximate``: "none" (exact erf GELU, nn.GELU's default) or "tanh". ``backend``: "triton" (runs or
    raises FusedOpsUnavailable), "torch" (plain torch) or "auto" (Triton on CUDA, torch otherwise).
    """
    fn = "bias_gelu"
    _check_float("x", x, fn)
    _check_float("bias", bias, fn)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{fn}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"{fn}: bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"{fn}: x is on {x.device} but bias is on {bias.device}")
    if approximate not in _GELU_APPROX:
        raise ValueError(f"{fn}: approximate must be one of {_GELU_APPROX}, got {approximate!r}")
    be = _resolve(backend, _fot._bias_gelu_fwd_kernel if HAS_TRITON else None, (x, bias), fn, x.shape[-1], None)
    if be == "torch":
        return F.gelu(x + bias, approximate=approximate).to(x.dtype)
    return _bias_gelu_apply(x, bias, approximate == "tanh")
