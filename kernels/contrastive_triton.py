"""Triton kernels of the contrastive losses: forward statistics, backward products, configs, launchers, work model.

A *block* is rows ``A`` (M, D) against columns ``C`` (N, D), logits ``x_ij = s·A_i·C_j + b``, positives at
``j = i + off`` (see ``contrastive.py`` for the math). Two kernels:

``_fwd_kernel``  one program per BM rows sweeps all N columns once: CLIP keeps the online row LSE and writes
                 one partial column LSE per row block (a (⌈M/BM⌉, N) fp32 buffer reduced by a logsumexp);
                 SigLIP sums softplus(−z·x) per row. Above ``_COLPART_MAX_BYTES`` of partials the column
                 LSEs come from a second, transposed launch instead (memory stays O(B·D)).
``_bwd_kernel``  one program per (BM rows, D chunk) sweeps all N columns once, recomputes the logit tile,
                 forms E = dL/dx (normalised) and accumulates out[rows, chunk] += E·C[:, chunk]. It runs in
                 both orientations (A = image → d image, A = text → d text); the first also reduces the
                 d scale / d bias sums. No atomics: deterministic.

Features are split into D chunks of width KC = BD0 + BD1 (two power-of-two pieces, so D = 768 is 512 + 256
without padding; the backward's chunks are at most 512 wide, 256 when D needs several, see the configs).
With one chunk (``RESIDENT``) a program loads its BM×D rows of A once, before the N loop, and each BN×D
tile of C, loaded once per (pipelined) N step, feeds both the logits (A·Cᵀ) and the product E·C: the
forward is 1 GEMM-equivalent pass over B×B×D and each backward orientation 2 (recompute + product), 5 in
all (D ≤ 512 backward, D ≤ 768 forward). With S > 1 chunks the backward grid has S programs per row
block, each recomputing the logits over all of D: S + 1 passes per orientation (D = 768: 3 chunks, 9 in
all). ``loss_work`` states this from the same geometry functions the
launchers use to size their grids.

Accumulation is fp32 throughout. fp16/bf16 operands go to tensor cores (wgmma on sm_90); fp32 operands use
IEEE fp32 dots (never silent TF32) with one fixed small config (fp32 is the exactness path, never autotuned).
Addresses are 64-bit (row index × stride), so B·D may pass 2^31.
"""

from __future__ import annotations

import math

import torch

from ._triton_utils import DOT_HAS_INPUT_PRECISION, HAS_TRITON, autotune_limit, is_interpreted, triton
from .contrastive_torch import CLIP, SIGLIP

if HAS_TRITON:
    import triton.language as tl

__all__ = ["loss_work", "fwd_configs", "bwd_configs", "chunk_plan"]

# Largest per-row-block column-partial buffer before the forward switches to the transposed second launch.
# 256 MiB keeps B = 65536 (1024 row blocks of 64) in one forward pass.
_COLPART_MAX_BYTES = 256 << 20
# Forward row block (fixed, not autotuned: the column-partial buffer is sized from it). 64 = one wgmma M.
_FWD_BM = 64
# Widest D chunk one program holds, by operand width (16-bit: tensor cores; the dA accumulator of BM × KC fp32
# must fit the register file without spills: 64 × 512 fp32 over 8 warps = 128 registers a thread).
_MAXW_FWD = 768
_MAXW_BWD = 512
_MAXW_BWD_SPLIT = 256  # when D needs several chunks: narrower ones (less register pressure in the K loop)


def _triton_version() -> tuple[int, int]:
    if not HAS_TRITON:
        return (0, 0)
    parts = triton.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


