"""Triton flash-attention kernels, their launch configurations and launchers (forward and backward).

Layouts: varlen-shaped ``(total_tokens, nheads, headdim)`` views with unit head-dim stride; padded batches come
in flattened to ``(batch * seqlen, ...)`` with ``VARLEN=False``. ``bmclip.kernels.flash_attention`` holds the
checks, the dispatch and the autograd Function; this module only launches.

Forward: an online softmax in base 2 that saves the per-row log-sum-exp (base 2, fp32, ``(nheads, total)``).
When every block of a sequence needs a mask anyway (non-causal, or sequences of at most ``ONE_LOOP_MAX_SEQLEN``
tokens) the key blocks run as one software-pipelined loop that masks inside it; longer causal sequences split
into an unmasked loop and a masked tail (diagonal and sequence end).

Backward (recomputes P from the saved LSE), two modes:

* ``"separate"``: a delta kernel (rowsum dO*O), a dK/dV kernel that walks query blocks for one key block, and
  a dQ kernel that walks key blocks for one query block: 7 matmuls per block pair, no atomics, deterministic.
* ``"atomic"``: the delta kernel also zeroes an fp32 dQ accumulator of exactly ``(total, nheads, headdim)``;
  the dK/dV kernel adds each key block's share of dQ into it with relaxed fp32 atomics (5 matmuls per block
  pair, as FlashAttention-2); one conversion kernel scales and casts it into dQ. Summation order, hence the
  last bits of dQ, is not fixed.

Every load and store is masked on rows, columns and the head dimension, so any length from 1 up works.
Accumulation is fp32 throughout; fp32 inputs use IEEE dot products (no TF32).
"""

from __future__ import annotations

import torch

from ._triton_utils import DOT_HAS_INPUT_PRECISION, HAS_TRITON, autotune_limit, is_interpreted, triton

if HAS_TRITON:
    import triton.language as tl

__all__ = ["BWD_DQ_MODES", "MAX_HEADDIM", "ONE_LOOP_MAX_SEQLEN", "backward", "forward"]

MAX_HEADDIM = 128
LOG2E = 1.4426950408889634
BWD_DQ_MODES = ("separate", "atomic")
# Causal sequences up to this length run the forward (and the separate dQ kernel) as one masked loop: with
# at most 4 key blocks of 64, a second (tail) loop would drain the software pipeline twice for one block.
ONE_LOOP_MAX_SEQLEN = 256

# Block sizes used under the CPU interpreter (no autotuning there). Tests may lower them to force many
# partial blocks; larger blocks mean fewer interpreted loop iterations, which is what costs time there.
_INTERPRET_BLOCKS = {"fwd": (64, 64), "bwd_dkdv": (64, 64), "bwd_dq": (64, 64)}
# Elementwise helpers (delta, dQ conversion): tokens per program and elements per program.
_DELTA_BLOCK_T = 64
_CONVERT_BLOCK = 1024


