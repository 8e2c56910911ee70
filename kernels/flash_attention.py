"""Flash attention (padded and variable-length) in Triton, with SDPA and xformers paths behind one call.

Layouts follow flash-attn: padded ``(batch, seqlen, nheads, headdim)``, or varlen ``(total_tokens, nheads,
headdim)`` with ``cu_seqlens`` (int32, ``batch + 1``, cumulative sequence starts). Keys and values share
the queries' sequence boundaries (self-attention).

Triton kernels: the forward pass uses an online softmax in base 2 and saves the per-row log-sum-exp
(base 2, fp32, layout ``(nheads, total_tokens)``); the backward pass recomputes the probabilities from it:
a "delta" kernel (rowsum dO*O), a dK/dV kernel that walks query blocks for one key block, and a dQ kernel
that walks key blocks for one query block (no atomics, so it also runs under ``TRITON_INTERPRET=1``).
Every load and store is masked on rows, columns and the head dimension, so any length from 1 up works.
Accumulation is fp32 throughout; fp32 inputs use IEEE dot products (no TF32).
"""

from __future__ import annotations

import inspect
import math
import os

import torch
import torch.nn.functional as F

from ._triton_utils import BackendUnavailable, autotune_limit

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # the sdpa/xformers paths still work; backend="triton" raises
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["FlashAttentionUnavailable", "flash_attention"]

_BACKENDS = ("auto", "triton", "sdpa", "xformers")
_MAX_TRITON_HEADDIM = 128
_LOG2E = 1.4426950408889634


# An explicitly requested backend cannot run here (no Triton/CUDA/interpreter, no xformers, ...): the one
# exception type of bmclip.kernels, under the name this module has always exported.
FlashAttentionUnavailable = BackendUnavailable


def _interpreting() -> bool:
    # Same truth values Triton itself accepts for TRITON_INTERPRET.
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Triton >= 3.0 spells the fp32 dot-precision switch `input_precision`; older releases only had
# `allow_tf32`. Detected once so the kernels compile on the GPU box's triton 3.6 and on newer ones.
_DOT_HAS_INPUT_PRECISION = bool(_HAS_TRITON and "input_precision" in inspect.signature(tl.dot).parameters)

# How the backward pass computes dQ: "separate" (a dQ kernel over key blocks: deterministic, 7 matmuls per
# block pair) or "atomic" (dQ accumulated with fp32 atomics inside the dK/dV kernel: 5 matmuls, summation
# order not fixed). benchmarks/bench_attention.py times both; "separate" stays the default until a GPU
# run shows the atomic one is faster.
_BWD_DQ_MODE = "separate"

# Block sizes used under the CPU interpreter (no autotuning there). Tests may lower them to force many
# partial blocks; larger blocks mean fewer interpreted loop iterations, which is what costs time there.
_INTERPRET_BLOCKS = {"fwd": (64, 64), "bwd_dkdv": (64, 64), "bwd_dq": (64, 64)}