# The one-chunk (resident, 5-pass) backward at D ≤ 512 compiles spill-free on Triton 3.6-3.8, but Triton 3.9's
# register allocation spills 8-120 B a thread in every one of its configs (ptxas, sm_90, the CI compile-facts
# check). There the backward takes chunks of 256 instead: spill-free, 1 + 2 × 3 = 7 passes at D = 512.
_RESIDENT_BWD = _triton_version() < (3, 9)
_MAXW_FP32 = 128
# The fixed fp32 config (CUDA): small tiles, IEEE dots on CUDA cores.
_FP32_BLOCK = dict(BM=32, BN=32, num_warps=4, num_stages=2)
# Under TRITON_INTERPRET (no autotuning, no register limit): big tiles and one chunk mean fewest tile ops.
_INTERP_BLOCK = dict(BM=256, BN=256, num_warps=4, num_stages=1)
_INTERP_MAXW = 1024


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _bucket(n: int) -> int:
    # Autotune key: next power of two, capped at 64k, so a new batch size only re-tunes across octaves.
    return min(1 << max(0, n - 1).bit_length(), 1 << 16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chunk_plan(D: int, maxw: int) -> tuple[int, int]:
    """(BD0, BD1): the two power-of-two pieces of one D chunk (BD1 may be 0), the fewest chunks of width ≤ maxw.

    The chunk width KC = BD0 + BD1 ≥ ⌈D / S⌉ with S = ⌈D / maxw⌉ chunks; e.g. 768 → (512, 256) when one chunk
    may be 768 wide, (256, 128) when it may be 512 (two chunks of 384).
    """
    s = _cdiv(D, maxw)
    w = max(16, _cdiv(D, s))
    bd0 = 1 << (w.bit_length() - 1)
    r = w - bd0
    bd1 = 0 if r <= 0 else max(16, _next_pow2(r))
    return bd0, bd1


def _maxw(kind: str, D: int, ieee: bool, interpreted: bool) -> int:
    if interpreted:
        return _INTERP_MAXW
    if ieee:
        return _MAXW_FP32
    if kind == "fwd":
        return _MAXW_FWD
    return _MAXW_BWD if (D <= _MAXW_BWD and _RESIDENT_BWD) else _MAXW_BWD_SPLIT


def fwd_geometry(M: int, N: int, D: int, BM: int, BN: int, BD0: int, BD1: int) -> dict:
    """Launch grid and per-program loop trips of ``_fwd_kernel`` (the loops are range(0, N, BN), range(0, D, KC))."""
    kc = BD0 + BD1
    return dict(grid=(_cdiv(M, BM),), n_trips=len(range(0, N, BN)), k_trips=len(range(0, D, kc)), KC=kc,
                resident=len(range(0, D, kc)) == 1)


def bwd_geometry(M: int, N: int, D: int, BM: int, BN: int, BD0: int, BD1: int) -> dict:
    """Launch grid and per-program loop trips of ``_bwd_kernel`` (one program per (row block, D chunk))."""
    kc = BD0 + BD1
    return dict(grid=(_cdiv(M, BM), _cdiv(D, kc)), n_trips=len(range(0, N, BN)), k_trips=len(range(0, D, kc)),
                KC=kc, resident=len(range(0, D, kc)) == 1)


def _launch_work(kind: str, geo: dict, BM: int, BN: int, elem: int) -> tuple[float, float]:
    """(tensor-op flops, operand bytes read) of one launch with geometry ``geo`` (padded tiles, as executed)."""
    progs = math.prod(geo["grid"])
    kc, nt, kt = geo["KC"], geo["n_trips"], geo["k_trips"]
    tile = 2.0 * BM * BN * kc  # one BM×BN×KC multiply-add tile
    flops = progs * nt * kt * tile  # the logit tile, over all of D, once per N step
    if geo["resident"]:
        loads = progs * (BM * kc + nt * BN * kc)  # A once; each C tile once (logits and product share it)
    else:
        loads = progs * nt * kt * (BM + BN) * kc
    if kind == "bwd":
        flops += progs * nt * tile  # E·C[:, chunk]
        if not geo["resident"]:
            loads += progs * nt * BN * kc  # the product's C chunk
    return flops, float(loads * elem)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _mm(a, b, acc, IEEE: tl.constexpr, USE_IP: tl.constexpr):
        # acc + a·b in fp32; fp32 operands multiplied in true fp32 (TF32 would cost ~3 digits of logits)
        if IEEE:
            if USE_IP:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, allow_tf32=False)
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _fwd_kernel(a_ptr, c_ptr, scale_ptr, bias_ptr, row_out_ptr, colpart_ptr,
                    M, N, D, stride_a, stride_c, off, M_BKT, N_BKT,
                    LOSS: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_COL: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
                    RESIDENT: tl.constexpr, IEEE: tl.constexpr, USE_IP: tl.constexpr):
        # LOSS CLIP: row_out = row LSE of x; colpart[pid, :] = LSE over this program's rows (WRITE_COL).
        # LOSS SIGLIP: row_out = Σ_j softplus(−z_ij x_ij) per row.
        NEG: tl.constexpr = -1.0e30  # finite "minus infinity": no inf−inf NaNs in masked lanes
        KC: tl.constexpr = BD0 + BD1
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < M
        a_row = a_ptr + rows.to(tl.int64)[:, None] * stride_a
        k0 = tl.arange(0, BD0)
        scale = tl.load(scale_ptr).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr).to(tl.float32)
        else:
            bias = 0.0
        if RESIDENT:  # the row block of A stays on chip for the whole sweep
            a0 = tl.load(a_row + k0[None, :], mask=rmask[:, None] & (k0 < D)[None, :], other=0.0)
            if BD1 > 0:
                k1 = BD0 + tl.arange(0, BD1)
                a1 = tl.load(a_row + k1[None, :], mask=rmask[:, None] & (k1 < D)[None, :], other=0.0)
        m = tl.full((BM,), NEG, dtype=tl.float32)
        l = tl.zeros((BM,), dtype=tl.float32)
        acc_loss = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            cmask = cols < N
            c_row = c_ptr + cols.to(tl.int64)[:, None] * stride_c
            s = tl.zeros((BM, BN), dtype=tl.float32)
            if RESIDENT:
                c0 = tl.load(c_row + k0[None, :], mask=cmask[:, None] & (k0 < D)[None, :], other=0.0)
                s = _mm(a0, tl.trans(c0), s, IEEE, USE_IP)
                if BD1 > 0:
                    c1 = tl.load(c_row + k1[None, :], mask=cmask[:, None] & (k1 < D)[None, :], other=0.0)
                    s = _mm(a1, tl.trans(c1), s, IEEE, USE_IP)
            else:
                for kc in range(0, D, KC):
                    ka = kc + k0
                    km = (ka < D)[None, :]
                    a0 = tl.load(a_row + ka[None, :], mask=rmask[:, None] & km, other=0.0)
                    c0 = tl.load(c_row + ka[None, :], mask=cmask[:, None] & km, other=0.0)
                    s = _mm(a0, tl.trans(c0), s, IEEE, USE_IP)
                    if BD1 > 0:
                        kb = kc + BD0 + tl.arange(0, BD1)
                        kbm = (kb < D)[None, :]
                        a1 = tl.load(a_row + kb[None, :], mask=rmask[:, None] & kbm, other=0.0)
                        c1 = tl.load(c_row + kb[None, :], mask=cmask[:, None] & kbm, other=0.0)
                        s = _mm(a1, tl.trans(c1), s, IEEE, USE_IP)
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
                    BM: tl.constexpr, BN: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
                    RESIDENT: tl.constexpr, IEEE: tl.constexpr, USE_IP: tl.constexpr):
        # out[rows, chunk] = outmul · Σ_j E_ij C[j, chunk], E = normalised dL/dx (|E| ≲ 2, so that the
        # fp16/bf16 cast before the tensor-core dot keeps precision; the true scale lives in outmul).
        # REDUCE: red_s[i] = Σ_j E_ij (A_i·C_j), red_b[i] = Σ_j E_ij (for d scale / d bias).
        NEG: tl.constexpr = -1.0e30
        KC: tl.constexpr = BD0 + BD1
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < M
        a_row = a_ptr + rows.to(tl.int64)[:, None] * stride_a
        k0 = tl.arange(0, BD0)
        dk = pid_d * KC  # this program's output chunk of D
        scale = tl.load(scale_ptr).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr).to(tl.float32)
        else:
            bias = 0.0
        if RESIDENT:  # one chunk: the row block of A stays on chip for the whole sweep
            a0 = tl.load(a_row + k0[None, :], mask=rmask[:, None] & (k0 < D)[None, :], other=0.0)
            if BD1 > 0:
                k1 = BD0 + tl.arange(0, BD1)
                a1 = tl.load(a_row + k1[None, :], mask=rmask[:, None] & (k1 < D)[None, :], other=0.0)
        if LOSS == 0:
            lse_a = tl.load(lse_a_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
            ca = tl.load(coef_a_ptr + rows, mask=rmask, other=0.0)
        acc0 = tl.zeros((BM, BD0), dtype=tl.float32)
        if BD1 > 0:
            acc1 = tl.zeros((BM, BD1), dtype=tl.float32)
        red_s = tl.zeros((BM,), dtype=tl.float32)
        red_b = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            cmask = cols < N
            c_row = c_ptr + cols.to(tl.int64)[:, None] * stride_c
            valid = rmask[:, None] & cmask[None, :]
            diag = (cols[None, :] == rows[:, None] + off) & valid
            s = tl.zeros((BM, BN), dtype=tl.float32)
            if RESIDENT:  # each C tile is loaded once and serves the logits and the product below
                c0 = tl.load(c_row + k0[None, :], mask=cmask[:, None] & (k0 < D)[None, :], other=0.0)
                s = _mm(a0, tl.trans(c0), s, IEEE, USE_IP)
                if BD1 > 0:
                    c1 = tl.load(c_row + k1[None, :], mask=cmask[:, None] & (k1 < D)[None, :], other=0.0)
                    s = _mm(a1, tl.trans(c1), s, IEEE, USE_IP)
            else:
                for kc in range(0, D, KC):
                    ka = kc + k0
                    km = (ka < D)[None, :]
                    a0 = tl.load(a_row + ka[None, :], mask=rmask[:, None] & km, other=0.0)
                    c0 = tl.load(c_row + ka[None, :], mask=cmask[:, None] & km, other=0.0)
                    s = _mm(a0, tl.trans(c0), s, IEEE, USE_IP)
                    if BD1 > 0:
                        kb = kc + BD0 + tl.arange(0, BD1)
                        kbm = (kb < D)[None, :]
                        a1 = tl.load(a_row + kb[None, :], mask=rmask[:, None] & kbm, other=0.0)
                        c1 = tl.load(c_row + kb[None, :], mask=cmask[:, None] & kbm, other=0.0)
                        s = _mm(a1, tl.trans(c1), s, IEEE, USE_IP)
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
            if RESIDENT:
                acc0 = _mm(e.to(c0.dtype), c0, acc0, IEEE, USE_IP)
                if BD1 > 0:
                    acc1 = _mm(e.to(c1.dtype), c1, acc1, IEEE, USE_IP)
            else:
                kp = dk + k0
                p0 = tl.load(c_row + kp[None, :], mask=cmask[:, None] & (kp < D)[None, :], other=0.0)
                acc0 = _mm(e.to(p0.dtype), p0, acc0, IEEE, USE_IP)
                if BD1 > 0:
                    kq = dk + BD0 + tl.arange(0, BD1)
                    p1 = tl.load(c_row + kq[None, :], mask=cmask[:, None] & (kq < D)[None, :], other=0.0)
                    acc1 = _mm(e.to(p1.dtype), p1, acc1, IEEE, USE_IP)
        om = tl.load(outmul_ptr).to(tl.float32)
        o_row = out_ptr + rows.to(tl.int64)[:, None] * stride_o
        ko = dk + k0
        tl.store(o_row + ko[None, :], (acc0 * om).to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (ko < D)[None, :])
        if BD1 > 0:
            kq = dk + BD0 + tl.arange(0, BD1)
            tl.store(o_row + kq[None, :], (acc1 * om).to(out_ptr.dtype.element_ty),
                     mask=rmask[:, None] & (kq < D)[None, :])
        if REDUCE:
            first = pid_d == 0
            tl.store(red_s_ptr + rows, red_s, mask=rmask & first)
            tl.store(red_b_ptr + rows, red_b, mask=rmask & first)
else:  # pragma: no cover - exercised only where triton is missing
    _fwd_kernel = None
    _bwd_kernel = None


# ----------------------------------------------------------------------------------------------------
# Configs (16-bit operands only; fp32 and the interpreter use fixed blocks). Every kept config is compiled
# for sm_90 by benchmarks/aot_compile_check.py (--configs all): wgmma, no register spills, shared ≤ 227 KiB.
# Keys: "BN", "num_warps", "num_stages" (forward: BM = _FWD_BM); the backward also "BM".
# ----------------------------------------------------------------------------------------------------
_FWD_CONFIGS = {
    # D chunk ≤ 512 wide: A 64×512 bf16 (64 KiB) resident + BN×512 per C stage
    "w512": ((64, 4, 2), (64, 8, 2), (32, 4, 3), (32, 8, 3)),
    # 512 < KC ≤ 768: A 96 KiB + 48 KiB per BN=32 stage
    "w768": ((32, 4, 2), (32, 8, 2), (64, 8, 1), (16, 4, 3)),
}
_BWD_CONFIGS = {
    # BM = 64 (one wgmma M), 8 warps: the 64×512 fp32 accumulator is 128 registers a thread. ptxas (sm_90,
    # Triton 3.6 and 3.9) put BN = 64 and every num_stages = 1 or 3 variant at 255 registers with spills, and
    # 16 warps (D = 768 in one chunk) spills 0.5-1 KB a thread: those are out.
    "w512": ((64, 32, 8, 2), (64, 16, 8, 2)),
    # several D chunks of ≤ 256 (D > 512, e.g. 768 = 3 × 256: 1 + 2 × 4 = 9 passes). Chunks of 384 (7 passes)
    # were measured too: with the K loop's operand loads they sit at 255 registers and spill 12 B on Triton 3.6
    # in every BN; at 256 wide BN = 16/32/64 are spill-free on 3.6 and 3.9.
    "split": ((64, 16, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)),
}


def _wclass(kc: int, resident: bool = True) -> str:
    if not resident:
        return "split"
    return "w512" if kc <= 512 else "w768"


if HAS_TRITON:

    def fwd_configs(kc: int = 512) -> list:
        """The forward's autotune configs for D chunks of width ``kc`` (16-bit operands)."""
        return [triton.Config({"BN": bn}, num_warps=w, num_stages=st) for bn, w, st in _FWD_CONFIGS[_wclass(kc)]]

    def bwd_configs(kc: int = 512, resident: bool = True) -> list:
        """The backward's autotune configs for D chunks of width ``kc``, one chunk (resident) or several."""
        return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
                for bm, bn, w, st in _BWD_CONFIGS[_wclass(kc, resident)]]

    def _prune(configs, named_args, **kwargs):
        return autotune_limit(configs)

    _TUNERS: dict = {}

    def _tuner(kind: str, kc: int, resident: bool):
        """The autotuner of ``kind`` ("fwd"/"bwd") for the config class of chunk width ``kc``, made once."""
        key = (kind, _wclass(kc, resident or kind == "fwd"))
        if key not in _TUNERS:
            kern, cfgs = ((_fwd_kernel, fwd_configs(kc)) if kind == "fwd" else
                          (_bwd_kernel, bwd_configs(kc, resident)))
            # autotuning runs the kernels on a GPU; both kernels are idempotent (no atomics), so that is safe
            _TUNERS[key] = triton.autotune(cfgs, key=["M_BKT", "N_BKT", "D"],
                                           prune_configs_by={"early_config_prune": _prune})(kern)
        return _TUNERS[key]
