"""Distributed autograd of the contrastive losses: gather / all-reduce / reduce-scatter, and the P2P ring.

Each rank computes its own image rows against the text of all ranks (a (B/n)×B block, never materialised)
through ``contrastive.block_forward`` / ``block_backward``; the collectives merge CLIP's column LSEs and sum
the text-gradient partials onto their owners. The ring variant passes text chunks (and their accumulators)
rank to rank instead of gathering. Semantics and gradient conventions: see ``losses.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .contrastive import (
    CLIP,
    SIGLIP,
    _save_inputs,
    _saved_inputs,
    _scale_bias_grads,
    block_backward,
    block_forward,
    positives,
)

__all__ = ["DistClipFn", "DistSigLipFn", "RingClipFn", "RingSigLipFn", "check_dist"]


def _all_gather_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Concatenate every rank's (b, D) tensor along dim 0 → (world·b, D) (no autograd)."""
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Sum (world·b, D) tensors over ranks and keep this rank's (b, D) slice."""
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    rs(out, x, group=group)
    return out


def _all_reduce_lse(part: torch.Tensor, group) -> torch.Tensor:
    """Merge per-rank log-sum-exps (N,) into the global ones: max all-reduce, then sum of shifted exps."""
    m = part.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(part - m)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return m + torch.log(s)


def _check_dist(rank: int, world: int, group, img: torch.Tensor, who: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who}(world_size={world}) needs an initialised torch.distributed process group")
    if dist.get_world_size(group) != world or dist.get_rank(group) != rank:
        raise ValueError(f"{who}: rank/world_size ({rank}/{world}) do not match the process group "
                         f"({dist.get_rank(group)}/{dist.get_world_size(group)})")
    # Equal local shapes on all ranks (the gather/scatter layout assumes it); a tiny collective.
    shape = torch.tensor([img.shape[0], img.shape[1]], dtype=torch.int64, device=img.device)
    shapes = _all_gather_rows(shape.reshape(1, 2), group, world)
    if not bool((shapes == shape).all()):
        raise ValueError(f"{who}: local feature shapes differ across ranks {shapes.tolist()}; every rank "
                         "must hold the same (local_batch, D)")


def _rank_loss(share, local_loss: bool, world: int, group):
    """This rank's returned loss from its share of the global loss (open_clip's local_loss convention)."""
    if local_loss:
        return share * world
    loss = share.clone()
    dist.all_reduce(loss, group=group)
    return loss


def _clip_grad_coefs(g, group, rank: int, world: int, b: int, local_loss: bool):
    """Row coefficients (b,) for this rank's rows and column coefficients (world*b,) for every column.

    Upstream grads of every rank are gathered: the column terms of rank k's loss are scaled by rank k's g.
    """
    B = world * b
    gs = _all_gather_rows(g.detach().float().reshape(1, 1), group, world).reshape(world)
    if local_loss:
        rc = (gs[rank] * world / (2.0 * B)).expand(b).contiguous()
        cc = (gs * world / (2.0 * B)).repeat_interleave(b).contiguous()
    else:
        tot = gs.sum() / (2.0 * B)
        rc = tot.expand(b).contiguous()
        cc = tot.expand(B).contiguous()
    return rc, cc


class _DistClipFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, group, rank, world, local_loss, backend):
        b = img.shape[0]
        B = world * b
        off = rank * b
        txt_all = _all_gather_rows(txt, group, world)
        row, colpart = block_forward(img, txt_all, scale, bias, off, CLIP, True, backend)
        col = _all_reduce_lse(colpart, group)
        pos = positives(img, txt_all, scale, bias, off)
        share = (row.sum() + col[off:off + b].sum() - 2.0 * pos.sum()) / (2.0 * B)
        loss = _rank_loss(share, local_loss, world, group)
        _save_inputs(ctx, img, txt_all, scale, bias, row, col)
        ctx.cfg = (group, rank, world, local_loss, backend)
        return loss

    @staticmethod
    def backward(ctx, g):
        img, txt_all, scale, bias, row, col = _saved_inputs(ctx)
        group, rank, world, local_loss, backend = ctx.cfg
        b = img.shape[0]
        rc, cc = _clip_grad_coefs(g, group, rank, world, b, local_loss)
        dI, dT_all, ds, db = block_backward(img, txt_all, scale, bias, rank * b, CLIP, row, col, rc, cc, None,
                                            torch.float32, backend)
        dT = _reduce_scatter_rows(dT_all, group, world)
        return (dI.to(img.dtype), dT.to(img.dtype),
                *_scale_bias_grads(ctx, ds, db, scale, bias), None, None, None, None, None)


