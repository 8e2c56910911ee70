"""Drop-in replacements for open_clip 3.3's ``ClipLoss`` and ``SigLipLoss``, memory-linear and exact under DDP.

Same constructor arguments and ``forward(image_features, text_features, logit_scale, logit_bias=None,
output_dict=False)`` as open_clip; three keyword-only extras: ``backend`` ("auto" | "triton" | "torch",
see ``contrastive.clip_loss``), ``group`` (a torch.distributed process group, default the world group)
and ``ring`` (below).

Single process (``world_size == 1``): the loss of the whole batch, values equal to open_clip's.

Distributed (``world_size > 1``; ``rank``/``world_size`` must match the process group, local batches
must be equal across ranks, as open_clip also requires). Every rank gathers the text features (B, D)
and works on its own image rows against all of them — a (B/n)×B block that is tiled, never
materialised. CLIP needs column log-sum-exps over *all* rows: each rank contributes per-column partial
LSEs over its rows and one all-reduce (max, then sum of exp; O(B) floats) merges them. The backward
recomputes the block, gives the complete gradient of the rank's image rows and a partial one of every
text row, and a reduce-scatter sums those partials onto the owners. Gradient convention: each rank's
own features receive the gradient of the *sum of all ranks' losses*, i.e. ``world_size × dL/dfeat``
for the global loss L — the convention of open_clip's ``gather_with_grad=True``, which DDP's gradient
averaging turns into exactly the single-process gradient of the global batch (tested with 2 and 3 gloo
ranks). Upstream gradients may differ per rank (loss weighting): the backward gathers them and weights
each column term by its owner's, so the summed gradients are exactly those of Σ_r g_r·loss_r.

open_clip flag mapping (``ClipLoss``):

=====================  ===============================  =========================================
local_loss             value returned on each rank      open_clip semantics reproduced
=====================  ===============================  =========================================
True                   this rank's share × world_size   open_clip's local loss: mean over local
                       (mean over ranks = global L)     image rows (→ all texts) and local text
                                                        rows (→ all images); same values
False                  the global loss L (all ranks)    open_clip's full-matrix loss; same value
=====================  ===============================  =========================================

``gather_with_grad``: both settings give the exact gradient above. open_clip's
``gather_with_grad=False`` drops gradient paths through other ranks' copies — with ``local_loss=True``
that truncates the text→image/image→text cross terms, with ``local_loss=False`` it scales the gradient
by 1/world_size after DDP averaging. Here the exact gradient costs the same (the reduce-scatter of
partial text gradients is needed anyway), so the flag is accepted for compatibility and has no effect.
``cache_labels`` has no effect (no label tensor exists). ``use_horovod=True`` is rejected (ValueError).

``ring=True`` (both modules): no (B, D) gather. Text chunks travel rank to rank by P2P
(``batch_isend_irecv``), the next hop in flight while the current (b×b) block computes; CLIP's column
LSE accumulators and, in the backward, the text-gradient accumulators travel with their chunk and
arrive back at the owner complete after ``world_size`` hops. Same values and gradients as the gather
path (tested at 2 and 3 ranks); memory per rank O(b·D) instead of O(B·D), for very large world sizes.

``SigLipLoss``: each rank returns open_clip's per-rank value Σ_{its image rows, all texts}
softplus(−z·x) / local_batch (mean over ranks = the single-process loss); gradients follow the same
convention as above, which is what open_clip's neighbour-exchange-with-grad produces. ``dist_impl``
('bidir', 'shift', 'reduce', 'gather') is validated as in open_clip; all compute the same exact loss
here, through the gather path (or the ring with ``ring=True``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .contrastive import (
    _resolve_backend,
    _save_inputs,
    _saved_inputs,
    _scale_bias_grads,
    as_scalar_tensor,
    block_backward,
    block_forward,
    check_features,
    clip_loss,
    positives,
    siglip_loss,
)

__all__ = ["ClipLoss", "SigLipLoss"]


def _dist():
    import torch.distributed as dist

    return dist


def _all_gather_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Concatenate every rank's (b, D) tensor along dim 0 → (world·b, D) (no autograd)."""
    dist = _dist()
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Sum (world·b, D) tensors over ranks and keep this rank's (b, D) slice."""
    dist = _dist()
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    rs(out, x, group=group)
    return out


def _all_reduce_lse(part: torch.Tensor, group) -> torch.Tensor:
    """Merge per-rank log-sum-exps (N,) into the global ones: max all-reduce, then sum of shifted exps."""
    dist = _dist()
    m = part.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(part - m)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return m + torch.log(s)


