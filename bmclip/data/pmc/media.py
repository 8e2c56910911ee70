"""Figure media: graphic href -> media file, and decode / RGB / resize / JPEG encode with guards.

Resolution rules for a ``<graphic xlink:href>``:

- PLOS ``info:doi/10.1371/journal.pone.0056489.g001`` -> ``pone.0056489.g001`` (the part after the last
  ``/`` with the ``journal.`` prefix dropped; both spellings are tried);
- any directory part of the href is dropped (media are looked up by file name, case-insensitively);
- an href with an image extension is tried as is, and every href is also tried as stem + extension;
- candidates are ranked full-size formats first (``.jpg``, ``.jpeg``, ``.png``, ``.tif``, ``.tiff``,
  ``.webp``, ``.bmp``) and ``.gif`` last, because PMC ships ``.gif`` files as thumbnails beside the
  full-size image. Across a figure's graphics (e.g. both members of an ``<alternatives>`` pair) the
  best-ranked existing file wins; ties go to document order.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageFile

from bmclip.data.images import MAX_JPEG_SCANS, jpeg_scan_count, pil_to_rgb

try:  # the compiled extension is optional here: without it every image goes through Pillow
    import bmclip._C as _C
except ImportError:
    _C = None

__all__ = ["ImageSkip", "ProcessedImage", "dhash64", "process_image", "resolve_graphics", "thumb16"]

_WHITE = (255, 255, 255)

# Preference of source formats: full-size raster first, PMC's .gif thumbnails last.
_EXT_RANK = {".jpg": 0, ".jpeg": 0, ".png": 1, ".tif": 2, ".tiff": 2, ".webp": 3, ".bmp": 4, ".gif": 9}


class ImageSkip(Exception):
    """An image refused by a filter or the decoder; ``reason`` is the counted skip reason."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


def _href_stems(href: str) -> list[str]:
    h = href.strip()
    if h.lower().startswith("info:doi/"):
        last = h.rsplit("/", 1)[-1]
        out = [last]
        if last.lower().startswith("journal."):
            out.insert(0, last[len("journal.") :])
        return out
    return [PurePosixPath(h.replace("\\", "/")).name]


def resolve_graphics(hrefs: list[str], media_names: dict[str, str]) -> list[str]:
    """Existing media file names for a figure's hrefs, best first (list[str]; empty if none exists).

    ``media_names`` maps lower-cased file name -> real file name.
    """
    cands: list[tuple[int, int, int, str]] = []
    seen: set[str] = set()
    for gi, href in enumerate(hrefs):
        for stem in _href_stems(href):
            names = []
            suffix = PurePosixPath(stem).suffix.lower()
            if suffix in _EXT_RANK:
                names.append(stem)
                base = stem[: -len(suffix)]
            else:
                base = stem
            names.extend(base + e for e in _EXT_RANK)
            for j, n in enumerate(names):
                real = media_names.get(n.lower())
                if real is not None and real not in seen:
                    seen.add(real)
                    rank = _EXT_RANK.get(PurePosixPath(real).suffix.lower(), 8)
                    cands.append((rank, gi, j, real))
    cands.sort()
    return [c[3] for c in cands]


@dataclass
class ProcessedImage:
    """A stored figure: JPEG bytes, sizes (w, h) before/after resize, sha of the JPEG, dHash, thumbnail.

    ``passthrough`` is True when ``jpeg`` is the source file itself (a small enough JPEG, see
    :func:`process_image`), False when it was decoded, resized and re-encoded.
    """

    jpeg: bytes
    orig_size: tuple[int, int]
    size: tuple[int, int]
    sha: str
    dhash: int
    thumb: bytes  # 16x16 greyscale, box-averaged: the near-duplicate verification fingerprint
    passthrough: bool = False


def thumb16(img: Image.Image) -> bytes:
    """16x16 8-bit greyscale, box-averaged thumbnail of an image (256 bytes, row-major)."""
    g = img if img.mode == "L" else img.convert("L")
    return g.resize((16, 16), Image.Resampling.BOX).tobytes()


def _cell_sums(x: np.ndarray, cells: int) -> np.ndarray:
    """Sums of ``x``'s rows (axis 0) over ``cells`` equal cells spanning all of them: ``[cells, ...]`` int64.

    Exact: in units of 1/``cells`` row, row i spans [i*cells, (i+1)*cells) and cell c spans [c*n, (c+1)*n), so
    a row cut by a cell border is weighted by the part of it in each cell, and every cell sums n units of rows
    (the sums are ``cells`` times the area sums, the same factor for every cell). Integer arithmetic (no BLAS,
    no rounding): the same bits on every machine. Fewer rows than cells are repeated first (same means).
    """
    n = x.shape[0]
    if n < cells:
        x, n = np.repeat(x, cells, axis=0), n * cells
    bounds = np.arange(cells + 1) * n
    q, r = bounds // cells, bounds % cells  # each cell border: row q, r/cells of the way into it
    whole = np.add.reduceat(x, q[:-1], axis=0, dtype=np.int64)  # rows q[c] .. q[c+1]-1 (n >= cells: non-empty)
    part = x[np.minimum(q, n - 1)].astype(np.int64) * r.reshape((-1,) + (1,) * (x.ndim - 1))
    return cells * whole + part[1:] - part[:-1]


