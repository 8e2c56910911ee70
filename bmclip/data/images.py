"""What every reader of images in bmclip agrees on: the normalisation constants, the file extensions, and how a
PIL image of any mode becomes 8-bit RGB.

Training (``ShardLoader``, DALI), the dataset builder, evaluation and the benchmarks import these names; no
other module declares its own copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from bmclip.errors import DataError

__all__ = ["DECODED_EXTENSIONS", "IMAGE_EXTENSIONS", "IMAGE_MEAN", "IMAGE_STD", "MAX_JPEG_SCANS", "check_jpeg_scans",
           "jpeg_scan_count", "map_rows", "minmax_to_uint8", "pil_to_rgb"]

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


_HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Elements converted per step by map_rows: float64 temporaries of ~32 MB, however large the image (a 13000 px
# square 16-bit PNG of 328 KB used to take 4 GB in float64 copies).
_ROW_CHUNK_ELEMENTS = 1 << 22
# The most JPEG scans a reader accepts, as the C++ decoder (kMaxJpegScans) and TurboJPEG's TJFLAG_LIMITSCANS: a
# progressive JPEG of thousands of scans is a decompression bomb in time (95 s in Pillow for one 2 MB file).
MAX_JPEG_SCANS = 500


def pil_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit/32-bit/float greyscale min/max scaled to 8-bit "L" (see :func:`pil_to_rgb`); any other mode as it is
    (RGBA, P, LA, 1, CMYK, ...: for a resize in the image's own mode, as open_clip's transform does)."""
    return Image.fromarray(minmax_to_uint8(np.asarray(im))) if im.mode in _HIGH_BIT_DEPTH else im


def pil_to_rgb(im: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """PIL image of any mode -> RGB.

    16-bit/32-bit/float greyscale (CT, microscopy) is min/max scaled to 8 bits (PIL's ``convert("RGB")`` would
    clip it). Transparency is dropped as ``convert("RGB")`` drops it (open_clip's transform, so evaluation sees
    the pixels BiomedCLIP saw), unless ``background`` is given: then transparent pixels are composited over
    that colour, as a page shows a figure (the dataset builder uses white).
    """
    if im.mode in _HIGH_BIT_DEPTH:
        return pil_to_8bit(im).convert("RGB")
    if background is not None and (im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def map_rows(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (elementwise, to uint8) applied to ``arr`` a block of rows at a time: the same result as
    ``fn(arr)`` with bounded temporaries."""
    arr = np.asarray(arr)
    out = np.empty(arr.shape, dtype=np.uint8)
    if arr.ndim == 0 or arr.size == 0:
        out[...] = fn(arr)
        return out
    rows = _block_rows(arr)
    for i in range(0, arr.shape[0], rows):
        out[i:i + rows] = fn(arr[i:i + rows])
    return out


def _block_rows(arr: np.ndarray) -> int:
    """Rows per block of a (rows, ...) array, for ~_ROW_CHUNK_ELEMENTS elements a block."""
    return max(1, _ROW_CHUNK_ELEMENTS // max(1, arr[0].size))


def minmax_to_uint8(arr: np.ndarray, values: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Array of any range -> uint8 with its minimum at 0 and its maximum at 255 (all zeros when constant).

    The minimum and maximum are those of the finite values: NaN and -inf become 0, +inf 255 (one NaN pixel of a
    float TIFF made the whole image black); an array with no finite value is a DataError. ``values``: an
    elementwise map to float64 applied first (e.g. a DICOM modality LUT), a block of rows at a time: the min/max
    and the scaling are of its values, and no whole-image float64 copy is made."""
    arr = np.asarray(arr)
    raw = values is None  # the array's own values: integers need no float copy to find their range
    if raw:
        values = _as_float64
    lo, hi = math.inf, -math.inf
    rows = _block_rows(arr) if arr.ndim and arr.size else 1
    for i in range(0, max(arr.shape[0] if arr.ndim else 1, 1), rows):  # one block's values alive at a time
        block = arr[i:i + rows] if arr.ndim else arr
        v = block if raw and arr.dtype.kind in "biu" else values(block)
        if v.dtype.kind == "f":
            v = v[np.isfinite(v)]
        if v.size:
            lo, hi = min(lo, float(np.min(v))), max(hi, float(np.max(v)))
    if arr.size and lo > hi:
        raise DataError("image has no finite pixel value (all NaN or infinite)")
    if not hi > lo:
        return map_rows(arr, lambda a: np.where(values(a) == math.inf, 255, 0).astype(np.uint8))

    def scale(a: np.ndarray) -> np.ndarray:
        y = np.clip(np.round((values(a) - lo) / (hi - lo) * 255.0), 0, 255)
        return np.where(np.isnan(y), 0, y).astype(np.uint8)

    return map_rows(arr, scale)


def _as_float64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


def jpeg_scan_count(data: bytes | memoryview) -> int:
    """How many scans (SOS markers) a JPEG holds: an upper bound, as entropy-coded data cannot hold the marker
    (a 0xFF byte there is stuffed) but metadata (an EXIF thumbnail) can. 0 for data that is not a JPEG."""
    b = bytes(data[:2])
    return bytes(data).count(b"\xff\xda") if b == b"\xff\xd8" else 0


def check_jpeg_scans(data: bytes | memoryview, what: str) -> None:
    """DataError when a JPEG holds more than MAX_JPEG_SCANS scans (see there)."""
    n = jpeg_scan_count(data)
    if n > MAX_JPEG_SCANS:
        raise DataError(f"{what}: more than {MAX_JPEG_SCANS} progressive scans ({n}; a decompression bomb?)")
