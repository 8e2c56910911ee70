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

import torch.nn as nn

from .contrastive import _resolve_backend, as_scalar_tensor, check_features, clip_loss, siglip_loss
from .contrastive_dist import DistClipFn, DistSigLipFn, RingClipFn, RingSigLipFn, check_dist

__all__ = ["ClipLoss", "SigLipLoss"]


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
            check_dist(self.rank, self.world_size, self.group, img, "ClipLoss")
            fn = RingClipFn if self.ring else DistClipFn
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
            check_dist(self.rank, self.world_size, self.group, img, "SigLipLoss")
            fn = RingSigLipFn if self.ring else DistSigLipFn
            loss = fn.apply(img, txt, scale, bias, self.group, self.rank, self.world_size, be)
        return {"contrastive_loss": loss} if output_dict else loss
