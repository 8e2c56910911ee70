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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._triton_utils import HAS_TRITON, BackendUnavailable, is_interpreted, triton, triton_available_for

if HAS_TRITON:
    import triton.language as tl

__all__ = ["BACKENDS", "FusedOpsUnavailable", "bias_gelu", "layer_norm"]

BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH_ONLY_DTYPES = (torch.float64,)  # the torch backend also takes float64 (references in tests)
_GELU_APPROX = ("none", "tanh")
# The Triton LayerNorm holds a whole row in registers (one block of next_pow2(N) columns).
MAX_LN_WIDTH = 8192

# GPU launch shapes (fixed heuristics, not autotuned: tuning ~10 kernel variants would cost tens of seconds
# on the first training step). Chosen from ptxas register counts for sm_90 (Triton 3.8): registers grow by
# ~5 (forward) and ~9 (backward) per element a thread holds, so the forward gives each thread 8 elements
# (a 16-byte bf16 load; ~40 registers, ~48 resident warps per SM) and the backward 4 (~46 registers); a
# program covers _FWD/_BWD_BLOCK_ELEMS elements: 2 rows of 768 forward, one row backward.
_FWD_BLOCK_ELEMS, _FWD_ELEMS_PER_THREAD = 2048, 8
_BWD_BLOCK_ELEMS, _BWD_ELEMS_PER_THREAD = 1024, 4
_GELU_BLOCK_N = 1024
# Persistent backward programs per SM, each looping over row blocks with one dW/dB partial row; 4 x 8 warps
# stay resident together at the register counts above, so all programs run in one wave.
_BWD_PROGRAMS_PER_SM = 4
# Under TRITON_INTERPRET=1: big blocks (fewer interpreted programs is what saves time there) and two
# backward programs, so the loop over row blocks and the partial-sum reduction are still exercised.
# Tests lower these to force many partial blocks.
_INTERPRET_BLOCK_ELEMS = 1 << 16
_INTERPRET_BWD_PROGRAMS = 2


