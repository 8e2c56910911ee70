"""Evaluation image preprocessing of BiomedCLIP (open_clip's val transform), on PIL + numpy only."""

from __future__ import annotations

import numpy as np
import torch

from bmclip.errors import DataError


def preprocess_image(image, image_size: int = 224, mean=None, std=None) -> torch.Tensor:
    """PIL image -> float32 (3, S, S): shorter side resized to S (bicubic), centre crop, RGB, normalised."""
    from PIL import Image

    from bmclip.model import IMAGE_MEAN, IMAGE_STD

    if not isinstance(image, Image.Image):
        raise DataError(f"expected a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    w, h = image.size
    if w < 1 or h < 1:
        raise DataError(f"empty image of size {image.size}")
    # open_clip: Resize(S, bicubic) on the shorter side, then CenterCrop(S) (torchvision rounding rules).
    if w <= h:
        nw, nh = image_size, int(image_size * h / w)
    else:
        nw, nh = int(image_size * w / h), image_size
    image = image.resize((nw, nh), Image.BICUBIC)
    left = int(round((nw - image_size) / 2.0))
    top = int(round((nh - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(IMAGE_MEAN if mean is None else mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(IMAGE_STD if std is None else std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def load_image(path, image_size: int = 224) -> torch.Tensor:
    """Image file -> float32 (3, S, S) normalised; unreadable files raise DataError naming the path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return preprocess_image(im, image_size)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
