"""Memory-linear contrastive losses: CLIP InfoNCE and SigLIP, as Triton kernels and a chunked torch backend.

Neither backend ever holds the B×B logit matrix. Both work on a *block*: rows ``A`` (M, D) against
columns ``C`` (N, D) with logits ``x_ij = s·A_i·C_j + b`` and positives at ``j = i + off``. The
single-device loss is the square block (A = image, C = text, off = 0); a rank under torch.distributed
works on its own image rows against the gathered text (off = rank·local_batch), see ``losses.py``.

CLIP, with row / column log-sum-exps ``r_i = LSE_j x_ij``, ``c_j = LSE_i x_ij``::

    L  = (1/2B) [Σ_i (r_i − x_ii) + Σ_j (c_j − x_jj)]
    dL/dx_ij = α_i (P^row_ij − δ_ij) + γ_j (P^col_ij − δ_ij),  α = γ = 1/(2B)

SigLIP, with z_ij = +1 on positives and −1 elsewhere::

    L  = (1/B) Σ_ij softplus(−z_ij x_ij),      dL/dx_ij = −z_ij σ(−z_ij x_ij) / B

and for both dA = s·dX·C, dC = s·dXᵀ·A, ds = Σ dX_ij·(A_i·C_j), db = Σ dX_ij.

Triton pass structure (B×B×D GEMM-equivalents): one forward kernel computes the logit tiles once and
keeps the online row LSE plus per-row-block column partial LSEs (a (⌈M/128⌉, N) fp32 buffer, reduced
by a logsumexp; when that buffer would pass ``_COLPART_MAX_BYTES`` the column LSE is computed by a second,
transposed launch instead, keeping memory O(B·D)). The backward runs the same kernel in both
orientations: rows of A produce dA (recompute tile + dX·C) and rows of C produce dC (recompute tile +
dXᵀ·A): 1 + 2 + 2 = 5 passes (6 above the buffer limit) when one program covers all of D in its output
block (autotuned against splitting D, which recomputes the tile once per D chunk), no atomics,
deterministic. Accumulation is
fp32 throughout; fp32 inputs use IEEE fp32 dots (never silent TF32); fp16/bf16 go to tensor cores.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ._triton_utils import (
    DOT_HAS_INPUT_PRECISION,
    HAS_TRITON,
    autotune_limit,
    is_interpreted,
    require_triton,
    triton,
    triton_available_for,
)

if HAS_TRITON:
    import triton.language as tl


__all__ = ["clip_loss", "siglip_loss", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# torch backend: rows per chunk = max(1, _TORCH_CHUNK_ELEMS // N), so a chunk's fp32 logits take 64 MiB.
_TORCH_CHUNK_ELEMS = 1 << 24
# Triton forward: largest per-row-block column-partial buffer before switching to the transposed launch.
_COLPART_MAX_BYTES = 128 << 20
# Forward row block (fixed, not autotuned: the column-partial buffer is sized from it).
_FWD_BM = 128
# Fixed blocks used under TRITON_INTERPRET (no autotuning there); big tiles keep the interpreter fast.
# The interpreter has no register limit: one D chunk (BK = BDO = next_pow2(D)) means fewest tile ops.
_INTERP_BM = 256
_INTERP_BN = 256


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _fwd_kernel(a_ptr, c_ptr, scale_ptr, bias_ptr, row_out_ptr, colpart_ptr,
                    M, N, D, stride_a, stride_c, off, M_BKT, N_BKT,
                    LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_COL: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    IEEE: tl.constexpr, USE_IP: tl.constexpr):
        # LOSS 0 (CLIP): row_out = row LSE of x; colpart[pid, :] = LSE over this program's rows (WRITE_COL).
        # LOSS 1 (SigLIP): row_out = Σ_j softplus(−z_ij x_ij) per row.
        NEG: tl.constexpr = -1.0e30  # finite "minus infinity": no inf−inf NaNs in masked lanes
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < M
        pid_row0 = pid * BM
        scale = tl.load(scale_ptr).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr).to(tl.float32)
        else:
            bias = 0.0
        m = tl.full((BM,), NEG, dtype=tl.float32)
        l = tl.zeros((BM,), dtype=tl.float32)
        acc_loss = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            cmask = cols < N
            # logit tile A[rows]·C[cols]ᵀ in fp32, looping over D in BK chunks; C loaded already
            # transposed (BK, BN) through a column-major block pointer. Written inline (no nested jit
            # helpers, no tl.trans): both cost the interpreter dearly (numpy matmul on a transposed
            # view is ~1000x slower), and the compiled code is the same.
            # Block pointers: no per-element 64-bit address tensors (they cost the compiled kernel
            # registers and spills); out-of-range rows/cols/features read as zero.
            a_bp = tl.make_block_ptr(a_ptr, (M, D), (stride_a, 1), (pid_row0, 0), (BM, BK), (1, 0))
            ct_bp = tl.make_block_ptr(c_ptr, (D, N), (1, stride_c), (0, n0), (BK, BN), (0, 1))
            s = tl.zeros((BM, BN), dtype=tl.float32)
            for _k0 in range(0, D, BK):
                a = tl.load(a_bp, boundary_check=(0, 1), padding_option="zero")
                ct = tl.load(ct_bp, boundary_check=(0, 1), padding_option="zero")
                a_bp = tl.advance(a_bp, (0, BK))
                ct_bp = tl.advance(ct_bp, (BK, 0))
                if IEEE:  # fp32 operands multiplied in true fp32 (TF32 would cost ~3 digits of logits)
                    if USE_IP:
                        s = tl.dot(a, ct, s, input_precision="ieee")
                    else:
                        s = tl.dot(a, ct, s, allow_tf32=False)
                else:
                    s = tl.dot(a, ct, s)
            x = s * scale + bias
            if LOSS == 0:
                # base-2 online softmax statistics (exp2 is the cheap instruction)
                x2 = tl.where(cmask[None, :], x * 1.4426950408889634, NEG)
                m_new = tl.maximum(m, tl.max(x2, axis=1))
                l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(x2 - m_new[:, None]), axis=1)
                m = m_new
                if WRITE_COL:
                    xc = tl.where(rmask[:, None], x2, NEG)
                    cm = tl.max(xc, axis=0)
                    cs = tl.sum(tl.exp2(xc - cm[None, :]), axis=0)
                    tl.store(colpart_ptr + pid.to(tl.int64) * N + cols,
                             (cm + tl.log2(cs)) * 0.6931471805599453, mask=cmask)
            else:
                z = tl.where(cols[None, :] == rows[:, None] + off, 1.0, -1.0)
                t = -z * x
                # softplus(t) = max(t, 0) + log1p(exp(−|t|)); log1p via the (w − 1) correction trick
                u = tl.exp(-tl.abs(t))
                w = 1.0 + u
                lp = tl.log(w) - ((w - 1.0) - u) / w
                v = tl.maximum(t, 0.0) + lp
                v = tl.where(rmask[:, None] & cmask[None, :], v, 0.0)
                acc_loss += tl.sum(v, axis=1)
        if LOSS == 0:
            tl.store(row_out_ptr + rows, (m + tl.log2(l)) * 0.6931471805599453, mask=rmask)
        else:
            tl.store(row_out_ptr + rows, acc_loss, mask=rmask)

    @triton.jit
    def _bwd_kernel(a_ptr, c_ptr, scale_ptr, bias_ptr, lse_a_ptr, lse_c_ptr, coef_a_ptr, coef_c_ptr,
                    outmul_ptr, out_ptr, red_s_ptr, red_b_ptr,
                    M, N, D, stride_a, stride_c, stride_o, off, M_BKT, N_BKT,
                    LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BDO: tl.constexpr,
                    IEEE: tl.constexpr, USE_IP: tl.constexpr):
        # out[rows, dcols] = outmul · Σ_j E_ij C[j, dcols], E = normalised dL/dx (|E| ≲ 2, so that the
        # fp16/bf16 cast before the tensor-core dot keeps precision; the true scale lives in outmul).
        # REDUCE: red_s[i] = Σ_j E_ij (A_i·C_j), red_b[i] = Σ_j E_ij (for d scale / d bias).
        NEG: tl.constexpr = -1.0e30
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < M
        dcols = pid_d * BDO + tl.arange(0, BDO)
        dmask = dcols < D
        pid_row0 = pid_m * BM
        scale = tl.load(scale_ptr).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr).to(tl.float32)
        else:
            bias = 0.0
        if LOSS == 0:
            lse_a = tl.load(lse_a_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
            ca = tl.load(coef_a_ptr + rows, mask=rmask, other=0.0)
        acc = tl.zeros((BM, BDO), dtype=tl.float32)
        red_s = tl.zeros((BM,), dtype=tl.float32)
        red_b = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            cmask = cols < N
            valid = rmask[:, None] & cmask[None, :]
            diag = (cols[None, :] == rows[:, None] + off) & valid
            # logit tile A[rows]·C[cols]ᵀ in fp32, looping over D in BK chunks; C loaded already
            # transposed (BK, BN) through a column-major block pointer. Written inline (no nested jit
            # helpers, no tl.trans): both cost the interpreter dearly (numpy matmul on a transposed
            # view is ~1000x slower), and the compiled code is the same.
            # Block pointers: no per-element 64-bit address tensors (they cost the compiled kernel
            # registers and spills); out-of-range rows/cols/features read as zero.
            a_bp = tl.make_block_ptr(a_ptr, (M, D), (stride_a, 1), (pid_row0, 0), (BM, BK), (1, 0))
            ct_bp = tl.make_block_ptr(c_ptr, (D, N), (1, stride_c), (0, n0), (BK, BN), (0, 1))
            s = tl.zeros((BM, BN), dtype=tl.float32)
            for _k0 in range(0, D, BK):
                a = tl.load(a_bp, boundary_check=(0, 1), padding_option="zero")
                ct = tl.load(ct_bp, boundary_check=(0, 1), padding_option="zero")
                a_bp = tl.advance(a_bp, (0, BK))
                ct_bp = tl.advance(ct_bp, (BK, 0))
                if IEEE:  # fp32 operands multiplied in true fp32 (TF32 would cost ~3 digits of logits)
                    if USE_IP:
                        s = tl.dot(a, ct, s, input_precision="ieee")
                    else:
                        s = tl.dot(a, ct, s, allow_tf32=False)
                else:
                    s = tl.dot(a, ct, s)
            x = s * scale + bias
            if LOSS == 0:
                lse_c = tl.load(lse_c_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
                cc = tl.load(coef_c_ptr + cols, mask=cmask, other=0.0)
                x2 = x * 1.4426950408889634
                pa = tl.exp2(tl.where(valid, x2 - lse_a[:, None], NEG))
                pc = tl.exp2(tl.where(valid, x2 - lse_c[None, :], NEG))
                e = ca[:, None] * pa + cc[None, :] * pc - tl.where(diag, ca[:, None] + cc[None, :], 0.0)
            else:
                z = tl.where(diag, 1.0, -1.0)
                t = -z * x
                u = tl.exp(-tl.abs(t))
                sig = tl.where(t >= 0, 1.0 / (1.0 + u), u / (1.0 + u))  # σ(t), overflow-free
                e = tl.where(valid, -z * sig, 0.0)
            if REDUCE:
                red_s += tl.sum(e * s, axis=1)
                red_b += tl.sum(e, axis=1)
            c_bp = tl.make_block_ptr(c_ptr, (N, D), (stride_c, 1), (n0, pid_d * BDO), (BN, BDO), (1, 0))
            cblk = tl.load(c_bp, boundary_check=(0, 1), padding_option="zero")
            if IEEE:
                if USE_IP:
                    acc = tl.dot(e, cblk, acc, input_precision="ieee")
                else:
                    acc = tl.dot(e, cblk, acc, allow_tf32=False)
            else:
                acc = tl.dot(e.to(cblk.dtype), cblk, acc)
        om = tl.load(outmul_ptr).to(tl.float32)
        # 64-bit row offsets: B·D passes 2^31 at B = 2M, D = 1024
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + dcols[None, :],
                 (acc * om).to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        if REDUCE:
            first = pid_d == 0
            tl.store(red_s_ptr + rows, red_s, mask=rmask & first)
            tl.store(red_b_ptr + rows, red_b, mask=rmask & first)

    def _prune_fwd(configs, named_args, **kwargs):
        d = _next_pow2(named_args["D"])
        kept = [c for c in configs if c.kwargs["BK"] <= max(16, d)]
        return autotune_limit(kept or configs[:1])

    def _prune_bwd(configs, named_args, **kwargs):
        d = _next_pow2(named_args["D"])
        kept = [c for c in configs if c.kwargs["BK"] <= max(16, d) and c.kwargs["BDO"] <= max(32, d)]
        return autotune_limit(kept or configs[:1])

    # Config lists pruned with ptxas (sm_90, Triton 3.8, bf16): configs that spilled registers are out
    # (4 warps only survive on the smallest tiles). BM of the forward is fixed (_FWD_BM).
    def _fwd_configs():
        out = []
        for bn, bk, warps, stages in ((64, 32, 4, 3), (64, 32, 8, 3), (64, 32, 8, 4), (64, 64, 4, 3),
                                      (64, 64, 8, 3), (64, 64, 8, 4), (128, 32, 8, 3), (128, 32, 8, 4),
                                      (128, 64, 8, 3), (128, 64, 8, 4)):
            out.append(triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages))
        return out

    def _bwd_configs():
        # BDO = 512 (whole D for D <= 512): the logit tile is recomputed once per orientation (4
        # backward passes in all) instead of once per D chunk, at the price of a large accumulator
        # (small BM/BN keep it in registers); the autotuner weighs that against the recompute.
        out = []
        for bk in (32, 64):
            for bm, bn, bdo, warps, stages in ((64, 64, 64, 4, 2), (64, 64, 128, 4, 2), (64, 64, 64, 8, 3),
                                               (64, 64, 128, 8, 3), (64, 64, 256, 8, 3), (128, 64, 64, 8, 3),
                                               (128, 64, 128, 8, 3), (64, 128, 64, 8, 3), (64, 128, 128, 8, 3),
                                               (32, 64, 512, 8, 2), (64, 32, 512, 8, 2)):
                out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "BDO": bdo}, num_warps=warps,
                                         num_stages=stages))
        return out

    if is_interpreted(_fwd_kernel):
        _fwd_tuned = None
        _bwd_tuned = None
    else:  # autotuning runs the kernels on a GPU; both kernels are idempotent (no atomics), so safe
        _fwd_tuned = triton.autotune(_fwd_configs(), key=["M_BKT", "N_BKT", "D"],
                                     prune_configs_by={"early_config_prune": _prune_fwd})(_fwd_kernel)
        _bwd_tuned = triton.autotune(_bwd_configs(), key=["M_BKT", "N_BKT", "D"],
                                     prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_kernel)
else:  # pragma: no cover - exercised only where triton is missing
    _fwd_kernel = None
    _bwd_kernel = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _bucket(n: int) -> int:
    # Autotune key: next power of two, capped, so a new batch size only re-tunes across octaves.
    return min(1 << max(0, n - 1).bit_length(), 1 << 16)


@contextlib.contextmanager
def _quiet_block_ptr():
    # Block pointers are deprecated in the newest Triton in favour of TMA tensor descriptors (which need
    # 16-byte aligned strides and a device allocator); they work on every version we support (3.6+)
    # and keep the kernels free of per-element address registers. Silence just that message, at the
    # launches (compile time, or every launch under the interpreter).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)
        yield


def _scalar_ptr(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return torch.zeros(1, dtype=torch.float32, device=like.device)
    return t.detach().reshape(1).to(device=like.device, dtype=torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------------
# Block primitives, triton implementation
# ----------------------------------------------------------------------------------------------------
def _tri_forward(A, C, scale, bias, off, loss, need_col):
    """Triton forward on a block: CLIP → (row_lse (M,), col_lse (N,) or None); SigLIP → (row_sum (M,), None)."""
    M, D = A.shape
    N = C.shape[0]
    A = A.contiguous()
    C = C.contiguous()
    sp = _scalar_ptr(scale, A)
    bp = _scalar_ptr(bias, A)
    ieee = A.dtype == torch.float32
    row = torch.empty(M, dtype=torch.float32, device=A.device)
    bm = _FWD_BM if _fwd_tuned is not None else _INTERP_BM
    n_rb = triton.cdiv(M, bm)
    single_pass = loss == 0 and need_col and n_rb * N * 4 <= _COLPART_MAX_BYTES
    colpart = torch.empty((n_rb, N) if single_pass else (1,), dtype=torch.float32, device=A.device)

    def launch(a, c, out, cp, m, n, o, write_col):
        args = (a, c, sp, bp, out, cp, m, n, D, a.stride(0), c.stride(0), o, _bucket(m), _bucket(n))
        meta = dict(LOSS=loss, HAS_BIAS=bias is not None, WRITE_COL=write_col, BM=bm, IEEE=ieee,
                    USE_IP=DOT_HAS_INPUT_PRECISION)
        grid = (triton.cdiv(m, bm),)
        with _quiet_block_ptr():
            if _fwd_tuned is None:
                kb = min(1024, max(16, _next_pow2(D)))
                _fwd_kernel[grid](*args, **meta, BN=_INTERP_BN, BK=kb)
            else:
                _fwd_tuned[grid](*args, **meta)

    launch(A, C, row, colpart, M, N, off, single_pass)
    col = None
    if loss == 0 and need_col:
        if single_pass:
            col = torch.logsumexp(colpart, dim=0)
        else:  # transposed launch: the rows of C give the column LSEs, O(N) memory
            col = torch.empty(N, dtype=torch.float32, device=A.device)
            launch(C, A, col, colpart, N, M, -off, False)
    return row, col


def _tri_backward_one(A, C, scale, bias, off, loss, lse_a, lse_c, coef_a, coef_c, outmul, out_dtype, reduce):
    M, D = A.shape
    N = C.shape[0]
    out = torch.empty((M, D), dtype=out_dtype, device=A.device)
    red_s = torch.empty(M if reduce else 1, dtype=torch.float32, device=A.device)
    red_b = torch.empty(M if reduce else 1, dtype=torch.float32, device=A.device)
    dummy = red_s
    args = (A, C, _scalar_ptr(scale, A), _scalar_ptr(bias, A),
            lse_a if lse_a is not None else dummy, lse_c if lse_c is not None else dummy,
            coef_a if coef_a is not None else dummy, coef_c if coef_c is not None else dummy,
            outmul, out, red_s, red_b, M, N, D, A.stride(0), C.stride(0), out.stride(0), off,
            _bucket(M), _bucket(N))
    meta = dict(LOSS=loss, HAS_BIAS=bias is not None, REDUCE=reduce, IEEE=A.dtype == torch.float32,
                USE_IP=DOT_HAS_INPUT_PRECISION)
    with _quiet_block_ptr():
        if _bwd_tuned is None:
            kb = min(1024, max(16, _next_pow2(D)))
            grid = (triton.cdiv(M, _INTERP_BM), triton.cdiv(D, kb))
            _bwd_kernel[grid](*args, **meta, BM=_INTERP_BM, BN=_INTERP_BN, BK=kb, BDO=kb)
        else:
            grid = lambda META: (triton.cdiv(M, META["BM"]), triton.cdiv(D, META["BDO"]))  # noqa: E731
            _bwd_tuned[grid](*args, **meta)
    return out, (red_s.sum() if reduce else None), (red_b.sum() if reduce else None)


def _tri_backward(A, C, scale, bias, off, loss, row_lse, col_lse, row_coef, col_coef, sig_coef, out_dtype):
    """Triton backward on a block → (dA (M,D), dC (N,D), d scale (), d bias ()) in fp32 scalars."""
    A = A.contiguous()
    C = C.contiguous()
    s = scale.detach().reshape(()).float()
    if loss == 0:
        # Normalise the coefficients so E is O(1) before any fp16/bf16 cast; κ goes into outmul.
        kappa = torch.maximum(row_coef.abs().max(), col_coef.abs().max())
        kappa = torch.where(kappa > 0, kappa, torch.ones_like(kappa))
        ra, ca = (row_coef / kappa).contiguous(), (col_coef / kappa).contiguous()
    else:
        kappa = sig_coef.detach().reshape(()).float()
        ra = ca = None
    outmul = (s * kappa).reshape(1).contiguous()
    dA, red_s, red_b = _tri_backward_one(A, C, scale, bias, off, loss, row_lse, col_lse, ra, ca, outmul,
                                         out_dtype, True)
    dC, _, _ = _tri_backward_one(C, A, scale, bias, -off, loss, col_lse, row_lse, ca, ra, outmul,
                                 out_dtype, False)
    return dA, dC, red_s * kappa, red_b * kappa


# ----------------------------------------------------------------------------------------------------
# Block primitives, chunked torch implementation (O(chunk·N) memory, recompute in backward)
# ----------------------------------------------------------------------------------------------------
def _chunk_rows(N: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMS // max(1, N))


def _diag_index(r0: int, r1: int, off: int, N: int, device):
    """(local row idx, col idx) of the positives j = i + off that fall in rows [r0, r1) and cols [0, N)."""
    lo = max(r0, -off)
    hi = min(r1, N - off)
    if hi <= lo:
        return None
    i = torch.arange(lo, hi, device=device)
    return i - r0, i + off


def _torch_forward(A, C, scale, bias, off, loss, need_col):
    M = A.shape[0]
    N = C.shape[0]
    s = scale.detach().reshape(()).float()
    b = bias.detach().reshape(()).float() if bias is not None else None
    Cf = C.float()
    row = torch.empty(M, dtype=torch.float32, device=A.device)
    col = torch.full((N,), float("-inf"), device=A.device) if (loss == 0 and need_col) else None
    step = _chunk_rows(N)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        x = A[r0:r1].float() @ Cf.T
        x.mul_(s)
        if b is not None:
            x.add_(b)
        if loss == 0:
            row[r0:r1] = torch.logsumexp(x, dim=1)
            if col is not None:
                col = torch.logaddexp(col, torch.logsumexp(x, dim=0))
        else:
            di = _diag_index(r0, r1, off, N, A.device)
            if di is not None:
                x[di] = -x[di]  # softplus(−z·x): positives use −x, negatives +x
            row[r0:r1] = torch.nn.functional.softplus(x).sum(dim=1)
        del x
    return row, col


def _torch_backward(A, C, scale, bias, off, loss, row_lse, col_lse, row_coef, col_coef, sig_coef, out_dtype):
    M, D = A.shape
    N = C.shape[0]
    s = scale.detach().reshape(()).float()
    b = bias.detach().reshape(()).float() if bias is not None else None
    Cf = C.float()
    dA = torch.empty((M, D), dtype=out_dtype, device=A.device)
    dC = torch.zeros((N, D), dtype=torch.float32, device=A.device)
    ds = torch.zeros((), dtype=torch.float32, device=A.device)
    db = torch.zeros((), dtype=torch.float32, device=A.device)
    step = _chunk_rows(N)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        Af = A[r0:r1].float()
        raw = Af @ Cf.T
        x = raw * s
        if b is not None:
            x.add_(b)
        di = _diag_index(r0, r1, off, N, A.device)
        if loss == 0:
            rc = row_coef[r0:r1]
            e = (x - row_lse[r0:r1, None]).exp_().mul_(rc[:, None])
            x.sub_(col_lse[None, :]).exp_().mul_(col_coef[None, :]).add_(e)
            del e
            if di is not None:
                x[di] -= rc[di[0]] + col_coef[di[1]]
        else:
            # dL/dx = −z σ(−z x): negatives σ(x), positives −σ(−x)
            if di is not None:
                x[di] = -x[di]
            x.sigmoid_()
            if di is not None:
                x[di] = -x[di]
            x.mul_(sig_coef.reshape(()).float())
        ds += torch.dot(x.view(-1), raw.view(-1))
        db += x.sum()
        del raw
        dA[r0:r1] = (x @ Cf).mul_(s).to(out_dtype)
        dC.addmm_(x.T, Af)
        del x, Af
    dC.mul_(s)
    return dA, dC.to(out_dtype), ds, db


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------
def _resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        require_triton(_fwd_kernel, *tensors, what="contrastive loss backend='triton'")
        return "triton"
    # auto: Triton on CUDA (compiled, not interpreted), torch otherwise
    if all(t.device.type == "cuda" for t in tensors) and HAS_TRITON and not is_interpreted(_fwd_kernel):
        ok, _ = triton_available_for(_fwd_kernel, *tensors)
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
        return _positives(A, C, scale, bias, off)


def _positives(A, C, scale, bias, off):
    M, D = A.shape
    x = torch.empty(M, dtype=torch.float32, device=A.device)
    step = max(1, (1 << 22) // D)  # row chunks: fp32 temporaries stay at ~16 MB whatever B is
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        x[r0:r1] = (A[r0:r1].float() * C[off + r0:off + r1].float()).sum(dim=1)
    x = x * scale.detach().reshape(()).float()
    if bias is not None:
        x = x + bias.detach().reshape(()).float()
    return x


def check_features(image_features, text_features, name="clip_loss"):
    """Validate (B, D) feature pairs; return them cast to one common float dtype."""
    for nm, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {nm} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {nm} must be 2-D (B, D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: {nm} dtype must be float32/float16/bfloat16, got {t.dtype}")
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
        row, col = block_forward(img, txt, scale, bias, 0, 0, True, backend)
        pos = positives(img, txt, scale, bias, 0)
        loss = (row.sum() + col.sum() - 2.0 * pos.sum()) / (2.0 * B)
        _save_inputs(ctx, img, txt, scale, bias, row, col)
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias, row, col = _saved_inputs(ctx)
        B = img.shape[0]
        coef = (g.detach().float().reshape(1) / (2.0 * B)).expand(B).contiguous()
        dI, dT, ds, db = block_backward(img, txt, scale, bias, 0, 0, row, col, coef, coef, None, img.dtype,
                                        ctx.backend)
        return (dI if ctx.needs_input_grad[0] else None, dT if ctx.needs_input_grad[1] else None,
                *_scale_bias_grads(ctx, ds, db, scale, bias), None)


class _SigLipLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, backend):
        B = img.shape[0]
        row, _ = block_forward(img, txt, scale, bias, 0, 1, False, backend)
        _save_inputs(ctx, img, txt, scale, bias)
        ctx.backend = backend
        return row.sum() / B

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias = _saved_inputs(ctx)
        B = img.shape[0]
        coef = g.detach().float().reshape(()) / B
        dI, dT, ds, db = block_backward(img, txt, scale, bias, 0, 1, None, None, None, None, coef, img.dtype,
                                        ctx.backend)
        return (dI if ctx.needs_input_grad[0] else None, dT if ctx.needs_input_grad[1] else None,
                *_scale_bias_grads(ctx, ds, db, scale, bias), None)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, backend="auto"):
    """Symmetric CLIP InfoNCE loss (fp32 scalar) of (B, D) fp32/fp16/bf16 features, never forming B×B.

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

    (B, D) fp32/fp16/bf16 features; ``logit_bias`` may be None (no bias). Same backends as ``clip_loss``.
    """
    img, txt = check_features(image_features, text_features, "siglip_loss")
    scale = as_scalar_tensor(logit_scale, img, "logit_scale")
    bias = as_scalar_tensor(logit_bias, img, "logit_bias")
    be = _resolve_backend(backend, img, txt)
    return _SigLipLossFn.apply(img, txt, scale, bias, be)
