"""BiomedCLIP's evaluation image transform (open_clip's val transform), on PIL + numpy + torch.

The one copy used everywhere an image is prepared for a model outside training (``bmclip embed``, every
``bmclip eval`` command, VQA): shorter side resized to S (bicubic), centre crop to S x S, RGB, scaled to
[0, 1], normalised per channel. The geometry runs in the image's own mode and the RGB conversion last, in
open_clip's order, so the pixels are open_clip's for every mode (Pillow resizes RGBA/LA with premultiplied alpha,
so transparent pixels go black, and palette/1-bit images with nearest neighbour); the one deviation is high bit
depth greyscale (16-bit, float: CT, microscopy), min/max scaled to 8 bits first where ``convert("RGB")`` clips.
``resize_center_crop`` is the geometric half (uint8 batches for the evaluation readers); the numeric half is
the trainer's own ``bmclip.data.normalize.normalize_images``, so a model sees the same numbers in training and in
evaluation. ``preprocess_image`` chains them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bmclip.data.images import IMAGE_MEAN, IMAGE_STD, minmax_to_uint8, pil_to_8bit, pil_to_rgb
from bmclip.data.normalize import normalize_images
from bmclip.errors import DataError

__all__ = ["load_image", "minmax_to_uint8", "pil_to_rgb", "preprocess_image", "resize_center_crop"]


_MAX_RESIZED_SQUARES = 16  # aspect ratio up to which the whole image is resized before the crop, as torchvision


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """PIL image -> RGB PIL image of ``size x size``: shorter side resized to ``size`` (bicubic), centre crop, in the
    image's own mode, then RGB (open_clip's order: see the module docstring)."""
    if not isinstance(image, Image.Image):
        raise DataError(f"expected a PIL image, got {type(image).__name__}")
    return pil_to_rgb(_resize_center_crop(pil_to_8bit(image), size))


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if w < 1 or h < 1:
        raise DataError(f"empty image of size {image.size}")
    # torchvision's Resize(size) + CenterCrop(size) arithmetic, as in open_clip's val transform (long side
    # truncated, crop offset rounded), so BiomedCLIP sees exactly the pixels it was evaluated on.
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    if nw * nh > _MAX_RESIZED_SQUARES * size * size:
        # A strip (1 x 120000 px is a 545-byte PNG) would be resized whole to 224 x 27M first: resample only the
        # crop's box of the source instead (bounded memory; within a few grey levels of the whole resize).
        sx, sy = w / nw, h / nh
        return image.resize((size, size), Image.BICUBIC,
                            box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, image_size: int = 224, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> torch.Tensor:
    """PIL image -> float32 (3, S, S): shorter side resized to S (bicubic), centre crop, RGB, normalised."""
    pixels = np.asarray(resize_center_crop(image, image_size), dtype=np.uint8)
    x = torch.from_numpy(pixels.copy())[None]
    return normalize_images(x, mean=IMAGE_MEAN if mean is None else mean, std=IMAGE_STD if std is None else std)[0]


def load_image(path: str | os.PathLike, image_size: int = 224) -> torch.Tensor:
    """Image file -> float32 (3, S, S) normalised; unreadable files raise DataError naming the path."""
    try:
        with Image.open(path) as im:
            im.load()
            return preprocess_image(im, image_size)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
