"""Image decoding for evaluation: files and shard members to 8-bit PIL images (PIL formats and DICOM).

An image keeps its own mode (RGBA, P, LA, 1, L, CMYK, RGB; high bit depth greyscale is min/max scaled to "L"):
``bmclip.model.transforms.resize_center_crop`` resizes and crops it in that mode and converts to RGB last, as
open_clip's transform does (Pillow resizes RGBA/LA with premultiplied alpha and P/1 with nearest neighbour).

Evaluation decodes with PIL, so it accepts every extension of ``bmclip.data.images.IMAGE_EXTENSIONS``
(JPEG, PNG, WebP, TIFF, BMP, GIF), plus DICOM (``.dcm``/``.dicom``, or a file without extension that holds
the DICM preamble) through pydicom. Training decodes only ``DECODED_EXTENSIONS`` (JPEG, PNG) in C++ and
counts a sample whose image is WebP/TIFF/... as skipped ("unsupported image format"): a WebP shard member is
therefore evaluated but not trained on. That difference is intended and visible in both places' skip counts.
An image that cannot be decoded raises ``DataError`` naming it; the dataset readers turn that into a counted
skip with the reason.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bmclip.data.images import (
    IMAGE_EXTENSIONS,
    check_jpeg_scans,
    map_rows,
    minmax_to_uint8,
    pil_to_8bit,
    pil_to_rgb,
)
from bmclip.errors import ConfigError, DataError

__all__ = ["DICOM_EXTENSIONS", "decode_image_bytes", "decode_sample_image", "dicom_to_pil", "is_image_file",
           "load_image", "looks_like_dicom", "pil_to_rgb", "window_to_uint8"]

DICOM_EXTENSIONS = ("dcm", "dicom")

# Shard member extensions that hold an image, in the order a sample's image is chosen when it has several.
_SAMPLE_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS

_PIL_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def _suffix(p: Path) -> str:
    return p.suffix.lower().lstrip(".")


def looks_like_dicom(p: Path) -> bool:
    """True for a file without extension that starts with the DICOM preamble (128 bytes, then ``DICM``)."""
    if p.suffix:
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_image_file(p: Path) -> bool:
    """True for a file evaluation reads as an image: a PIL image extension, a DICOM extension or preamble."""
    s = _suffix(p)
    return s in IMAGE_EXTENSIONS or s in DICOM_EXTENSIONS or (s == "" and looks_like_dicom(p))


def load_image(path: str | os.PathLike, frame: str = "middle") -> Image.Image:
    """Read an image file (PIL formats or DICOM) as an 8-bit PIL image (see the module docstring); raises DataError
    if unreadable."""
    p = Path(path)
    if _suffix(p) in DICOM_EXTENSIONS or looks_like_dicom(p):
        return dicom_to_pil(p, frame=frame)
    try:
        with open(p, "rb") as f:
            head = f.read(2)
            # a JPEG is read whole to count its scans, then decoded from those bytes; other formats from the file
            data = head + f.read() if head == b"\xff\xd8" else None
    except OSError as e:
        raise DataError(f"cannot read image {p}: {e}") from e
    return _pil_image(p if data is None else data, f"cannot read image {p}")


def decode_image_bytes(data: bytes, ext: str, name: str = "image") -> Image.Image:
    """An image held in memory (``ext`` says DICOM or a PIL format) -> 8-bit PIL image; DataError if undecodable."""
    if ext in DICOM_EXTENSIONS:
        return dicom_to_pil(io.BytesIO(data), name=name)
    return _pil_image(data, f"cannot decode {name}")


def _pil_image(source: bytes | Path, what: str) -> Image.Image:
    """A PIL format's bytes (a JPEG's scans counted first) or file -> 8-bit PIL image in its own mode (high bit
    depth min/max scaled: ``pil_to_8bit``); DataError "``what``: reason"."""
    if isinstance(source, bytes):
        check_jpeg_scans(source, what)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            out = pil_to_8bit(im)
            return out.copy() if out is im else out  # (closing the file releases a loaded image's pixels too)
    except _PIL_ERRORS as e:
        raise DataError(f"{what}: {e}") from e


def decode_sample_image(sample: dict[str, Any]) -> Image.Image:
    """The 8-bit PIL image of a shard sample (its first member in IMAGE_EXTENSIONS, then DICOM).

    DataError when the sample has no image member, or "sample <key>: corrupt <ext>: ..." when it does not decode.
    """
    key = sample.get("__key__")
    ext = next((e for e in _SAMPLE_IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise DataError(f"sample {key} has no image member ({'/'.join(_SAMPLE_IMAGE_EXTENSIONS)})")
    try:
        return decode_image_bytes(sample[ext], ext, f"{key}.{ext}")
    except DataError as e:
        raise DataError(f"sample {key}: corrupt {ext}: {e}") from e


def window_to_uint8(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT or SIGMOID) mapped to 0..255 uint8 (a block of
    rows at a time: temporaries stay bounded however large the image)."""
    function = (function or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise DataError(f"unknown DICOM VOILUTFunction {function!r}")
    if function == "LINEAR" and width < 1:
        raise DataError(f"DICOM window width must be >= 1, got {width}")
    if function != "LINEAR" and width <= 0:
        raise DataError(f"DICOM window width must be > 0, got {width}")
    return map_rows(arr, lambda a: _window(np.asarray(a, dtype=np.float64), center, width, function))


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    if function == "SIGMOID":
        return np.clip(np.round(255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))), 0, 255).astype(np.uint8)
    if function == "LINEAR_EXACT":
        return np.clip(np.round(((x - center) / width + 0.5) * 255.0), 0, 255).astype(np.uint8)
    if width == 1:
        return np.where(x < center - 0.5, 0, 255).astype(np.uint8)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    lo = x <= center - 0.5 - (width - 1) / 2
    hi = x > center - 0.5 + (width - 1) / 2
    y = np.where(lo, 0.0, np.where(hi, 255.0, y))
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def _first(v: Any) -> float:
    """First value of a possibly multi-valued DICOM element."""
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def _check_dicom_pixels(ds: Any, p: str) -> None:
    """DataError for a DICOM whose pixel data would decode to more pixels than Pillow opens (a 778-byte deflated
    20000 x 20000 file decoded to 6 GB before this check), from its header alone."""
    try:
        n = int(ds.Rows) * int(ds.Columns) * max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (AttributeError, TypeError, ValueError) as e:
        raise DataError(f"DICOM {p} has no usable Rows/Columns/NumberOfFrames: {e}") from e
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) or None
    if limit is not None and n > limit:
        raise DataError(f"DICOM {p}: {n:,} pixels (Rows x Columns x frames), more than the {limit:,} that Pillow "
                        "opens (a decompression bomb?)")


