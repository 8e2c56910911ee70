"""The one image normalisation of bmclip: uint8 NHWC batches -> normalised float NCHW on a device.

The trainer (C++ loader path), validation, the demo and the loader benchmarks call
:func:`normalize_images`; the DALI pipelines (``bmclip.data.dali``) normalise inside DALI with the same
constants (``bmclip.data.images.IMAGE_MEAN`` / ``IMAGE_STD``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from bmclip.data.images import IMAGE_MEAN, IMAGE_STD
from bmclip.errors import ConfigError

__all__ = ["normalize_images"]


def normalize_images(
    images: torch.Tensor,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NHWC ``[N, H, W, 3]`` -> ``dtype`` NCHW ``[N, 3, H, W]``, ``(x/255 - mean)/std``, on ``device``.

    The uint8 batch is copied to ``device`` first (4x fewer bytes than float32; non-blocking when it is
    pinned) and the arithmetic runs there in float32 before the cast to ``dtype``. The result is
    contiguous NCHW, or with ``channels_last=True`` the channels_last-strided NCHW tensor the
    arithmetic produces anyway (no extra copy; convolutions/patch embeddings accept it).
    ``device=None`` keeps the batch where it is.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ConfigError(f"normalize_images expects uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    dev = torch.device(device) if device is not None else images.device
    if dev.type == "cuda" and dev.index is None:  # the cached constants live on one definite device
        dev = torch.device("cuda", torch.cuda.current_device())
    x = images.to(dev, non_blocking=True).permute(0, 3, 1, 2)
    scale, shift = _scale_shift(dev, tuple(float(m) for m in mean), tuple(float(s) for s in std))
    # (x/255 - mean)/std == x * (1/(255 std)) - mean/std: one multiply-add per element
    out = torch.addcmul(shift, x.float(), scale).to(dtype)
    return out if channels_last else out.contiguous()


@functools.lru_cache(maxsize=16)
def _scale_shift(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]):
    # Cached per device: building them every step would be a synchronous host-to-device copy per batch.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return scale, shift