def dhash64(img: Image.Image) -> int:
    """64-bit difference hash of an image (int): the exact area means of a 9x8 grid, 1 bit per horizontal
    gradient (the right cell's mean > the left's).

    The means are exact box averages over the whole image, whatever its size (fractional pixels at cell
    borders weighted by their area; integer sums, :func:`_cell_sums`): a rescaled or re-encoded copy gives the
    same means up to its pixel noise, and an image enlarged by repeating pixels the same hash. The hash of
    staging format 3 (an integer pre-reduction by min(size)//32, then a 9x8 bilinear resize rounded to 8 bits)
    moved up to 11 bits between real figures and their copies; this one up to 4 (docs/build_dataset.md, "Near
    duplicates").
    """
    g = img if img.mode == "L" else img.convert("L")
    sums = _cell_sums(_cell_sums(np.asarray(g), 8).T, 9).T  # [8 rows, 9 columns], all cells of equal area
    bits = (sums[:, 1:] > sums[:, :-1]).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


_NATIVE = None  # bmclip._C.Decoder(1) when the extension offers decode_fit, else False (looked up once)


def _native_decoder():
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = _C.Decoder(1) if _C is not None and hasattr(_C.Decoder, "decode_fit") else False
    return _NATIVE or None


# A passed-through JPEG may use at most this many bytes per pixel: figures re-encoded at q90 4:2:0 take
# ~0.2-0.6; beyond 1.0 (q100, 4:4:4, embedded thumbnails/ICC) re-encoding makes a much smaller shard.
PASSTHROUGH_MAX_BYTES_PER_PIXEL = 1.0


def _transcode_native(data: bytes, tw: int, th: int, quality: int) -> tuple[bytes, np.ndarray] | None:
    """YCbCr/greyscale JPEG -> (JPEG bytes at tw x th, luma uint8 [th, tw]) by bmclip._C's planar transcode.

    None when the extension is not built (or predates transcode_jpeg) or the source is not a YCbCr or
    greyscale JPEG (e.g. an RGB-coded one): the caller takes the RGB path then.
    """
    native = _native_decoder()
    if native is None or not hasattr(native, "transcode_jpeg"):
        return None
    try:
        return native.transcode_jpeg(data, tw, th, quality=quality)
    except Exception as e:
        raise ImageSkip("undecodable_image", f"{type(e).__name__}: {e}") from e


def _decode_resize_jpeg(im: Image.Image, data: bytes, tw: int, th: int) -> Image.Image:
    """RGB/greyscale JPEG -> RGB image of exactly (tw, th): DCT-scaled decode + antialiased bilinear resize.

    (The RGB route; YCbCr/greyscale JPEGs normally take :func:`_transcode_native` instead.)
    Two implementations with bit-identical output (checked by tests/test_build_dataset.py): bmclip._C's
    fused decode + AVX2 resampler (~4x faster resize than Pillow's) when built, else Pillow. The DCT
    scale is the smallest of 1/2, 1/4, 1/8 still >= the target size (Pillow's ``draft`` rule), so the
    resize always antialiases from at least the target resolution.
    """
    w, h = im.size
    native = _native_decoder()
    if native is not None:
        try:
            return Image.fromarray(native.decode_fit(data, tw, th, interpolation="bilinear", dct_min_ratio=1.0))
        except Exception as e:
            raise ImageSkip("undecodable_image", f"{type(e).__name__}: {e}") from e
    im.draft(im.mode, (tw, th))
    im.load()
    s8 = round(8 * im.size[0] / w)  # the DCT scale Pillow picked, in eighths
    if im.size != (tw, th):
        # box = the original image in scaled coordinates (exactly s/8 of them, as libjpeg scales), which is
        # what the native path maps; a greyscale image is resized as L (4x less work than RGBX) then
        # expanded, which gives the same pixels as expanding first.
        im = im.resize((tw, th), Image.Resampling.BILINEAR, box=(0, 0, w * s8 / 8, h * s8 / 8))
    return im if im.mode == "RGB" else im.convert("RGB")