def dicom_to_pil(source: str | os.PathLike | io.BytesIO, frame: str = "middle", name: str | None = None
                 ) -> Image.Image:
    """DICOM (a path, or a file object with the file's bytes) -> RGB PIL image.

    Greyscale: modality LUT (rescale slope/intercept), then the file's first VOI window (WindowCenter/
    WindowWidth, with its VOILUTFunction; a VOI LUT Sequence is not applied) if present, else min/max,
    to 8 bits; MONOCHROME1 is inverted so that higher values are
    brighter like MONOCHROME2. Colour (RGB/YBR, converted to RGB by pydicom) is kept; PALETTE COLOR
    goes through its lookup table. Multi-frame: ``frame="middle"`` (default; the central slice of a
    series/cine is usually the most representative) or ``"first"``.
    """
    # pydicom is an optional dependency (the "eval" extra), needed only when a DICOM file is read.
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_rescale

    src = Path(source) if isinstance(source, (str, os.PathLike)) else source
    p = name or str(src)
    if frame not in ("middle", "first"):
        raise ConfigError(f"frame must be 'middle' or 'first', got {frame!r}")
    try:
        ds = pydicom.dcmread(src)
    except Exception as e:  # pydicom raises several unrelated types for corrupt files
        raise DataError(f"cannot read DICOM {p}: {e}") from e
    if "PixelData" not in ds:
        raise DataError(f"DICOM {p} has no pixel data (e.g. a waveform or structured report)")
    _check_dicom_pixels(ds, p)
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing codec (JPEG 2000 without pylibjpeg/openjpeg), corrupt stream
        raise DataError(f"cannot decode DICOM pixels of {p} ({ds.file_meta.TransferSyntaxUID.name}): {e}") from e
    nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if nframes > 1:
        arr = arr[nframes // 2 if frame == "middle" else 0]
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        if rgb.dtype != np.uint8:  # LUT entries are 16-bit
            rgb = (rgb.astype(np.float64) / 257.0).round().astype(np.uint8)
        return Image.fromarray(rgb, "RGB")
    if spp == 3:
        if arr.dtype != np.uint8:
            arr = minmax_to_uint8(arr)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds

    def modality(a: np.ndarray) -> np.ndarray:  # the modality LUT, a block of rows at a time
        return np.asarray(apply_rescale(a, ds) if rescaled else a, dtype=np.float64)

    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        window_to_uint8(np.zeros(1), center, width, function)  # the window's own errors, before any pixel
        g = map_rows(arr, lambda a: window_to_uint8(modality(a), center, width, function))
    else:
        g = minmax_to_uint8(arr, modality if rescaled else None)
    if photometric == "MONOCHROME1":
        g = 255 - g
    return Image.fromarray(g, "L").convert("RGB")