if HAS_TRITON:

    @triton.jit
    def _dot(a, b, USE_INPUT_PRECISION: tl.constexpr):
        # "ieee" keeps fp32 inputs exact (TF32 would lose ~3 decimal digits); it is ignored for fp16/bf16.
        if USE_INPUT_PRECISION:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b, allow_tf32=False)

    @triton.jit
    def _seq_bounds(CU, b, padded_seqlen, VARLEN: tl.constexpr):
        if VARLEN:
            start = tl.load(CU + b).to(tl.int64)
            seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        else:
            start = b.to(tl.int64) * padded_seqlen
            seqlen = padded_seqlen + 0 * b
        return start, seqlen

    @triton.jit
    def _load_rows(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
        # Row masks only where a block can run past its sequence; a head-dim mask only if BLOCK_D > HEAD_DIM.
        if MASK_ROWS:
            return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        elif PAD_D:
            return tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs)

    @triton.jit
    def _kv_ranges(pid_m, seqlen, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        # Key blocks [0, full_end) lie inside the sequence and (causal) entirely at or left of the query
        # block's first row: no masks needed there. The rest, up to hi, needs masks (sequence end, diagonal).
        if CAUSAL:
            hi = tl.minimum(seqlen, (pid_m + 1) * BLOCK_M)
            full_end = tl.minimum(seqlen, pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        else:
            hi = seqlen
            full_end = seqlen // BLOCK_N * BLOCK_N
        return full_end, hi

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
        offs_m, offs_n, offs_d, d_valid, seqlen, lo, hi, qk_scale_log2,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
        USE_INPUT_PRECISION: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            cols_i = start_n + offs_n
            n_valid = cols_i < seqlen
            cols = start + cols_i.to(tl.int64)
            k = _load_rows(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :], n_valid, d_valid,
                           MASKED, PAD_D)
            qk = _dot(q, tl.trans(k), USE_INPUT_PRECISION) * qk_scale_log2
            if MASKED:
                valid = n_valid[None, :]
                if CAUSAL:
                    valid = valid & (cols_i[None, :] <= offs_m[:, None])
                qk = tl.where(valid, qk, float("-inf"))
            # The first key block always holds column 0, which every row may see (causal or not), so
            # m_new is finite from the first iteration on and exp2(-inf - m_new) is a clean 0.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :], n_valid, d_valid,
                           MASKED, PAD_D)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, USE_INPUT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, CU,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_lse_h, nheads, padded_seqlen, qk_scale_log2, max_seqlen_key,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        VARLEN: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
        ONE_LOOP: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // nheads
        h = pid_bh % nheads
        start, seqlen = _seq_bounds(CU, b, padded_seqlen, VARLEN)
        if pid_m * BLOCK_M >= seqlen:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seqlen
        d_valid = offs_d < HEAD_DIM
        rows = start + offs_m.to(tl.int64)

        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        full_end, hi = _kv_ranges(pid_m, seqlen, BLOCK_M, BLOCK_N, CAUSAL)
        if ONE_LOOP:
            # One pipelined loop over every key block, masks applied inside (they only bite at the
            # sequence end and, causal, on the diagonal).
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
                offs_m, offs_n, offs_d, d_valid, seqlen, 0, hi, qk_scale_log2,
                BLOCK_N, CAUSAL, True, PAD_D, USE_INPUT_PRECISION,
            )
        else:
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
                offs_m, offs_n, offs_d, d_valid, seqlen, 0, full_end, qk_scale_log2,
                BLOCK_N, CAUSAL, False, PAD_D, USE_INPUT_PRECISION,
            )
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
                offs_m, offs_n, offs_d, d_valid, seqlen, full_end, hi, qk_scale_log2,
                BLOCK_N, CAUSAL, True, PAD_D, USE_INPUT_PRECISION,
            )

        acc = acc / l_i[:, None]
        tl.store(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=m_valid[:, None] & d_valid[None, :])
        tl.store(LSE + h * stride_lse_h + rows, m_i + tl.log2(l_i), mask=m_valid)

    @triton.jit
    def _attn_bwd_delta_kernel(
        O, DO, DELTA, DQ_ACC, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h, total_tokens, nheads,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ZERO_DQ: tl.constexpr,
    ):
        # delta = rowsum(dO * O) per (token, head); with ZERO_DQ also zeroes the matching rows of the
        # contiguous fp32 dQ accumulator (total, nheads, HEAD_DIM), so it needs no separate memset launch.
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t < total_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + offs_t[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + offs_t[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + h * stride_delta_h + offs_t, delta, mask=offs_t < total_tokens)
        if ZERO_DQ:
            tl.store(DQ_ACC + (offs_t[:, None] * nheads + h) * HEAD_DIM + offs_d[None, :],
                     tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), mask=mask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        stride_lse_h, nheads, padded_seqlen, sm_scale, qk_scale_log2, max_seqlen_key,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        VARLEN: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // nheads
        h = pid_bh % nheads
        start, seqlen = _seq_bounds(CU, b, padded_seqlen, VARLEN)
        if pid_n * BLOCK_N >= seqlen:
            return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_valid = offs_n < seqlen
        d_valid = offs_d < HEAD_DIM
        cols = start + offs_n.to(tl.int64)
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        if CAUSAL:
            # Query rows before this key block's first column see none of it.
            lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
        else:
            lo = 0
        # Why no sequence-end mask on P here: query rows past the end load q = dO = 0 and lse = delta = 0,
        # so their P^T column is exp2(0) = 1 but they add 1 * dO = 0 to dV and P * (dO.V - delta) = 0 to dK;
        # key rows past the end (k = v = 0) only produce dK/dV rows that are never stored. Only the causal
        # mask changes real results -- unless dQ is accumulated here too (ATOMIC_DQ): dQ sums over keys,
        # so past-the-end keys (whose exp2(-lse) may overflow) must then be zeroed as well.
        for start_m in range(lo, seqlen, BLOCK_M):
            rows_i = start_m + offs_m
            m_valid = rows_i < seqlen
            rows = start + rows_i.to(tl.int64)
            q_mask = m_valid[:, None] & d_valid[None, :]
            q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask,
                         other=0.0)
            lse = tl.load(LSE + h * stride_lse_h + rows, mask=m_valid, other=0.0)
            delta = tl.load(DELTA + h * stride_lse_h + rows, mask=m_valid, other=0.0)
            # Transposed scores (keys x queries) so the dK/dV products need no transposes of P.
            qk_t = _dot(k, tl.trans(q), USE_INPUT_PRECISION) * qk_scale_log2
            p_t = tl.exp2(qk_t - lse[None, :])
            # where() (not a multiply) so that exp2 overflow in masked slots can never leak inf/nan.
            if CAUSAL:
                p_t = tl.where(offs_n[:, None] <= rows_i[None, :], p_t, 0.0)
            if ATOMIC_DQ:
                p_t = tl.where(n_valid[:, None], p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, USE_INPUT_PRECISION)
            dp_t = _dot(v, tl.trans(do), USE_INPUT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, USE_INPUT_PRECISION)
            if ATOMIC_DQ:
                # This key block's share of dQ (unscaled; the conversion kernel applies sm_scale once). Relaxed
                # ordering: the adds only have to be atomic, nothing reads the buffer until the kernel ends, so
                # no memory fence per add (the default acq_rel semantics would put one before each).
                dq_part = _dot(tl.trans(ds_t).to(k.dtype), k, USE_INPUT_PRECISION)
                tl.atomic_add(DQ_ACC + (rows[:, None] * nheads + h) * HEAD_DIM + offs_d[None, :], dq_part,
                              mask=q_mask, sem="relaxed")

        dk = dk * sm_scale
        tl.store(DK + cols[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(DV + cols[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_convert_kernel(DQ_ACC, DQ, n_elements, sm_scale, BLOCK: tl.constexpr):
        # dQ = sm_scale * the fp32 accumulator, cast to dQ's dtype (both contiguous, same element order).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        acc = tl.load(DQ_ACC + offs, mask=mask, other=0.0)
        tl.store(DQ + offs, (acc * sm_scale).to(DQ.dtype.element_ty), mask=mask)

    @triton.jit
    def _dq_inner(
        dq, q, do, lse, delta, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
        offs_m, offs_n, offs_d, d_valid, seqlen, lo, hi, qk_scale_log2,
        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
        USE_INPUT_PRECISION: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            cols_i = start_n + offs_n
            n_valid = cols_i < seqlen
            cols = start + cols_i.to(tl.int64)
            k = _load_rows(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :], n_valid, d_valid,
                           MASKED, PAD_D)
            v = _load_rows(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :], n_valid, d_valid,
                           MASKED, PAD_D)
            qk = _dot(q, tl.trans(k), USE_INPUT_PRECISION) * qk_scale_log2
            p = tl.exp2(qk - lse[:, None])
            if MASKED:
                # Past-the-end keys (k = 0) give p = exp2(-lse), which can overflow: zero it with where().
                valid = n_valid[None, :]
                if CAUSAL:
                    valid = valid & (cols_i[None, :] <= offs_m[:, None])
                p = tl.where(valid, p, 0.0)
            dp = _dot(do, tl.trans(v), USE_INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, USE_INPUT_PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh,
        stride_lse_h, nheads, padded_seqlen, sm_scale, qk_scale_log2, max_seqlen_key,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        VARLEN: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
        ONE_LOOP: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // nheads
        h = pid_bh % nheads
        start, seqlen = _seq_bounds(CU, b, padded_seqlen, VARLEN)
        if pid_m * BLOCK_M >= seqlen:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seqlen
        d_valid = offs_d < HEAD_DIM
        rows = start + offs_m.to(tl.int64)
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * stride_lse_h + rows, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + h * stride_lse_h + rows, mask=m_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Same loop structure as the forward pass.
        full_end, hi = _kv_ranges(pid_m, seqlen, BLOCK_M, BLOCK_N, CAUSAL)
        if ONE_LOOP:
            dq = _dq_inner(dq, q, do, lse, delta, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
                           offs_m, offs_n, offs_d, d_valid, seqlen, 0, hi, qk_scale_log2,
                           BLOCK_N, CAUSAL, True, PAD_D, USE_INPUT_PRECISION)
        else:
            dq = _dq_inner(dq, q, do, lse, delta, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
                           offs_m, offs_n, offs_d, d_valid, seqlen, 0, full_end, qk_scale_log2,
                           BLOCK_N, CAUSAL, False, PAD_D, USE_INPUT_PRECISION)
            dq = _dq_inner(dq, q, do, lse, delta, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
                           offs_m, offs_n, offs_d, d_valid, seqlen, full_end, hi, qk_scale_log2,
                           BLOCK_N, CAUSAL, True, PAD_D, USE_INPUT_PRECISION)

        dq = dq * sm_scale
        tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=q_mask)


# ---------------------------------------------------------------------------------------------------
# Autotuning (GPU only: autotune cannot run under the interpreter)


def _configs(entries):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for (bm, bn, w, s) in entries]


def _is_fp32_tile(config) -> bool:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 64 * 32 and config.num_stages <= 2


def _prune_fp32_configs(configs, named_args, **kwargs):
    """fp32 inputs: only tiles of <= 64 x 32 and 2 stages (fp32 tiles are twice the registers and shared
    memory; at head dim 128 a 128 x 64 tile spilled ~100 KB per thread and took minutes to compile)."""
    q = named_args.get("Q")
    if q is None or getattr(q, "element_size", lambda: 2)() < 4:
        return autotune_limit(configs)
    small = [c for c in configs if _is_fp32_tile(c)]
    return autotune_limit(small or configs[-1:])


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Short lists (the autotuner compiles and times each one per key
# on the first call), every bf16 entry checked to compile for sm_90 to wgmma (warpgroup MMA) with no register
# spills and within the shared-memory limit, at head dim 64 (Triton 3.6 and 3.9). The <= 64 x 32, 2-stage
# entries are the ones fp32 inputs tune over.
FWD_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (64, 16, 4, 2)]
DKDV_CONFIGS = [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2)]
DQ_CONFIGS = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 2)]
# Backward configs that spill registers (ptxas, sm_90) at head dims above 64: tuned for head dims <= 64 only.
_HD64_ONLY = {"dkdv": {(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3)}, "dq": {(128, 32, 4, 2)}}