class _DistSigLipFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, group, rank, world, backend):
        b = img.shape[0]
        txt_all = _all_gather_rows(txt, group, world)
        row, _ = block_forward(img, txt_all, scale, bias, rank * b, SIGLIP, False, backend)
        _save_inputs(ctx, img, txt_all, scale, bias)
        ctx.cfg = (group, rank, world, backend)
        return row.sum() / b

    @staticmethod
    def backward(ctx, g):
        img, txt_all, scale, bias = _saved_inputs(ctx)
        group, rank, world, backend = ctx.cfg
        b = img.shape[0]
        coef = g.detach().float().reshape(()) / b
        dI, dT_all, ds, db = block_backward(img, txt_all, scale, bias, rank * b, SIGLIP, None, None, None, None, coef,
                                            torch.float32, backend)
        dT = _reduce_scatter_rows(dT_all, group, world)
        return (dI.to(img.dtype), dT.to(img.dtype),
                *_scale_bias_grads(ctx, ds, db, scale, bias), None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# Ring variant: features travel rank to rank (P2P) while the current block computes; no (B, D) gather
# ----------------------------------------------------------------------------------------------------
def _ring_peers(group, rank: int, world: int) -> tuple[int, int]:
    """(left, right) neighbours as global ranks (P2P ops take global ranks)."""
    left, right = (rank - 1) % world, (rank + 1) % world
    if group is not None:
        left, right = dist.get_global_rank(group, left), dist.get_global_rank(group, right)
    return left, right


def _ring_start(sends, peers, group):
    """Post sends to the right neighbour and same-shaped receives from the left; returns (requests, bufs)."""
    left, right = peers
    sends = [t.contiguous() for t in sends]
    recvs = [torch.empty_like(t) for t in sends]
    ops = [dist.P2POp(dist.isend, t, right, group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, left, group) for t in recvs]
    return (dist.batch_isend_irecv(ops), sends), recvs


def _ring_wait(handle) -> None:
    reqs, _keepalive = handle
    for q in reqs:
        q.wait()


class _RingClipFn(torch.autograd.Function):
    # Forward: text chunk k visits every rank with its column-LSE accumulator; each rank merges its
    # rows' partial column LSE into it, and after `world` hops the accumulator is back at its owner,
    # complete. Backward: (text chunk, its column LSE) travel again with a dT accumulator.
    @staticmethod
    def forward(ctx, img, txt, scale, bias, group, rank, world, local_loss, backend):
        b = img.shape[0]
        B = world * b
        peers = _ring_peers(group, rank, world)
        row = torch.full((b,), float("-inf"), dtype=torch.float32, device=img.device)
        acc_in = torch.full((b,), float("-inf"), dtype=torch.float32, device=img.device)
        chunk = txt.contiguous()
        for t in range(world):
            k = (rank - t) % world
            hop = _ring_start([chunk], peers, group) if t < world - 1 else None  # overlaps the block
            r_blk, c_blk = block_forward(img, chunk, scale, bias, (rank - k) * b, CLIP, True, backend)
            row = torch.logaddexp(row, r_blk)
            h_acc, (acc_in,) = _ring_start([torch.logaddexp(acc_in, c_blk)], peers, group)
            _ring_wait(h_acc)
            if hop is not None:
                _ring_wait(hop[0])
                chunk = hop[1][0]
        col = acc_in  # own columns, merged over all ranks' rows
        pos = positives(img, txt, scale, bias, 0)
        share = (row.sum() + col.sum() - 2.0 * pos.sum()) / (2.0 * B)
        loss = _rank_loss(share, local_loss, world, group)
        _save_inputs(ctx, img, txt, scale, bias, row, col)
        ctx.cfg = (group, rank, world, local_loss, backend)
        return loss

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias, row, col = _saved_inputs(ctx)
        group, rank, world, local_loss, backend = ctx.cfg
        b = img.shape[0]
        peers = _ring_peers(group, rank, world)
        rc, cc_all = _clip_grad_coefs(g, group, rank, world, b, local_loss)
        dI = torch.zeros(img.shape, dtype=torch.float32, device=img.device)
        ds = torch.zeros((), dtype=torch.float32, device=img.device)
        db = torch.zeros((), dtype=torch.float32, device=img.device)
        chunk, lse_k = txt.contiguous(), col
        acc_in = torch.zeros(txt.shape, dtype=torch.float32, device=img.device)
        for t in range(world):
            k = (rank - t) % world
            hop = _ring_start([chunk, lse_k], peers, group) if t < world - 1 else None
            cc = cc_all[k * b:(k + 1) * b].contiguous()
            dA, dC, ds_k, db_k = block_backward(img, chunk, scale, bias, (rank - k) * b, CLIP, row, lse_k, rc, cc,
                                                None, torch.float32, backend)
            dI += dA
            ds += ds_k
            db += db_k
            h_acc, (acc_in,) = _ring_start([acc_in + dC], peers, group)
            _ring_wait(h_acc)
            if hop is not None:
                _ring_wait(hop[0])
                chunk, lse_k = hop[1]
        return (dI.to(img.dtype), acc_in.to(img.dtype),
                *_scale_bias_grads(ctx, ds, db, scale, bias), None, None, None, None, None)


class _RingSigLipFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, group, rank, world, backend):
        b = img.shape[0]
        peers = _ring_peers(group, rank, world)
        total = torch.zeros((), dtype=torch.float32, device=img.device)
        chunk = txt.contiguous()
        for t in range(world):
            k = (rank - t) % world
            hop = _ring_start([chunk], peers, group) if t < world - 1 else None
            r_blk, _ = block_forward(img, chunk, scale, bias, (rank - k) * b, SIGLIP, False, backend)
            total = total + r_blk.sum()
            if hop is not None:
                _ring_wait(hop[0])
                chunk = hop[1][0]
        _save_inputs(ctx, img, txt, scale, bias)
        ctx.cfg = (group, rank, world, backend)
        return total / b

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias = _saved_inputs(ctx)
        group, rank, world, backend = ctx.cfg
        b = img.shape[0]
        peers = _ring_peers(group, rank, world)
        coef = g.detach().float().reshape(()) / b
        dI = torch.zeros(img.shape, dtype=torch.float32, device=img.device)
        ds = torch.zeros((), dtype=torch.float32, device=img.device)
        db = torch.zeros((), dtype=torch.float32, device=img.device)
        chunk = txt.contiguous()
        acc_in = torch.zeros(txt.shape, dtype=torch.float32, device=img.device)
        for t in range(world):
            k = (rank - t) % world
            hop = _ring_start([chunk], peers, group) if t < world - 1 else None
            dA, dC, ds_k, db_k = block_backward(img, chunk, scale, bias, (rank - k) * b, SIGLIP, None, None, None, None,
                                                coef, torch.float32, backend)
            dI += dA
            ds += ds_k
            db += db_k
            h_acc, (acc_in,) = _ring_start([acc_in + dC], peers, group)
            _ring_wait(h_acc)
            if hop is not None:
                _ring_wait(hop[0])
                chunk = hop[1][0]
        return (dI.to(img.dtype), acc_in.to(img.dtype),
                *_scale_bias_grads(ctx, ds, db, scale, bias), None, None, None, None)


# public names for losses.py
DistClipFn, DistSigLipFn, RingClipFn, RingSigLipFn = _DistClipFn, _DistSigLipFn, _RingClipFn, _RingSigLipFn
check_dist = _check_dist