# backend='triton' was asked for but cannot run here: the one exception type of bmclip.kernels, under the name
# this module has always exported.
FusedOpsUnavailable = BackendUnavailable


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _ln_fwd_kernel(X, R, W, B, Y, S, MEAN, RSTD, M, N, stride_x, stride_r, stride_y, stride_s, eps,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # Round the sum to its storage dtype first: y is then exactly LayerNorm of the returned s (and
            # of what torch's `x + residual` followed by layer_norm computes).
            s = (x + r).to(S.dtype.element_ty)
            tl.store(S + r64 * stride_s + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        # Two-pass variance on the row held in registers (no E[x^2] - E[x]^2 cancellation).
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _ln_bwd_kernel(DY, DS, S, W, MEAN, RSTD, DX, DR, DW_PART, DB_PART, M, N,
                       stride_dy, stride_ds, stride_s, stride_dx, stride_dr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DS: tl.constexpr, HAS_DR: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr):
        # Persistent over row blocks pid, pid + P, pid + 2P, ...; every program writes its dW/dB partial row
        # (zeros if it had no rows), so the host sums exactly P rows whatever M is.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(pid * BLOCK_M, M, nprog * BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            r64 = rows.to(tl.int64)[:, None]
            x = tl.load(S + r64 * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                wdy = dy * w[None, :]
            else:
                wdy = dy
            # dL/ds = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)), means over the row.
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DS:  # the returned sum s was used downstream too: its gradient adds straight through
                dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DR:  # the residual's gradient: the same values, rounded to the residual's dtype
                tl.store(DR + r64 * stride_dr + cols[None, :], dx.to(DR.dtype.element_ty), mask=mask)
            if HAS_DW:
                dw_acc += dy * xhat
            if HAS_DB:
                db_acc += dy
        if HAS_DW:
            tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if HAS_DB:
            tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)

    @triton.jit
    def _tanh_sech2(z):
        # tanh(u) and sech^2(u) = 1 - tanh^2(u) for u = sqrt(2/pi) (z + 0.044715 z^3), both from
        # m = exp(-2|u|) in (0, 1]: no overflow for any z, and sech^2 = 4m / (1 + m)^2 keeps full relative
        # accuracy in the tails where 1 - t*t would cancel to a few ulps of 1.
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        m = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - m) / (1.0 + m)
        t = tl.where(u < 0.0, -t, t)
        return t, 4.0 * m / ((1.0 + m) * (1.0 + m))

    @triton.jit
    def _gelu(z, APPROX_TANH: tl.constexpr):
        if APPROX_TANH:
            t, _ = _tanh_sech2(z)
            return 0.5 * z * (1.0 + t)
        else:
            return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(z, APPROX_TANH: tl.constexpr):
        if APPROX_TANH:
            t, sech2 = _tanh_sech2(z)
            # where(): far in the tails sech2 underflows to 0 while z^2 may be inf; 0 * inf must not be NaN.
            inner = tl.where(sech2 > 0.0, 0.5 * z * sech2 * 0.7978845608028654 * (1.0 + 0.134145 * z * z), 0.0)
            return 0.5 * (1.0 + t) + inner
        else:
            # Phi(z) + z * phi(z)
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327

    @triton.jit
    def _bias_gelu_fwd_kernel(X, B, Y, M, N, stride_x, stride_y,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = (rows < M)[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = _gelu(x + b[None, :], APPROX_TANH)
        tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_bwd_kernel(DY, X, B, DX, DB_PART, M, N, stride_dy, stride_x, stride_dx,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
                              HAS_DB: tl.constexpr):
        # Grid (P, column blocks): program (p, c) walks row blocks p, p + P, ... of column block c and writes
        # its dB partial into row p of DB_PART (P, N).
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(pid * BLOCK_M, M, nprog * BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & col_ok[None, :]
            r64 = rows.to(tl.int64)[:, None]
            x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dx = dy * _gelu_grad(x + b[None, :], APPROX_TANH)
            tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DB:
                # Masked lanes load dy = 0, so they add nothing.
                db_acc += dx
        if HAS_DB:
            tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------
# Launch shapes
# ----------------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _interpreting(kernel) -> bool:
    return is_interpreted(kernel)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _row_blocks(M: int, block_n: int, interp: bool, backward: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for a row-wise kernel whose rows are block_n wide."""
    if interp:
        target, per_thread = _INTERPRET_BLOCK_ELEMS, 1
    elif backward:
        target, per_thread = _BWD_BLOCK_ELEMS, _BWD_ELEMS_PER_THREAD
    else:
        target, per_thread = _FWD_BLOCK_ELEMS, _FWD_ELEMS_PER_THREAD
    block_m = max(1, min(target // block_n, _pow2(M)))
    # Powers of two throughout, so num_warps is one too; more than 16 warps is not allowed (wide rows then
    # hold more elements per thread: 16 at N = 8192 forward).
    num_warps = max(1, min(16, (block_m * block_n) // (32 * per_thread)))
    return block_m, num_warps


def _bwd_programs(row_blocks: int, col_blocks: int, device: torch.device, interp: bool) -> int:
    if interp:
        return max(1, min(row_blocks, _INTERPRET_BWD_PROGRAMS))
    return max(1, min(row_blocks, _sm_count(device) * _BWD_PROGRAMS_PER_SM // col_blocks))


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


# ----------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------
def _ln_fwd_triton(x2, r2, weight, bias, eps, s_dtype):
    M, N = x2.shape
    dev = x2.device
    y = torch.empty((M, N), dtype=x2.dtype, device=dev)
    s = torch.empty((M, N), dtype=s_dtype, device=dev) if r2 is not None else None
    mean = torch.empty(M, dtype=torch.float32, device=dev)
    rstd = torch.empty(M, dtype=torch.float32, device=dev)
    if M > 0:
        block_n = max(16, _pow2(N))
        block_m, warps = _row_blocks(M, block_n, _interpreting(_ln_fwd_kernel), backward=False)
        _ln_fwd_kernel[(triton.cdiv(M, block_m),)](
            x2, r2 if r2 is not None else x2, weight if weight is not None else x2, bias if bias is not None else x2,
            y, s if s is not None else y, mean, rstd, M, N,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), s.stride(0) if s is not None else 0,
            float(eps),
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_RES=r2 is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, num_warps=warps,
        )
    return y, s, mean, rstd


def _ln_bwd_triton(dy2, ds2, s2, weight, mean, rstd, x_dtype, r_dtype, need_dw, need_db):
    M, N = s2.shape
    dev = s2.device
    dx = torch.empty((M, N), dtype=x_dtype, device=dev)
    # Always a separate tensor for the residual's gradient, even in x's dtype: autograd may accumulate into
    # one input's gradient buffer in place, which must never alias the other input's gradient.
    dr = torch.empty((M, N), dtype=r_dtype, device=dev) if r_dtype is not None else None
    interp = _interpreting(_ln_bwd_kernel)
    block_n = max(16, _pow2(N))
    block_m, warps = _row_blocks(M, block_n, interp, backward=True)
    nprog = _bwd_programs(triton.cdiv(M, block_m), 1, dev, interp) if M > 0 else 0
    dw_part = torch.empty((nprog, N), dtype=torch.float32, device=dev) if need_dw else None
    db_part = torch.empty((nprog, N), dtype=torch.float32, device=dev) if need_db else None
    if M > 0:
        _ln_bwd_kernel[(nprog,)](
            dy2, ds2 if ds2 is not None else dy2, s2, weight if weight is not None else s2, mean, rstd,
            dx, dr if dr is not None else dx, dw_part if need_dw else mean, db_part if need_db else mean, M, N,
            dy2.stride(0), ds2.stride(0) if ds2 is not None else 0, s2.stride(0), dx.stride(0),
            dr.stride(0) if dr is not None else 0,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_DS=ds2 is not None, HAS_DR=dr is not None,
            HAS_W=weight is not None, HAS_DW=need_dw, HAS_DB=need_db, num_warps=warps,
        )
    # A (programs, N) fp32 buffer: one small deterministic sum over programs finishes dW/dB.
    dw = dw_part.sum(0) if need_dw else None
    db = db_part.sum(0) if need_db else None
    return dx, dr, dw, db


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        shape = x.shape
        x2 = _rows2d(x)
        r2 = _rows2d(residual) if residual is not None else None
        s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else None
        y, s, mean, rstd = _ln_fwd_triton(x2, r2, weight, bias, eps, s_dtype)
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
        dx, dr, dw, db = _ln_bwd_triton(_rows2d(dy), _rows2d(ds) if ds is not None else None, s2, weight, mean,
                                        rstd, x_dtype, r_dtype, need_dw, need_db)
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
    be = _resolve(backend, _ln_fwd_kernel if HAS_TRITON else None, tensors, fn, n, MAX_LN_WIDTH)
    if be == "torch":
        return _ln_torch(x, weight, bias, float(eps), residual)
    return _ln_apply(x, residual, weight, bias, float(eps))


# ----------------------------------------------------------------------------------------------------
# bias + GELU
# ----------------------------------------------------------------------------------------------------
def _gelu_blocks(M: int, N: int, interp: bool, backward: bool) -> tuple[int, int, int]:
    # The interpreter takes whole rows (fewest programs); the GPU splits wide rows into column blocks.
    block_n = max(16, _pow2(N)) if interp else max(16, min(_pow2(N), _GELU_BLOCK_N))
    block_m, warps = _row_blocks(M, block_n, interp, backward)
    return block_m, block_n, warps


class _BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approx_tanh):
        shape = x.shape
        x2 = _rows2d(x)
        M, N = x2.shape
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        if M > 0:
            block_m, block_n, warps = _gelu_blocks(M, N, _interpreting(_bias_gelu_fwd_kernel), backward=False)
            _bias_gelu_fwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
                x2, bias, y, M, N, x2.stride(0), y.stride(0),
                BLOCK_M=block_m, BLOCK_N=block_n, APPROX_TANH=approx_tanh, num_warps=warps,
            )
        ctx.save_for_backward(x2, bias)
        ctx.meta = (shape, approx_tanh)
        return y.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        shape, approx_tanh = ctx.meta
        M, N = x2.shape
        need_db = ctx.needs_input_grad[1]
        dy2 = _rows2d(dy)
        dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        interp = _interpreting(_bias_gelu_bwd_kernel)
        block_m, block_n, warps = _gelu_blocks(M, N, interp, backward=True)
        col_blocks = triton.cdiv(N, block_n)
        nprog = _bwd_programs(triton.cdiv(M, block_m), col_blocks, x2.device, interp) if M > 0 else 0
        db_part = torch.empty((nprog, N), dtype=torch.float32, device=x2.device) if need_db else None
        if M > 0:
            _bias_gelu_bwd_kernel[(nprog, col_blocks)](
                dy2, x2, bias, dx, db_part if need_db else dx, M, N, dy2.stride(0), x2.stride(0), dx.stride(0),
                BLOCK_M=block_m, BLOCK_N=block_n, APPROX_TANH=approx_tanh, HAS_DB=need_db, num_warps=warps,
            )
        db = db_part.sum(0).to(bias.dtype) if need_db else None
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
    be = _resolve(backend, _bias_gelu_fwd_kernel if HAS_TRITON else None, (x, bias), fn, x.shape[-1], None)
    if be == "torch":
        return F.gelu(x + bias, approximate=approximate).to(x.dtype)
    return _bias_gelu_apply(x, bias, approximate == "tanh")