else:  # pragma: no cover
    def fwd_configs(kc: int = 512) -> list:
        return []

    def bwd_configs(kc: int = 512, resident: bool = True) -> list:
        return []


# Names kept for callers of the previous layout (tests, the GPU suite's config checks).
_fwd_configs = fwd_configs
_bwd_configs = bwd_configs
_prune_fwd = _prune_bwd = (_prune if HAS_TRITON else None)


def _interpreted() -> bool:
    return HAS_TRITON and is_interpreted(_fwd_kernel)


def _mode(dtype: torch.dtype, interp: bool) -> tuple[bool, bool]:
    """(ieee, tuned): fp32 → IEEE dots, fixed config; 16-bit on a compiled GPU → tensor cores, autotuned."""
    ieee = dtype == torch.float32
    return ieee, not (ieee or interp)


def _fixed_block(interp: bool) -> dict:
    """The block used without autotuning (interpreter, or fp32 on CUDA): BM, BN, num_warps, num_stages."""
    return dict(_INTERP_BLOCK if interp else _FP32_BLOCK)


def _plan(kind: str, D: int, ieee: bool, interp: bool) -> tuple[int, int]:
    return chunk_plan(D, _maxw(kind, D, ieee, interp))


def _fwd_bm(tuned: bool, interp: bool) -> int:
    return _FWD_BM if tuned else _fixed_block(interp)["BM"]


