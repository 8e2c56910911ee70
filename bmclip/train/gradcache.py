"""Forward/backward of one contrastive step, optionally as GradCache chunks that keep the loss global.

Plain accumulation (summing chunk losses) shrinks the contrastive problem to each chunk's negatives.
GradCache (Gao et al. 2021) keeps the full batch's negatives at chunk memory:

1. forward every chunk WITHOUT grad, keeping only the (B_chunk, D) features (and the RNG state before
   each chunk, so dropout / patch dropout can be replayed exactly);
2. compute the loss over the whole batch on leaf copies of the features, backward -> d loss / d feature
   (and d loss / d logit scale, bias);
3. re-forward each chunk WITH grad after restoring its RNG state and backpropagate the cached feature
   gradients through it (``<features, cached_grad>`` as the surrogate); parameter gradients accumulate.

The result equals one big forward/backward over the batch (up to float summation order), which the
tests check against a reference. Under DDP, chunks before the last run in ``no_sync`` so gradients are
all-reduced once; the logit scale/bias gradient is injected in the last chunk so every parameter takes
part in the synchronised backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _rng_capture(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _no_sync(model: nn.Module, last: bool):
    """Context that skips gradient all-reduce for non-last chunks (DDP no_sync / FSDP2 requires_sync)."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 module
        @contextlib.contextmanager
        def _fsdp():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return _fsdp()
    return contextlib.nullcontext()


def _nan_like(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan")


def forward_backward(model: nn.Module, images: torch.Tensor, input_ids: torch.Tensor, loss_fn: LossFn, *,
                     chunks: int = 1, autocast=contextlib.nullcontext, inject_nan: bool = False) -> torch.Tensor:
    """One training step's forward + backward over (images (B,3,H,W), input_ids (B,L)); returns the loss.

    ``chunks`` > 1 uses GradCache (see module docstring); ``autocast`` is a context factory
    (bf16 on CUDA). Gradients are ACCUMULATED into ``.grad`` (the caller zeroes them). ``inject_nan``
    replaces the loss with NaN (fault-injection tests). Returns the detached fp32 scalar loss.
    """
    b = images.shape[0]
    if chunks <= 1:
        with autocast():
            out = model(images, input_ids)
            feat_dtype = _loss_feature_dtype(images.device)
        loss = loss_fn(out["image_features"].to(feat_dtype), out["text_features"].to(feat_dtype),
                       out["logit_scale"].float(), _opt_float(out.get("logit_bias")))
        if inject_nan:
            loss = _nan_like(loss)
        loss.backward()
        return loss.detach()

    if b % chunks:
        raise ValueError(f"batch {b} is not divisible into {chunks} GradCache chunks")
    img_chunks = images.chunk(chunks)
    ids_chunks = input_ids.chunk(chunks)
    device = images.device

    # 1) features without grad, remembering the RNG state before each chunk.
    states, feats_i, feats_t = [], [], []
    scale = bias = None
    with torch.no_grad():
        for im, ids in zip(img_chunks, ids_chunks):
            states.append(_rng_capture(device))
            with autocast():
                out = model(im, ids)
                feat_dtype = _loss_feature_dtype(device)
            feats_i.append(out["image_features"].to(feat_dtype))
            feats_t.append(out["text_features"].to(feat_dtype))
            scale, bias = out["logit_scale"], out.get("logit_bias")

    # 2) the global loss on leaf copies -> gradients w.r.t. features, scale and bias.
    img = torch.cat(feats_i).requires_grad_(True)
    txt = torch.cat(feats_t).requires_grad_(True)
    scale_leaf = scale.detach().float().requires_grad_(True)
    bias_leaf = bias.detach().float().requires_grad_(True) if bias is not None else None
    loss = loss_fn(img, txt, scale_leaf, bias_leaf)
    if inject_nan:
        loss = _nan_like(loss)
    loss.backward()
    g_img = img.grad.chunk(chunks)
    g_txt = txt.grad.chunk(chunks)
    g_scale = scale_leaf.grad
    g_bias = bias_leaf.grad if bias_leaf is not None else None
    end_state = _rng_capture(device)

    # 3) replay each chunk with grad and push the cached feature gradients through it.
    for c, (im, ids) in enumerate(zip(img_chunks, ids_chunks)):
        last = c == chunks - 1
        _rng_restore(states[c], device)
        with _no_sync(model, last):
            with autocast():
                out = model(im, ids)
            sur = ((out["image_features"].float() * g_img[c].float()).sum()
                   + (out["text_features"].float() * g_txt[c].float()).sum())
            if last:
                sur = sur + (out["logit_scale"].float() * g_scale).sum()
                if g_bias is not None and out.get("logit_bias") is not None:
                    sur = sur + (out["logit_bias"].float() * g_bias).sum()
            sur.backward()
    _rng_restore(end_state, device)
    return loss.detach()


def _loss_feature_dtype(device: torch.device) -> torch.dtype:
    """The dtype the features reach the loss in, decided inside the model's autocast region.

    Under autocast (bf16 training) the features go to the loss in the autocast dtype, as open_clip's loss
    GEMMs run under autocast: the Triton loss then multiplies on tensor cores with fp32 accumulation and
    returns an fp32 loss and gradients in that dtype. Without autocast: fp32 (the exact path; fp64 test models
    are cast down as before). The logit scale and bias always stay fp32.
    """
    if torch.is_autocast_enabled(device.type):
        dt = torch.get_autocast_dtype(device.type)
        if dt in (torch.float16, torch.bfloat16):
            return dt
    return torch.float32


def _opt_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
