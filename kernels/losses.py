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
``cache_labels`` only affects ``get_ground_truth`` (the fused loss has no label tensor).
``use_horovod=True`` is rejected (ValueError).

``ring=True`` (both modules): no (B, D) gather. Text chunks travel rank to rank by P2P
(``batch_isend_irecv``), the next hop in flight while the current (b×b) block computes; CLIP's column
LSE accumulators and, in the backward, the text-gradient accumulators travel with their chunk and
arrive back at the owner complete after ``world_size`` hops. Same values and gradients as the gather
path (tested at 2 and 3 ranks); memory per rank O(b·D) instead of O(B·D), for very large world sizes.

open_clip's extension points: ``ClipLoss.get_logits(image_features, text_features, logit_scale,
logit_bias=None)`` → (logits_per_image, logits_per_text) and ``get_ground_truth(device, num_logits)`` → labels;
``SigLipLoss.get_logits(...)`` → logits, ``get_ground_truth(device, dtype, num_logits, negative_only=False)`` → ±1
labels and ``_loss(...)``. Same signatures, values, shapes and dtypes as open_clip 3.3's (under
torch.distributed ``ClipLoss.get_logits`` gathers features as open_clip's does, honouring ``local_loss`` and
``gather_with_grad``; ``cache_labels`` caches the labels). These materialise the B×B logits by
definition; they are what CoCaLoss/DistillClipLoss-style subclasses call from their own ``forward``.
``forward`` itself stays fused and never calls them, *unless a subclass overrides one of them*: then
``forward`` runs open_clip's materialised formulation through the overrides (ClipLoss: cross-entropies of
``self.get_logits`` against ``self.get_ground_truth``; SigLipLoss: ``self._loss``), so a subclass that
reshapes the logits is honoured exactly as in open_clip, at open_clip's B×B memory cost. (SigLipLoss with
overrides needs ``world_size == 1``; open_clip's neighbour exchange is not reproduced.)

Dtypes: fp32/fp16/bf16 features give an fp32 loss (open_clip's follows the logits' dtype); float64
features give a float64 loss and float64 gradients, computed on the torch backend (``"auto"`` picks it;
``backend="triton"`` raises ``BackendUnavailable``), single process only (``world_size > 1`` raises TypeError).