if _HAS_TRITON:

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

        # Key blocks [0, full_end) lie inside the sequence and (causal) entirely at or left of the block's
        # first query row: no masks there. The rest, up to hi, is masked (sequence end and/or diagonal).
        if CAUSAL:
            hi = tl.minimum(seqlen, (pid_m + 1) * BLOCK_M)
            full_end = tl.minimum(seqlen, pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        else:
            hi = seqlen
            full_end = seqlen // BLOCK_N * BLOCK_N
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
        O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h, total_tokens,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t < total_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + offs_t[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + offs_t[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + h * stride_delta_h + offs_t, delta, mask=offs_t < total_tokens)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
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
                # FA2-style: this key block's share of dQ, added into an fp32 buffer (5 matmuls per block
                # pair instead of 7 with the separate dQ kernel; summation order, hence bits, not fixed).
                dq_part = _dot(tl.trans(ds_t).to(k.dtype), k, USE_INPUT_PRECISION) * sm_scale
                tl.atomic_add(DQ_ACC + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq_part,
                              mask=q_mask)

        dk = dk * sm_scale
        tl.store(DK + cols[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(DV + cols[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_mask)

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

        # Same split as the forward pass: unmasked full key blocks, then the masked remainder.
        if CAUSAL:
            hi = tl.minimum(seqlen, (pid_m + 1) * BLOCK_M)
            full_end = tl.minimum(seqlen, pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        else:
            hi = seqlen
            full_end = seqlen // BLOCK_N * BLOCK_N
        dq = _dq_inner(dq, q, do, lse, delta, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
                       offs_m, offs_n, offs_d, d_valid, seqlen, 0, full_end, qk_scale_log2,
                       BLOCK_N, CAUSAL, False, PAD_D, USE_INPUT_PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, start, h, stride_kt, stride_kh, stride_vt, stride_vh,
                       offs_m, offs_n, offs_d, d_valid, seqlen, full_end, hi, qk_scale_log2,
                       BLOCK_N, CAUSAL, True, PAD_D, USE_INPUT_PRECISION)

        dq = dq * sm_scale
        tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=q_mask)

    def _prune_fp32_configs(configs, named_args, **kwargs):
        """fp32 inputs: only tiles of <= 64 x 32 and 2 stages (fp32 tiles are twice the registers and shared
        memory; at head dim 128 a 128 x 64 tile spilled ~100 KB per thread and took minutes to compile)."""
        q = named_args.get("Q")
        if q is None or getattr(q, "element_size", lambda: 2)() < 4:
            return autotune_limit(configs)
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 and c.num_stages <= 2]
        return autotune_limit(small or configs[-1:])

    def _configs(block_pairs, warps, stages):
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for (bm, bn) in block_pairs for w in warps for s in stages
        ]

    # GPU only (autotune cannot run under the interpreter). Keyed on the head dim, causality and the
    # max sequence length rounded up to a power of two, so varlen batches re-tune only per length bucket
    # (the autotuner adds the tensors' dtypes to the key itself).
    _prune = {"early_config_prune": _prune_fp32_configs}
    _FWD_TUNED = triton.autotune(
        configs=_configs([(128, 64), (128, 32), (64, 64), (64, 32)], [4, 8], [2, 3]),
        key=["HEAD_DIM", "CAUSAL", "max_seqlen_key"], prune_configs_by=_prune,
    )(_attn_fwd_kernel)
    _DKDV_TUNED = triton.autotune(
        configs=_configs([(32, 128), (64, 64), (32, 64), (64, 128)], [4, 8], [2, 3]),
        key=["HEAD_DIM", "CAUSAL", "max_seqlen_key"], prune_configs_by=_prune,
    )(_attn_bwd_dkdv_kernel)
    # The autotuner re-runs a kernel while timing it: the atomic-dQ variant must start each run from zero.
    _DKDV_ATOMIC_TUNED = triton.autotune(
        configs=_configs([(32, 128), (64, 64), (32, 64), (64, 128)], [4, 8], [2, 3]),
        key=["HEAD_DIM", "CAUSAL", "max_seqlen_key"], reset_to_zero=["DQ_ACC"], prune_configs_by=_prune,
    )(_attn_bwd_dkdv_kernel)
    _DQ_TUNED = triton.autotune(
        configs=_configs([(128, 32), (64, 64), (64, 32), (128, 64)], [4, 8], [2, 3]),
        key=["HEAD_DIM", "CAUSAL", "max_seqlen_key"], prune_configs_by=_prune,
    )(_attn_bwd_dq_kernel)


def _seqlen_key(max_seqlen: int) -> int:
    return 1 << max(0, (max_seqlen - 1).bit_length())


def _launch(kernel_plain, kernel_tuned, which: str, grid_fn, args, constexprs):
    """Run a kernel: fixed interpreter blocks under TRITON_INTERPRET, autotuned configs on the GPU."""
    if _interpreting():
        bm, bn = _INTERPRET_BLOCKS[which]
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        kernel_plain[grid_fn(meta)](*args, **constexprs, **meta)
    else:
        kernel_tuned[grid_fn](*args, **constexprs)


class _TritonFlashAttention(torch.autograd.Function):
    """Autograd wrapper over the Triton kernels, on varlen-shaped views ``(total, nheads, headdim)``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, batch, padded_seqlen, max_seqlen, causal, sm_scale):
        total, nheads, head_dim = q.shape
        o = torch.empty((total, nheads, head_dim), device=q.device, dtype=q.dtype)
        lse = torch.empty((nheads, total), device=q.device, dtype=torch.float32)
        varlen = cu_seqlens is not None
        cu = cu_seqlens if varlen else q  # a dummy pointer when padded (never read: VARLEN is constexpr)
        block_d = max(16, triton.next_power_of_2(head_dim))
        consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, VARLEN=varlen, CAUSAL=bool(causal),
                      PAD_D=block_d != head_dim, USE_INPUT_PRECISION=_DOT_HAS_INPUT_PRECISION)
        if total > 0:
            args = (q, k, v, o, lse, cu,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    o.stride(0), o.stride(1), lse.stride(0), nheads, padded_seqlen, sm_scale * _LOG2E,
                    _seqlen_key(max_seqlen))
            grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * nheads)
            _launch(_attn_fwd_kernel, _FWD_TUNED if not _interpreting() else None, "fwd", grid, args, consts)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens if varlen else None)
        ctx.shape_info = (batch, padded_seqlen, max_seqlen, bool(causal), sm_scale, consts)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        batch, padded_seqlen, max_seqlen, causal, sm_scale, consts = ctx.shape_info
        total, nheads, head_dim = q.shape
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        if total == 0:
            return dq, dk, dv, None, None, None, None, None, None
        cu = cu_seqlens if cu_seqlens is not None else q
        delta = torch.empty_like(lse)
        block_t = 64
        _attn_bwd_delta_kernel[(triton.cdiv(total, block_t), nheads)](
            o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0), total,
            HEAD_DIM=head_dim, BLOCK_D=consts["BLOCK_D"], BLOCK_T=block_t,
        )
        common = (lse.stride(0), nheads, padded_seqlen, sm_scale, sm_scale * _LOG2E, _seqlen_key(max_seqlen))
        strides_in = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      do.stride(0), do.stride(1))
        interp = _interpreting()
        if _BWD_DQ_MODE not in ("separate", "atomic"):
            raise ValueError(f"flash_attention: _BWD_DQ_MODE must be 'separate' or 'atomic', got {_BWD_DQ_MODE!r}")
        atomic = _BWD_DQ_MODE == "atomic"
        dq_acc = torch.zeros((total, nheads, head_dim), device=q.device, dtype=torch.float32) if atomic else dq
        _launch(
            _attn_bwd_dkdv_kernel, None if interp else (_DKDV_ATOMIC_TUNED if atomic else _DKDV_TUNED), "bwd_dkdv",
            lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), batch * nheads),
            (q, k, v, do, lse, delta, dk, dv, dq_acc, cu, *strides_in,
             dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_acc.stride(0), dq_acc.stride(1), *common),
            dict(consts, ATOMIC_DQ=atomic),
        )
        if atomic:
            dq.copy_(dq_acc)
        else:
            _launch(
                _attn_bwd_dq_kernel, None if interp else _DQ_TUNED, "bwd_dq",
                lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * nheads),
                (q, k, v, do, lse, delta, dq, cu, *strides_in, dq.stride(0), dq.stride(1), *common),
                consts,
            )
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
    if not _HAS_TRITON:
        return "triton is not installed"
    if q.is_cuda:
        return None
    if q.device.type == "cpu" and _interpreting():
        if q.dtype == torch.bfloat16:
            return "bfloat16 tl.dot is not reliable under the Triton CPU interpreter (use fp16/fp32, or a GPU)"
        from ._triton_utils import interpreter_problem  # e.g. Triton 3.6's interpreter with NumPy >= 2.4

        return interpreter_problem()
    return f"tensors are on {q.device} and TRITON_INTERPRET=1 is not set (Triton needs CUDA or its interpreter)"


def _flash_triton(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    reason = _triton_unavailable_reason(q)
    if reason is not None:
        raise FlashAttentionUnavailable(f"flash_attention(backend='triton') cannot run: {reason}")
    if q.shape[-1] > _MAX_TRITON_HEADDIM:
        raise ValueError(f"flash_attention(backend='triton'): head dim {q.shape[-1]} > {_MAX_TRITON_HEADDIM}")
    # The kernels index the head dim with unit stride; other strides are free (e.g. views of a fused qkv).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if cu_seqlens is None:
        batch, seqlen, nheads, head_dim = q.shape
        flat = [t.reshape(batch * seqlen, nheads, head_dim) for t in (q, k, v)]
        o = _TritonFlashAttention.apply(*flat, None, batch, seqlen, seqlen, causal, scale)
        return o.view(batch, seqlen, nheads, head_dim)
    batch = cu_seqlens.numel() - 1
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
        return q.new_zeros(q.shape)
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
    try:
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


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ("triton" or "sdpa") that ``backend="auto"`` picks for tensors on ``device``."""
    if backend != "auto":
        return backend
    return "triton" if torch.device(device).type == "cuda" and _HAS_TRITON else "sdpa"


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
