"""Chunked torch reference blocks of the contrastive losses: O(chunk·N) memory, recompute in the backward.

The same block primitives as the Triton kernels (``contrastive_triton.py``), in plain torch with fp32 math
(float64 math for float64 features, which only this backend takes):
rows ``A`` (M, D) against columns ``C`` (N, D), logits ``x_ij = s·A_i·C_j + b``, positives at ``j = i + off``.
Rows are processed in chunks of ``_chunk_rows(N)`` so a chunk's fp32 logits take 64 MiB whatever B is.
Imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["CLIP", "SIGLIP", "torch_forward", "torch_backward", "positives_fp32"]

# Loss kinds (a kernel constexpr on the Triton side).
CLIP = 0
SIGLIP = 1

# rows per chunk = max(1, _TORCH_CHUNK_ELEMS // N), so a chunk's fp32 logits take 64 MiB.
_TORCH_CHUNK_ELEMS = 1 << 24


def _chunk_rows(N: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMS // max(1, N))


def acc_dtype(A: torch.Tensor) -> torch.dtype:
    """Math/accumulation dtype: float64 for float64 features, fp32 for fp32/fp16/bf16."""
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def _diag_index(r0: int, r1: int, off: int, N: int, device):
    """(local row idx, col idx) of the positives j = i + off that fall in rows [r0, r1) and cols [0, N)."""
    lo = max(r0, -off)
    hi = min(r1, N - off)
    if hi <= lo:
        return None
    i = torch.arange(lo, hi, device=device)
    return i - r0, i + off


def torch_forward(A, C, scale, bias, off, loss, need_col):
    """CLIP → (row LSE (M,), column LSE over these rows (N,) or None); SigLIP → (row softplus sums, None)."""
    M = A.shape[0]
    N = C.shape[0]
    acc = acc_dtype(A)
    s = scale.detach().reshape(()).to(acc)
    b = bias.detach().reshape(()).to(acc) if bias is not None else None
    Cf = C.to(acc)
    row = torch.empty(M, dtype=acc, device=A.device)
    col = torch.full((N,), float("-inf"), dtype=acc, device=A.device) if (loss == CLIP and need_col) else None
    step = _chunk_rows(N)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        x = A[r0:r1].to(acc) @ Cf.T
        x.mul_(s)
        if b is not None:
            x.add_(b)
        if loss == CLIP:
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


def torch_backward(A, C, scale, bias, off, loss, row_lse, col_lse, row_coef, col_coef, sig_coef, out_dtype):
    """(dA (M, D), dC (N, D), d scale (), d bias ()) from the dL/dx coefficients (see ``contrastive.py``)."""
    M, D = A.shape
    N = C.shape[0]
    acc = acc_dtype(A)
    s = scale.detach().reshape(()).to(acc)
    b = bias.detach().reshape(()).to(acc) if bias is not None else None
    Cf = C.to(acc)
    dA = torch.empty((M, D), dtype=out_dtype, device=A.device)
    dC = torch.zeros((N, D), dtype=acc, device=A.device)
    ds = torch.zeros((), dtype=torch.float64, device=A.device)  # float64 sums, returned in ``acc``
    db = torch.zeros((), dtype=torch.float64, device=A.device)
    step = _chunk_rows(N)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        Af = A[r0:r1].to(acc)
        raw = Af @ Cf.T
        x = raw * s
        if b is not None:
            x.add_(b)
        di = _diag_index(r0, r1, off, N, A.device)
        if loss == CLIP:
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
            x.mul_(sig_coef.reshape(()).to(acc))
        # d scale / d bias sum B×B terms of both signs that cancel heavily: one dot product per row (no
        # temporary of the chunk's size), then the rows summed in float64, so that the result does not depend
        # on how a single B×B-long fp32 reduction is split over threads.
        ds += torch.bmm(x.unsqueeze(1), raw.unsqueeze(2)).reshape(-1).sum(dtype=torch.float64)
        db += x.sum(dim=1).sum(dtype=torch.float64)
        del raw
        dA[r0:r1] = (x @ Cf).mul_(s).to(out_dtype)
        dC.addmm_(x.T, Af)
        del x, Af
    dC.mul_(s)
    return dA, dC.to(out_dtype), ds.to(acc), db.to(acc)


def positives_fp32(A, C, scale, bias, off):
    """Positive logits x_{i, i+off} (M,) in fp32 (float64 for float64 features; C must hold rows off .. off+M−1)."""
    M, D = A.shape
    acc = acc_dtype(A)
    x = torch.empty(M, dtype=acc, device=A.device)
    step = max(1, (1 << 22) // D)  # row chunks: fp32 temporaries stay at ~16 MB whatever B is
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        x[r0:r1] = (A[r0:r1].to(acc) * C[off + r0:off + r1].to(acc)).sum(dim=1)
    x = x * scale.detach().reshape(()).to(acc)
    if bias is not None:
        x = x + bias.detach().reshape(()).to(acc)
    return x