``SigLipLoss``: each rank returns open_clip's per-rank value Σ_{its image rows, all texts}
softplus(−z·x) / local_batch (mean over ranks = the single-process loss); gradients follow the same
convention as above, which is what open_clip's neighbour-exchange-with-grad produces. ``dist_impl``
('bidir', 'shift', 'reduce', 'gather') is validated as in open_clip; all compute the same exact loss
here, through the gather path (or the ring with ``ring=True``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .contrastive import _resolve_backend, as_scalar_tensor, check_features, clip_loss, siglip_loss
from .contrastive_dist import DistClipFn, DistSigLipFn, RingClipFn, RingSigLipFn, check_dist

__all__ = ["ClipLoss", "SigLipLoss"]


def _dist_inputs(module, image_features, text_features, logit_scale, logit_bias, name):
    """The checked inputs of a distributed forward: (img, txt, scale, bias, backend)."""
    img, txt = check_features(image_features, text_features, name)
    if img.dtype == torch.float64:
        raise TypeError(f"{name}: float64 features are supported with world_size == 1 only (the distributed "
                        "path accumulates in float32); cast them to float32")
    scale = as_scalar_tensor(logit_scale, img, "logit_scale")
    bias = as_scalar_tensor(logit_bias, img, "logit_bias")
    be = _resolve_backend(module.backend, img, txt)
    check_dist(module.rank, module.world_size, module.group, img, name)
    return img, txt, scale, bias, be


class _AllGatherWithGrad(torch.autograd.Function):
    """All ranks' rows concatenated; the backward sums every rank's gradient of the whole and returns this
    rank's rows of it (the gradient paths through the other ranks' copies included)."""

    @staticmethod
    def forward(ctx, t, group, world_size, rank):
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, rank, t.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None


def _gather(t, group, world_size, rank, with_grad, keep_local):
    """All ranks' (b, D) rows concatenated in rank order (open_clip's gather_features, one tensor)."""
    if with_grad:
        return _AllGatherWithGrad.apply(t, group, world_size, rank)
    parts = [torch.zeros_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    if keep_local:  # gradient for this rank's own rows when the gathered copies carry none
        parts[rank] = t
    return torch.cat(parts, dim=0)


def _overrides(obj, base, names) -> bool:
    return any(getattr(type(obj), n) is not getattr(base, n) for n in names)


class ClipLoss(nn.Module):
    """open_clip-compatible CLIP loss module: (B_local, D) features → scalar loss (fp32; float64 for float64
    features), memory-linear."""

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
        # label cache of get_ground_truth (open_clip's attributes)
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """Class indices (num_logits,) int64 on ``device``: 0..num_logits−1, shifted by ``num_logits·rank``
        under ``local_loss`` with world_size > 1; cached per device when ``cache_labels`` (as open_clip)."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """(logits_per_image, logits_per_text), open_clip's: ``logit_scale·I·Tᵀ (+ logit_bias)`` and
        ``logit_scale·T·Iᵀ (+ logit_bias)`` in the features' dtype, with autograd. Materialises the logit
        matrices by definition (B×B single process; under torch.distributed, features of all ranks are
        gathered: (b, B) with ``local_loss``, else (B, B)). One difference: with world_size > 1 and
        ``local_loss=False`` open_clip 3.3 adds ``logit_bias`` twice (its logits_per_text is a view of
        logits_per_image and both are shifted in place); here it is added once. The cross-entropies do
        not change under that constant shift, so the losses agree."""
        if self.world_size > 1:
            keep = not self.local_loss
            all_img = _gather(image_features, self.group, self.world_size, self.rank, self.gather_with_grad, keep)
            all_txt = _gather(text_features, self.group, self.world_size, self.rank, self.gather_with_grad, keep)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_txt.T
                logits_per_text = logit_scale * text_features @ all_img.T
            else:
                logits_per_image = logit_scale * all_img @ all_txt.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def _materialised_forward(self, image_features, text_features, logit_scale, logit_bias):
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale,
                                                            logit_bias=logit_bias)
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        """Loss of this rank (see module docstring); a dict {"contrastive_loss": loss} if output_dict.

        Fused (no B×B logits) unless a subclass overrides ``get_logits``/``get_ground_truth``: then
        open_clip's materialised formula through those overrides."""
        if _overrides(self, ClipLoss, ("get_logits", "get_ground_truth")):
            loss = self._materialised_forward(image_features, text_features, logit_scale, logit_bias)
        elif self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            img, txt, scale, bias, be = _dist_inputs(self, image_features, text_features, logit_scale, logit_bias,
                                                     "ClipLoss")
            fn = RingClipFn if self.ring else DistClipFn
            loss = fn.apply(img, txt, scale, bias, self.group, self.rank, self.world_size, bool(self.local_loss), be)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip-compatible SigLIP loss module: (B_local, D) features → scalar loss (fp32; float64 for float64
    features), memory-linear."""

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
        self.prev_num_logits = 0  # open_clip's attributes (its SigLipLoss does not cache either)
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """(num_logits, num_logits) labels of ``dtype``: +1 on the diagonal, −1 elsewhere (all −1 when
        ``negative_only``), as open_clip's."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``logit_scale·I·Tᵀ (+ logit_bias)`` (B, B) in the features' dtype, with autograd —
        materialised by definition (the local block: no gathering, as open_clip's)."""
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        return logits

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        """open_clip's materialised block loss Σ −logσ(labels·logits) / B through get_logits/get_ground_truth."""
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, image_features.dtype, image_features.shape[0],
                                       negative_only=negative_only)
        return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        """Loss of this rank (see module docstring); a dict {"contrastive_loss": loss} if output_dict.

        Fused (no B×B logits) unless a subclass overrides ``get_logits``/``get_ground_truth``/``_loss``:
        then open_clip's materialised ``self._loss`` (world_size 1 only)."""
        if _overrides(self, SigLipLoss, ("get_logits", "get_ground_truth", "_loss")):
            if self.world_size > 1:
                raise NotImplementedError("SigLipLoss: a subclass overriding get_logits/get_ground_truth/_loss "
                                          "runs open_clip's materialised loss, supported with world_size == 1 "
                                          "only")
            loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        elif self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            img, txt, scale, bias, be = _dist_inputs(self, image_features, text_features, logit_scale, logit_bias,
                                                     "SigLipLoss")
            fn = RingSigLipFn if self.ring else DistSigLipFn
            loss = fn.apply(img, txt, scale, bias, self.group, self.rank, self.world_size, be)
        return {"contrastive_loss": loss} if output_dict else loss