def _entry(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


# The atomic-dQ variant also multiplies dS (BLOCK_M x BLOCK_N) by K inside the dK/dV kernel: with 16-bit inputs a
# BLOCK_M below 64 (the warpgroup MMA minimum) compiles that product to mma.sync, so such tiles are not tuned there.
_ATOMIC_MIN_BLOCK_M = 64


def _prune_for(kernel: str):
    """The autotuner's early prune for ``kernel``: the head-dim rule of ``_HD64_ONLY``, the atomic-dQ rule, then
    the fp32 rule."""
    base = kernel.removesuffix("_atomic")
    hd64_only = _HD64_ONLY.get(base, set())

    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        if head_dim is not None and head_dim > 64 and hd64_only:
            configs = [c for c in configs if _entry(c) not in hd64_only] or configs[-1:]
        q = named_args.get("Q")
        sixteen_bit = q is not None and getattr(q, "element_size", lambda: 2)() < 4
        if kernel.endswith("_atomic") and sixteen_bit:
            configs = [c for c in configs if c.kwargs["BLOCK_M"] >= _ATOMIC_MIN_BLOCK_M] or configs[:1]
        return _prune_fp32_configs(configs, named_args)

    return prune

if HAS_TRITON:
    # Keyed on the head dim, causality, the layout and the max sequence length rounded up to a power of two
    # (one key per length octave, so varlen batches re-tune only per bucket); the autotuner adds the
    # tensors' dtypes to the key itself.
    _KEY = ["HEAD_DIM", "CAUSAL", "VARLEN", "max_seqlen_key"]
    _FWD_TUNED = triton.autotune(configs=_configs(FWD_CONFIGS), key=_KEY,
                                 prune_configs_by={"early_config_prune": _prune_for("fwd")})(_attn_fwd_kernel)
    _DKDV_TUNED = triton.autotune(configs=_configs(DKDV_CONFIGS), key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune_for("dkdv")})(_attn_bwd_dkdv_kernel)
    # The autotuner re-runs a kernel while timing it: the atomic-dQ variant must start each run from zero.
    _DKDV_ATOMIC_TUNED = triton.autotune(configs=_configs(DKDV_CONFIGS), key=_KEY, reset_to_zero=["DQ_ACC"],
                                         prune_configs_by={"early_config_prune": _prune_for("dkdv_atomic")}
                                         )(_attn_bwd_dkdv_kernel)
    _DQ_TUNED = triton.autotune(configs=_configs(DQ_CONFIGS), key=_KEY,
                                prune_configs_by={"early_config_prune": _prune_for("dq")})(_attn_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------------------
# Launchers


def seqlen_key(max_seqlen: int) -> int:
    """The autotune key of a max sequence length: rounded up to a power of two."""
    return 1 << max(0, (max_seqlen - 1).bit_length())


def one_loop(max_seqlen: int, causal: bool) -> bool:
    """Whether the forward / dQ kernels run their key blocks as one masked loop (see the module docstring)."""
    return (not causal) or max_seqlen <= ONE_LOOP_MAX_SEQLEN


def _launch(kernel_plain, kernel_tuned, which: str, grid_fn, args, constexprs):
    """Run a kernel: fixed interpreter blocks under TRITON_INTERPRET, autotuned configs on the GPU."""
    if is_interpreted(kernel_plain):
        bm, bn = _INTERPRET_BLOCKS[which]
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        kernel_plain[grid_fn(meta)](*args, **constexprs, **meta)
    else:
        kernel_tuned[grid_fn](*args, **constexprs)


def _constexprs(head_dim: int, varlen: bool, causal: bool) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, VARLEN=varlen, CAUSAL=bool(causal), PAD_D=block_d != head_dim,
                USE_INPUT_PRECISION=DOT_HAS_INPUT_PRECISION)


