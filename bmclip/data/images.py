"""What every reader of images in bmclip agrees on: the normalisation constants and the file extensions.

Training (``ShardLoader``, DALI), evaluation and the benchmarks import these names; no other module
declares its own copy.
"""

from __future__ import annotations

__all__ = ["DECODED_EXTENSIONS", "IMAGE_EXTENSIONS", "IMAGE_MEAN", "IMAGE_STD"]

# BiomedCLIP's image normalisation (open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD), per RGB channel,
# for pixels scaled to [0, 1].
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Shard member extensions (lower case, no dot) that bmclip decodes, in the order a sample's image is chosen
# when it has several: the C++ decoder reads JPEG and PNG.
DECODED_EXTENSIONS = ("jpg", "jpeg", "png")

# Every extension recognised as an image: members with one of these that is not in DECODED_EXTENSIONS are
# counted as skipped ("unsupported image format"), never dropped silently; the dataset builder accepts all of
# them as inputs and re-encodes them.
IMAGE_EXTENSIONS = DECODED_EXTENSIONS + ("webp", "tif", "tiff", "bmp", "gif")