def _check_dist(rank: int, world: int, group, img: torch.Tensor, who: str) -> None:
    dist = _dist()
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
    _dist().all_reduce(loss, group=group)
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
        row, colpart = block_forward(img, txt_all, scale, bias, off, 0, True, backend)
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
        dI, dT_all, ds, db = block_backward(img, txt_all, scale, bias, rank * b, 0, row, col, rc, cc, None,
                                            torch.float32, backend)
        dT = _reduce_scatter_rows(dT_all, group, world)
        return (dI.to(img.dtype), dT.to(img.dtype),
                *_scale_bias_grads(ctx, ds, db, scale, bias), None, None, None, None, None)


class _DistSigLipFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, scale, bias, group, rank, world, backend):
        b = img.shape[0]
        txt_all = _all_gather_rows(txt, group, world)
        row, _ = block_forward(img, txt_all, scale, bias, rank * b, 1, False, backend)
        _save_inputs(ctx, img, txt_all, scale, bias)
        ctx.cfg = (group, rank, world, backend)
        return row.sum() / b

    @staticmethod
    def backward(ctx, g):
        img, txt_all, scale, bias = _saved_inputs(ctx)
        group, rank, world, backend = ctx.cfg
        b = img.shape[0]
        coef = g.detach().float().reshape(()) / b
        dI, dT_all, ds, db = block_backward(img, txt_all, scale, bias, rank * b, 1, None, None, None, None, coef,
                                            torch.float32, backend)
        dT = _reduce_scatter_rows(dT_all, group, world)
        return (dI.to(img.dtype), dT.to(img.dtype),
                *_scale_bias_grads(ctx, ds, db, scale, bias), None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# Ring variant: features travel rank to rank (P2P) while the current block computes; no (B, D) gather
# ----------------------------------------------------------------------------------------------------
def _ring_peers(group, rank: int, world: int) -> tuple[int, int]:
    """(left, right) neighbours as global ranks (P2P ops take global ranks)."""
    dist = _dist()
    left, right = (rank - 1) % world, (rank + 1) % world
    if group is not None:
        left, right = dist.get_global_rank(group, left), dist.get_global_rank(group, right)
    return left, right


def _ring_start(sends, peers, group):
    """Post sends to the right neighbour and same-shaped receives from the left; returns (requests, bufs)."""
    dist = _dist()
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
            r_blk, c_blk = block_forward(img, chunk, scale, bias, (rank - k) * b, 0, True, backend)
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
            dA, dC, ds_k, db_k = block_backward(img, chunk, scale, bias, (rank - k) * b, 0, row, lse_k, rc, cc,
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
            r_blk, _ = block_forward(img, chunk, scale, bias, (rank - k) * b, 1, False, backend)
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
            dA, dC, ds_k, db_k = block_backward(img, chunk, scale, bias, (rank - k) * b, 1, None, None, None, None,
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


class ClipLoss(nn.Module):
    """open_clip-compatible CLIP loss module: (B_local, D) features → scalar loss (fp32), memory-linear."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, backend="auto", group=None, ring=False):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss: use_horovod=True is not supported; use torch.distributed")
        if world_size < 1 or not (0 <= rank < world_size):
            raise ValueError(f"ClipLoss: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.group = group
        self.ring = ring

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        """Loss of this rank (see module docstring); a dict {"contrastive_loss": loss} if output_dict."""
        if self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            img, txt = check_features(image_features, text_features, "ClipLoss")
            scale = as_scalar_tensor(logit_scale, img, "logit_scale")
            bias = as_scalar_tensor(logit_bias, img, "logit_bias")
            be = _resolve_backend(self.backend, img, txt)
            _check_dist(self.rank, self.world_size, self.group, img, "ClipLoss")
            fn = _RingClipFn if self.ring else _DistClipFn
            loss = fn.apply(img, txt, scale, bias, self.group, self.rank, self.world_size, bool(self.local_loss), be)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip-compatible SigLIP loss module: (B_local, D) features → scalar loss (fp32), memory-linear."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, *, backend="auto", group=None,
                 ring=False):
        super().__init__()
        if world_size < 1 or not (0 <= rank < world_size):
            raise ValueError(f"SigLipLoss: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"SigLipLoss: dist_impl must be one of bidir/shift/reduce/gather, got {dist_impl!r}")
        self.backend = backend
        self.group = group
        self.ring = ring

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        """Loss of this rank (see module docstring); a dict {"contrastive_loss": loss} if output_dict."""
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            img, txt = check_features(image_features, text_features, "SigLipLoss")
            scale = as_scalar_tensor(logit_scale, img, "logit_scale")
            bias = as_scalar_tensor(logit_bias, img, "logit_bias")
            be = _resolve_backend(self.backend, img, txt)
            _check_dist(self.rank, self.world_size, self.group, img, "SigLipLoss")
            fn = _RingSigLipFn if self.ring else _DistSigLipFn
            loss = fn.apply(img, txt, scale, bias, self.group, self.rank, self.world_size, be)
        return {"contrastive_loss": loss} if output_dict else loss