def forward(q, k, v, cu_seqlens, batch: int, padded_seqlen: int, max_seqlen: int, causal: bool,
            sm_scale: float):
    """O and the base-2 LSE ``(nheads, total)`` fp32 of varlen-shaped q, k, v ``(total, nheads, headdim)``.

    ``cu_seqlens`` (int32, batch + 1) or None for a padded batch of ``batch`` sequences of ``padded_seqlen``.
    """
    total, nheads, head_dim = q.shape
    o = torch.empty((total, nheads, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((nheads, total), device=q.device, dtype=torch.float32)
    if total == 0:
        return o, lse
    varlen = cu_seqlens is not None
    # CU + b in the kernels: unit stride (a no-op copy for the usual contiguous cu_seqlens). A dummy pointer
    # when padded (never read: VARLEN is constexpr).
    cu = cu_seqlens.contiguous() if varlen else q
    consts = dict(_constexprs(head_dim, varlen, causal), ONE_LOOP=one_loop(max_seqlen, causal))
    args = (q, k, v, o, lse, cu,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), lse.stride(0), nheads, padded_seqlen, sm_scale * LOG2E,
            seqlen_key(max_seqlen))
    _launch(_attn_fwd_kernel, _FWD_TUNED if not is_interpreted(_attn_fwd_kernel) else None, "fwd",
            lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * nheads), args, consts)
    return o, lse