def process_image(
    data: bytes | str,
    *,
    max_side: int = 512,
    quality: int = 90,
    max_pixels: int = 89_478_485,
    min_side: int = 64,
    max_aspect: float = 10.0,
    passthrough: bool = True,
) -> ProcessedImage:
    """Decode an image (bytes or path), check it, convert to RGB, shrink to max_side and encode JPEG.

    JPEG sources coded as YCbCr or greyscale (nearly all) are transcoded by ``bmclip._C`` when it is
    built: decoded as planes at the smallest DCT scale still >= the target, each plane resized with the
    antialiased bilinear filter, re-encoded from the planes (no colour conversion, no chroma
    upsampling; ~20% less CPU than decode + RGB resize + Pillow encode, same size and quality). Without
    the extension, and for other JPEGs and formats, Pillow (or the extension's RGB decode_fit) does it.
    The two routes give equivalent, not identical, pixels: output is deterministic for a given build.

    A JPEG that already fits (longest side <= max_side), is RGB/YCbCr or greyscale (not CMYK/YCCK) and
    takes <= PASSTHROUGH_MAX_BYTES_PER_PIXEL is stored as is (``passthrough=False`` disables this): no
    generation loss, no encode. It is still fully decoded (luma only, which also gives the pixels for the
    perceptual hash), so a truncated or corrupt file is refused as before. A greyscale
    source stays a 1-channel JPEG then (decoders expand it to RGB).

    Raises ImageSkip with reason ``empty_image``, ``too_many_pixels`` (decompression-bomb guard, checked
    from the header before any pixel is decoded), ``small_image`` (shorter side < min_side),
    ``extreme_aspect`` (long/short side > max_aspect) or ``undecodable_image``.
    """
    if isinstance(data, str):
        try:
            with open(data, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageSkip("undecodable_image", f"cannot read {data}: {e}") from e
    if not data:
        raise ImageSkip("empty_image")
    if jpeg_scan_count(data) > MAX_JPEG_SCANS:  # a bomb in time for Pillow (the native transcode refuses it too)
        raise ImageSkip("undecodable_image", f"more than {MAX_JPEG_SCANS} progressive scans")
    # Truncated files must fail, not be padded with grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageSkip("undecodable_image", "zero-sized image")
            if w * h > max_pixels:
                raise ImageSkip("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
            if min(w, h) < min_side:
                raise ImageSkip("small_image", f"{w}x{h}")
            if max(w, h) > max_aspect * min(w, h):
                raise ImageSkip("extreme_aspect", f"{w}x{h}")
            scale = min(1.0, max_side / max(w, h))
            tw, th = max(1, round(w * scale)), max(1, round(h * scale))
            jpeg_ok = im.format == "JPEG" and im.mode in ("RGB", "L")
            if passthrough and jpeg_ok and scale == 1.0 and len(data) <= PASSTHROUGH_MAX_BYTES_PER_PIXEL * w * h:
                # Luma-only full-size decode: validates every scan and gives the fingerprints from the same
                # pixels as a re-encoded figure's (a 1/8 DC-only decode is cheaper, but its thumbnails drift by
                # up to ~7 grey levels on busy images, so a passed-through copy would miss near-duplicates).
                im.draft("L", (w, h))
                im.load()
                g = im if im.mode == "L" else im.convert("L")
                sha = hashlib.sha256(data).hexdigest()[:16]
                return ProcessedImage(
                    jpeg=bytes(data), orig_size=(w, h), size=(w, h), sha=sha, dhash=dhash64(g), thumb=thumb16(g),
                    passthrough=True,
                )  # fmt: skip
            if jpeg_ok:
                t = _transcode_native(data, tw, th, quality)
                if t is not None:
                    jpeg, luma = t
                    g = Image.fromarray(luma, "L")  # the stored image's luma: both fingerprints from it
                    return ProcessedImage(
                        jpeg=jpeg, orig_size=(w, h), size=(tw, th), sha=hashlib.sha256(jpeg).hexdigest()[:16],
                        dhash=dhash64(g), thumb=thumb16(g),
                    )  # fmt: skip
                im = _decode_resize_jpeg(im, data, tw, th)
            else:
                im.load()
                if im.mode in ("L", "RGB") and im.size != (tw, th):
                    # Antialiased bilinear (triangle) filter, as torchvision's resize(antialias=True) uses at
                    # training time; reducing_gap=2 box-reduces by an integer factor first on big images.
                    # Greyscale is resized before the (pixel-identical) expansion to RGB: less work.
                    im = im.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=2.0)
                im = pil_to_rgb(im, background=_WHITE)  # transparent figure backgrounds as a page shows them
                if im.size != (tw, th):
                    im = im.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=2.0)
    except ImageSkip:
        raise
    except Image.DecompressionBombError as e:
        raise ImageSkip("too_many_pixels", str(e)) from e
    except Exception as e:
        # Malformed files make PIL's plugins raise almost anything (OSError, SyntaxError, struct.error,
        # IndexError, ...): every one of them means "cannot decode this file", never a crashed build.
        raise ImageSkip("undecodable_image", f"{type(e).__name__}: {e}") from e
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    jpeg = buf.getvalue()
    # The encoder is deterministic, so equal JPEG bytes <=> equal resized pixels: hash the (10x smaller)
    # JPEG instead of the raw pixels.
    sha = hashlib.sha256(jpeg).hexdigest()[:16]
    g = im.convert("L")  # one greyscale copy for both fingerprints
    return ProcessedImage(jpeg=jpeg, orig_size=(w, h), size=im.size, sha=sha, dhash=dhash64(g), thumb=thumb16(g))
