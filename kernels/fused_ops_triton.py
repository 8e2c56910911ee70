"""Triton kernels of the fused ops (LayerNorm with an optional residual add, bias + GELU), their launch shapes and
launchers. ``bmclip.kernels.fused_ops`` holds the dispatch, the autograd Functions and the torch path.

Statistics and arithmetic are fp32 whatever the storage dtype; LayerNorm takes them of each row shifted by its
first element, so a constant row normalises to exactly 0 (y = bias) and a row whose mean dwarfs its spread keeps
its digits, even at eps = 1e-12. Weight/bias are read at unit stride (the launchers make them contiguous).
Exact GELU uses ``tl.math.erf`` (libdevice's ``erff`` on the GPU, ``math.erf`` under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, is_interpreted, triton

if HAS_TRITON:
    import triton.language as tl

__all__ = ["MAX_LN_WIDTH", "bias_gelu_backward", "bias_gelu_forward", "ln_backward", "ln_forward"]

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


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _ln_pivot(X, R, S, rows, row_ok, stride_x, stride_r, HAS_RES: tl.constexpr):
        # Each row's first element as the forward reads it (with a residual: x + r rounded to S's dtype, as
        # the row itself), in fp32; 0 for rows past M.
        r64 = rows.to(tl.int64)
        p = tl.load(X + r64 * stride_x, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_RES:
            p = (p + tl.load(R + r64 * stride_r, mask=row_ok, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
            p = p.to(tl.float32)
        return p

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
        # Statistics of the row shifted by its first element p (the pivot): a constant row gives d = 0, hence
        # mean_d = 0 and xc = 0 exactly (y = bias, as torch), where sum(x) / N is off c by an ulp that rstd
        # (1e6 at eps = 1e-12) would amplify; rows with |mean| >> std keep their digits the same way. MEAN
        # holds mean_d, the mean relative to p: the backward reloads p and repeats this arithmetic exactly.
        p = _ln_pivot(X, R, S, rows, row_ok, stride_x, stride_r, HAS_RES)
        d = tl.where(mask, x - p[:, None], 0.0)
        mean = tl.sum(d, axis=1) / N
        # Two-pass variance on the row held in registers (no E[x^2] - E[x]^2 cancellation).
        xc = tl.where(mask, d - mean[:, None], 0.0)
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
            # xhat exactly as the forward had it: (x - p) - mean, p the row's first element (see the forward).
            p = tl.load(S + r64 * stride_s, mask=row_ok[:, None], other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, ((x - p) - mean[:, None]) * rstd[:, None], 0.0)
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


# ----------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------
def _unit(t):
    """A (N,) parameter with unit stride (the kernels read it at ``W + cols``), or None."""
    return t.contiguous() if t is not None else None


def ln_forward(x2, r2, weight, bias, eps, s_dtype):
    """(y, s or None, mean, rstd) of rows x2 (M, N) (+ r2), s rounded to ``s_dtype``.

    ``mean`` is each row's mean relative to its first element (that of s with a residual): what
    ``ln_backward`` expects, so that it recomputes the forward's normalised row bit for bit.
    x2/r2 need a unit column stride (any row stride); weight/bias may be strided (N,) views.
    """
    weight, bias = _unit(weight), _unit(bias)
    M, N = x2.shape
    dev = x2.device
    y = torch.empty((M, N), dtype=x2.dtype, device=dev)
    s = torch.empty((M, N), dtype=s_dtype, device=dev) if r2 is not None else None
    mean = torch.empty(M, dtype=torch.float32, device=dev)
    rstd = torch.empty(M, dtype=torch.float32, device=dev)
    if M > 0:
        block_n = max(16, _pow2(N))
        block_m, warps = _row_blocks(M, block_n, is_interpreted(_ln_fwd_kernel), backward=False)
        _ln_fwd_kernel[(triton.cdiv(M, block_m),)](
            x2, r2 if r2 is not None else x2, weight if weight is not None else x2, bias if bias is not None else x2,
            y, s if s is not None else y, mean, rstd, M, N,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), s.stride(0) if s is not None else 0,
            float(eps),
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_RES=r2 is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, num_warps=warps,
        )
    return y, s, mean, rstd


def ln_backward(dy2, ds2, s2, weight, mean, rstd, x_dtype, r_dtype, need_dw, need_db):
    """(dx, dr or None, dw or None, db or None) of the LayerNorm of rows s2 (fp32 dW/dB); mean, rstd: from
    ``ln_forward`` of the same rows."""
    weight = _unit(weight)
    M, N = s2.shape
    dev = s2.device
    dx = torch.empty((M, N), dtype=x_dtype, device=dev)
    # Always a separate tensor for the residual's gradient, even in x's dtype: autograd may accumulate into
    # one input's gradient buffer in place, which must never alias the other input's gradient.
    dr = torch.empty((M, N), dtype=r_dtype, device=dev) if r_dtype is not None else None
    interp = is_interpreted(_ln_bwd_kernel)
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


# ----------------------------------------------------------------------------------------------------
# bias + GELU
# ----------------------------------------------------------------------------------------------------
def _gelu_blocks(M: int, N: int, interp: bool, backward: bool) -> tuple[int, int, int]:
    # The interpreter takes whole rows (fewest programs); the GPU splits wide rows into column blocks.
    block_n = max(16, _pow2(N)) if interp else max(16, min(_pow2(N), _GELU_BLOCK_N))
    block_m, warps = _row_blocks(M, block_n, interp, backward)
    return block_m, block_n, warps


def bias_gelu_forward(x2, bias, approx_tanh: bool):
    """GELU(x2 + bias) of rows x2 (M, N) in x2's dtype."""
    bias = _unit(bias)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M > 0:
        block_m, block_n, warps = _gelu_blocks(M, N, is_interpreted(_bias_gelu_fwd_kernel), backward=False)
        _bias_gelu_fwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            x2, bias, y, M, N, x2.stride(0), y.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, APPROX_TANH=approx_tanh, num_warps=warps,
        )
    return y


def bias_gelu_backward(dy2, x2, bias, approx_tanh: bool, need_db: bool):
    """(dx, db in bias's dtype or None) of GELU(x2 + bias) for the upstream gradient rows dy2."""
    bias = _unit(bias)
    M, N = x2.shape
    dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    interp = is_interpreted(_bias_gelu_bwd_kernel)
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
    return dx, db