def backward(do, q, k, v, o, lse, cu_seqlens, batch: int, padded_seqlen: int, max_seqlen: int, causal: bool,
             sm_scale: float, dq_mode: str = "separate"):
    """(dQ, dK, dV), contiguous, for the saved forward tensors; ``dq_mode`` is "separate" or "atomic"."""
    if dq_mode not in BWD_DQ_MODES:
        raise ValueError(f"flash_attention: the backward dQ mode must be one of {BWD_DQ_MODES}, got {dq_mode!r}")
    total, nheads, head_dim = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty((total, nheads, head_dim), device=q.device, dtype=q.dtype)
    dk = torch.empty((total, nheads, head_dim), device=k.device, dtype=k.dtype)
    dv = torch.empty((total, nheads, head_dim), device=v.device, dtype=v.dtype)
    if total == 0:
        return dq, dk, dv
    varlen = cu_seqlens is not None
    cu = cu_seqlens.contiguous() if varlen else q  # see forward()
    consts = _constexprs(head_dim, varlen, causal)
    atomic = dq_mode == "atomic"
    interp = is_interpreted(_attn_bwd_dkdv_kernel)
    # Exactly one fp32 element per dQ element; zeroed by the delta kernel, which runs first.
    dq_acc = torch.empty((total, nheads, head_dim), device=q.device, dtype=torch.float32) if atomic else dq
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(total, _DELTA_BLOCK_T), nheads)](
        o, do, delta, dq_acc, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0), total, nheads,
        HEAD_DIM=head_dim, BLOCK_D=consts["BLOCK_D"], BLOCK_T=_DELTA_BLOCK_T, ZERO_DQ=atomic,
    )
    common = (lse.stride(0), nheads, padded_seqlen, sm_scale, sm_scale * LOG2E, seqlen_key(max_seqlen))
    strides_in = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                  do.stride(0), do.stride(1))
    _launch(
        _attn_bwd_dkdv_kernel, None if interp else (_DKDV_ATOMIC_TUNED if atomic else _DKDV_TUNED), "bwd_dkdv",
        lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), batch * nheads),
        (q, k, v, do, lse, delta, dk, dv, dq_acc, cu, *strides_in,
         dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *common),
        dict(consts, ATOMIC_DQ=atomic),
    )
    if atomic:
        n = dq.numel()
        _attn_bwd_dq_convert_kernel[(triton.cdiv(n, _CONVERT_BLOCK),)](dq_acc, dq, n, sm_scale, BLOCK=_CONVERT_BLOCK)
    else:
        _launch(
            _attn_bwd_dq_kernel, None if interp else _DQ_TUNED, "bwd_dq",
            lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * nheads),
            (q, k, v, do, lse, delta, dq, cu, *strides_in, dq.stride(0), dq.stride(1), *common),
            dict(consts, ONE_LOOP=one_loop(max_seqlen, causal)),
        )
    return dq, dk, dv