def _scalar_ptr(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return torch.zeros(1, dtype=torch.float32, device=like.device)
    return t.detach().reshape(1).to(device=like.device, dtype=torch.float32).contiguous()


def _launch(kernel, grid, args, meta):
    """The one place the kernels are launched (tests intercept it to check the work model)."""
    kernel[grid](*args, **meta)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def tri_forward(A, C, scale, bias, off, loss, need_col):
    """Triton forward on a block: CLIP → (row_lse (M,), col_lse (N,) or None); SigLIP → (row_sum (M,), None)."""
    M, D = A.shape
    N = C.shape[0]
    A = A.contiguous()
    C = C.contiguous()
    sp = _scalar_ptr(scale, A)
    bp = _scalar_ptr(bias, A)
    interp = _interpreted()
    ieee, tuned = _mode(A.dtype, interp)
    bd0, bd1 = _plan("fwd", D, ieee, interp)
    bm = _fwd_bm(tuned, interp)
    row = torch.empty(M, dtype=torch.float32, device=A.device)
    n_rb = _cdiv(M, bm)
    single_pass = loss == CLIP and need_col and n_rb * N * 4 <= _COLPART_MAX_BYTES
    colpart = torch.empty((n_rb, N) if single_pass else (1,), dtype=torch.float32, device=A.device)

    def launch(a, c, out, cp, m, n, o, write_col):
        args = (a, c, sp, bp, out, cp, m, n, D, a.stride(0), c.stride(0), o, _bucket(m), _bucket(n))
        meta = dict(LOSS=loss, HAS_BIAS=bias is not None, WRITE_COL=write_col, BM=bm, BD0=bd0, BD1=bd1,
                    RESIDENT=len(range(0, D, bd0 + bd1)) == 1, IEEE=ieee, USE_IP=DOT_HAS_INPUT_PRECISION)
        if tuned:
            grid = lambda META: fwd_geometry(m, n, D, bm, META["BN"], bd0, bd1)["grid"]  # noqa: E731
            _launch(_tuner("fwd", bd0 + bd1, meta["RESIDENT"]), grid, args, meta)
        else:
            blk = _fixed_block(interp)
            grid = fwd_geometry(m, n, D, bm, blk["BN"], bd0, bd1)["grid"]
            _launch(_fwd_kernel, grid, args, dict(meta, BN=blk["BN"], num_warps=blk["num_warps"],
                                                  num_stages=blk["num_stages"]))

    launch(A, C, row, colpart, M, N, off, single_pass)
    col = None
    if loss == CLIP and need_col:
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
    interp = _interpreted()
    ieee, tuned = _mode(A.dtype, interp)
    bd0, bd1 = _plan("bwd", D, ieee, interp)
    meta = dict(LOSS=loss, HAS_BIAS=bias is not None, REDUCE=reduce, BD0=bd0, BD1=bd1,
                RESIDENT=len(range(0, D, bd0 + bd1)) == 1, IEEE=ieee, USE_IP=DOT_HAS_INPUT_PRECISION)
    if tuned:
        grid = lambda META: bwd_geometry(M, N, D, META["BM"], META["BN"], bd0, bd1)["grid"]  # noqa: E731
        _launch(_tuner("bwd", bd0 + bd1, meta["RESIDENT"]), grid, args, meta)
    else:
        blk = _fixed_block(interp)
        grid = bwd_geometry(M, N, D, blk["BM"], blk["BN"], bd0, bd1)["grid"]
        _launch(_bwd_kernel, grid, args, dict(meta, BM=blk["BM"], BN=blk["BN"], num_warps=blk["num_warps"],
                                              num_stages=blk["num_stages"]))
    return out, (red_s.sum() if reduce else None), (red_b.sum() if reduce else None)


def tri_backward(A, C, scale, bias, off, loss, row_lse, col_lse, row_coef, col_coef, sig_coef, out_dtype):
    """Triton backward on a block → (dA (M,D), dC (N,D), d scale (), d bias ()) in fp32 scalars."""
    A = A.contiguous()
    C = C.contiguous()
    s = scale.detach().reshape(()).float()
    if loss == CLIP:
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
# Work model
# ----------------------------------------------------------------------------------------------------
def _cfg_dict(cfg, kind: str, kc: int, resident: bool, tuned: bool, interp: bool) -> dict:
    if cfg is None:
        if not tuned:
            return _fixed_block(interp)
        cfg = (_FWD_CONFIGS if kind == "fwd" else _BWD_CONFIGS)[_wclass(kc, resident or kind == "fwd")][0]
        keys = ("BN", "num_warps", "num_stages") if kind == "fwd" else ("BM", "BN", "num_warps", "num_stages")
        return dict(zip(keys, cfg))
    if isinstance(cfg, dict):
        return cfg
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def loss_work(B: int, D: int, dtype: torch.dtype = torch.bfloat16, fwd_config=None, bwd_config=None, *,
              loss: int = CLIP, N: int | None = None, need_col: bool = True,
              interpreted: bool | None = None) -> dict:
    """The Triton loss's work for one forward + backward of a (B rows) × (N columns, default B) block.

    Computed from the geometry the launchers size their grids with (``fwd_geometry`` / ``bwd_geometry``),
    the chunk plan they use, and their forward-buffer rule. ``fwd_config`` / ``bwd_config``: a
    ``triton.Config`` or a dict with BN (and BM for the backward); default the first kept config (16-bit)
    or the fixed block (fp32 / interpreter). ``interpreted``: model the CPU interpreter's launches (default:
    whatever the kernels here are) or, with False, the compiled GPU launches. Returns ``passes`` (executed
    tensor-op flops over one 2·B·N·D GEMM), ``flops``, ``operand_bytes`` (A/C tile bytes the programs
    load), ``launches`` (one dict per kernel launch: kernel, grid, n_trips, k_trips, flops) and the chunk plans.
    """
    N = B if N is None else N
    interp = _interpreted() if interpreted is None else bool(interpreted)
    ieee, tuned = _mode(dtype, interp)
    elem = torch.empty((), dtype=dtype).element_size()
    f0, f1 = _plan("fwd", D, ieee, interp)
    b0, b1 = _plan("bwd", D, ieee, interp)
    fc = _cfg_dict(fwd_config, "fwd", f0 + f1, True, tuned, interp)
    bc = _cfg_dict(bwd_config, "bwd", b0 + b1, D <= b0 + b1, tuned, interp)
    bm_f = _fwd_bm(tuned, interp)
    launches = []

    def add(kind, geo, bm, bn, m):
        fl, by = _launch_work(kind, geo, bm, bn, elem)
        launches.append(dict(kernel="_fwd_kernel" if kind == "fwd" else "_bwd_kernel", grid=geo["grid"],
                             n_trips=geo["n_trips"], k_trips=geo["k_trips"], flops=fl, bytes=by, rows=m))

    add("fwd", fwd_geometry(B, N, D, bm_f, fc["BN"], f0, f1), bm_f, fc["BN"], B)
    single_pass = loss == CLIP and need_col and _cdiv(B, bm_f) * N * 4 <= _COLPART_MAX_BYTES
    if loss == CLIP and need_col and not single_pass:
        add("fwd", fwd_geometry(N, B, D, bm_f, fc["BN"], f0, f1), bm_f, fc["BN"], N)
    add("bwd", bwd_geometry(B, N, D, bc["BM"], bc["BN"], b0, b1), bc["BM"], bc["BN"], B)
    add("bwd", bwd_geometry(N, B, D, bc["BM"], bc["BN"], b0, b1), bc["BM"], bc["BN"], N)
    flops = sum(x["flops"] for x in launches)
    return dict(passes=flops / (2.0 * B * N * D), flops=flops, operand_bytes=sum(x["bytes"] for x in launches),
                launches=launches, fwd_chunks=(f0, f1), bwd_chunks=(b0, b1), fwd_config=fc, bwd_config=bc)


__all__ += ["CLIP", "SIGLIP", "tri_forward", "tri_backward"]
